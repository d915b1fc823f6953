"""The alerts (PrometheusRule) and the Grafana dashboard query only metrics that exist.

The exported names are read from a live `/metrics` of the real server (`python -m dllm_runtime` on a tiny
random-weight model, on a loopback port) after one real request, not from a list kept here. Two series
do not come from the runtime and are allowed by name: Prometheus' own `up` and kube-state-metrics'
Deployment availability (for "no ready replica")."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.charts.conftest import SERVING, one
from tests.runtime.server_process import ServerProcess

NAME = "tiny"
NOT_FROM_THE_RUNTIME = {
    "up": "Prometheus' scrape health",
    "kube_deployment_status_replicas_available": "kube-state-metrics",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}
# The metric contract every team codes against (names fixed in the design); the dashboard must show each.
CONTRACT = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "dllm:batch_occupancy", "dllm:kv_cache_bytes",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "dllm:forwards_total", "dllm:request_errors_total", "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens", "dllm:request_forwards", "dllm:tokens_per_forward",
    "dllm:step_latency_seconds", "dllm:batch_size",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, keywords, labels, literals removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end():].lstrip().startswith("(") or m.group().lower() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def test_promql_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (namespace, le) (rate(vllm:x_bucket{model_name="a", '
            're="b"}[5m]))) > 1e-9 or on() up{job="j"} == 0 unless absent(dllm:y) / $__rate_interval')
    assert metric_names(expr) == {"vllm:x_bucket", "up", "dllm:y"}


def exported_series(metrics_text: str) -> tuple[set[str], set[str]]:
    """(every series name the exposition can carry, the family names) from `# TYPE` lines."""
    series, families = set(), set()
    for line in metrics_text.splitlines():
        m = re.match(r"# TYPE (\S+) (\w+)", line)
        if not m:
            continue
        name, kind = m.groups()
        families.add(name)
        if kind == "counter":
            series |= {name + "_total" if not name.endswith("_total") else name, name + "_created"}
        elif kind == "histogram":
            series |= {name + s for s in (*HISTOGRAM_SUFFIXES, "_created")}
        else:
            series.add(name)
    return series, families


@pytest.fixture(scope="module")
def live_metrics(tiny_llada_dir, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("metrics-server") / "server.log"
    server = ServerProcess("--model", str(tiny_llada_dir), "--served-model-name", NAME,
                           "--default-max-tokens", "4", log_path=log)
    try:
        server.wait_ready(NAME, timeout=300)
        # One real request so that every labelled family has a child (success counters, histograms).
        resp = httpx.post(server.base_url + "/v1/completions", timeout=120,
                          json={"model": NAME, "prompt": "1 2 3", "max_tokens": 4})
        assert resp.status_code == 200, resp.text
        text = httpx.get(server.base_url + "/metrics", timeout=30).text
    finally:
        server.terminate()
    return text


def queries(render) -> dict[str, str]:
    """Every PromQL expression we ship: alert expressions and dashboard panel/variable queries."""
    out = {}
    for rule in one(render(SERVING, {"model.name": NAME}), "PrometheusRule")["spec"]["groups"][0]["rules"]:
        out[f"alert {rule['alert']}"] = rule["expr"]
    dash = json.loads((SERVING / "files" / "dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            out[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"]
            out[f"variable {var['name']}"] = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q)
    return out


def test_alerts_and_dashboard_query_only_exported_metrics(render, live_metrics: str) -> None:
    series, _ = exported_series(live_metrics)
    assert any(s.startswith("vllm:") for s in series), "the server exported no vllm:* metrics"
    problems = []
    for where, expr in queries(render).items():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names - set(NOT_FROM_THE_RUNTIME):
            if name not in series:
                problems.append(f"{where}: {name} is not exported by the runtime")
    assert not problems, "\n".join(problems)


def test_live_metrics_carry_the_model_name_label_the_queries_select_on(live_metrics: str) -> None:
    samples = [line for line in live_metrics.splitlines() if line.startswith(("vllm:", "dllm:"))]
    assert samples
    for line in samples:
        assert f'model_name="{NAME}"' in line, line


def test_dashboard_shows_every_contract_metric(render) -> None:
    used = set()
    for expr in queries(render).values():
        used |= metric_names(expr)
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    missing = CONTRACT - used - bases
    assert not missing, f"not on the dashboard/alerts: {sorted(missing)}"


def test_metric_contract_is_what_the_server_exports(live_metrics: str) -> None:
    series, families = exported_series(live_metrics)
    missing = {n for n in CONTRACT if n not in series and n + "_bucket" not in series}
    assert not missing, f"the runtime does not export {sorted(missing)}"

