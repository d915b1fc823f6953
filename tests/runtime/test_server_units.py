"""Fast checks of the server's pure parts: flag/env resolution, request validation, SSE, metrics."""

from __future__ import annotations

import argparse
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dllm_runtime.engine.stats import EngineStats, RequestStats, StepStats
from dllm_runtime.server import args as server_args
from dllm_runtime.server import protocol, sse
from dllm_runtime.server.errors import BadRequest
from dllm_runtime.server.metrics import ServerMetrics


def parse(argv: list[str], env: dict[str, str] | None = None) -> server_args.ServeSettings:
    parser = argparse.ArgumentParser()
    server_args.add_arguments(parser)
    return server_args.resolve(parser.parse_args(argv), env or {})


def test_defaults_env_and_cli_precedence():
    s = parse([])
    assert (s.port, s.host, s.max_num_seqs, s.model, s.api_key, s.trust_remote_code) == (8080, "0.0.0.0", 16, None,
                                                                                         None, False)
    assert s.decoding == {}  # unset diffusion flags keep DecodingParams' own defaults
    env = {"DLLM_PORT": "9000", "DLLM_MAX_NUM_SEQS": "4", "DLLM_BLOCK_LENGTH": "8", "DLLM_TRUST_REMOTE_CODE": "true",
           "DLLM_SERVED_MODEL_NAME": "m", "DLLM_API_KEY": "k"}
    s = parse([], env)
    assert (s.port, s.max_num_seqs, s.trust_remote_code, s.served_model_name, s.api_key) == (9000, 4, True, "m", "k")
    assert s.decoding == {"block_length": 8}
    s = parse(["--port", "9100", "--block-length", "16", "--algorithm", "llada"], env)
    assert s.port == 9100 and s.decoding == {"block_length": 16, "algorithm": "llada"}


@pytest.mark.parametrize("env,needle", [
    ({"DLLM_PORT": "x"}, "DLLM_PORT"),
    ({"DLLM_PORT": "70000"}, "DLLM_PORT"),
    ({"DLLM_MAX_NUM_SEQS": "0"}, "DLLM_MAX_NUM_SEQS"),
    ({"DLLM_CACHE": "huge"}, "DLLM_CACHE"),
    ({"DLLM_ENABLE_GRPC": "maybe"}, "DLLM_ENABLE_GRPC"),
])
def test_bad_env_values_name_the_variable(env, needle):
    with pytest.raises(server_args.SettingsError, match=needle):
        parse([], env)


def test_bad_cli_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--max-num-seqs", "-1"])
    assert "max-num-seqs" in capsys.readouterr().err


def test_every_flag_has_a_unique_env_name():
    envs = [o.env for o in server_args.SERVER_OPTIONS + server_args.DECODING_OPTIONS]
    assert len(envs) == len(set(envs)) and all(e.startswith("DLLM_") for e in envs)


def test_decoding_flags_are_decoding_params_fields():
    from dllm_runtime.decoding.params import DecodingParams

    fields = set(DecodingParams.field_names())
    assert {o.dest for o in server_args.DECODING_OPTIONS} <= fields


@pytest.mark.parametrize("body,param", [
    (b"{", None),
    (b'"text"', None),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": "a", "n": 1.5}', "n"),
    (b'{"prompt": "a", "stream": "yes"}', "stream"),
    (b'{"prompt": "a", "stream_options": {"include_usage": true, "x": 1}}', "stream_options"),
])
def test_request_parse_errors_name_the_field(body, param):
    with pytest.raises(BadRequest) as exc:
        protocol.parse_request(protocol.CompletionRequest, body)
    assert exc.value.param == param
    assert exc.value.body()["error"]["type"] == "invalid_request_error"


def test_prompt_shapes():
    def prompts(p):
        return protocol.parse_request(protocol.CompletionRequest, json.dumps({"prompt": p}).encode()).prompts()

    assert prompts("hi") == ["hi"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    with pytest.raises(BadRequest):
        prompts([[1], []])


def test_decoding_overrides_reject_unknown_extras():
    req = protocol.parse_request(protocol.CompletionRequest, b'{"prompt": "a", "steps": 4, "alg": "origin", "zz": 1}')
    with pytest.raises(BadRequest) as exc:
        req.decoding_overrides(("alg",))
    assert exc.value.param == "zz"
    req = protocol.parse_request(protocol.CompletionRequest, b'{"prompt": "a", "steps": 4, "early_stop": false}')
    assert req.decoding_overrides(("early_stop",)) == {"steps": 4, "early_stop": False}


def test_chat_content_parts_and_token_limits():
    req = protocol.parse_request(protocol.ChatCompletionRequest, json.dumps({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5}).encode())
    req.checks()
    assert req.chat_messages() == [{"role": "user", "content": "ab"}] and req.requested_max_tokens() == 5
    with pytest.raises(BadRequest):  # images are not text
        protocol.parse_request(protocol.ChatCompletionRequest, json.dumps({
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode())


def test_sse_event_is_one_data_line():
    raw = sse.event({"text": "line1\nline2"})
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2
    assert json.loads(raw[6:]) == {"text": "line1\nline2"}
    assert sse.DONE == b"data: [DONE]\n\n"


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not exported")


def test_metrics_observer_and_scrape_time_gauges():
    registry = CollectorRegistry()
    m = ServerMetrics("m", registry)
    snapshot = EngineStats(num_running=3, num_waiting=2, max_num_seqs=4, batch_occupancy=0.75, total_steps=0,
                           total_forwards=0, total_tokens_committed=0, total_requests_finished=0, cache_bytes=1234,
                           reserved_cache_bytes=0, max_cache_bytes=1, last_step_latency_s=0.0)
    m.bind_engine(lambda: snapshot)
    m.on_step(StepStats(batch_size=3, tokens_in_forward=30, tokens_committed=6, latency_s=0.02, cache_bytes=1234,
                        num_running=3, num_waiting=2))
    m.on_request_finished(RequestStats("r", prompt_tokens=7, completion_tokens=8, nfe=4, steps=4, finish_reason="stop",
                                       queue_time_s=0.1, ttft_s=0.2, e2e_s=0.5))
    m.on_request_finished(RequestStats("e", prompt_tokens=1, completion_tokens=0, nfe=1, steps=1,
                                       finish_reason="error", queue_time_s=0.0, ttft_s=None, e2e_s=0.1))
    m.count_error("aborted")
    text = generate_latest(registry).decode()
    assert _value(text, 'vllm:num_requests_running{model_name="m"}') == 3
    assert _value(text, 'vllm:num_requests_waiting{model_name="m"}') == 2
    assert _value(text, 'dllm:batch_occupancy{model_name="m"}') == 0.75
    assert _value(text, 'dllm:kv_cache_bytes{model_name="m"}') == 1234
    assert _value(text, 'vllm:prompt_tokens_total{model_name="m"}') == 8
    assert _value(text, 'vllm:generation_tokens_total{model_name="m"}') == 8
    assert _value(text, 'vllm:request_success_total{finished_reason="stop",model_name="m"}') == 1
    assert _value(text, 'dllm:request_errors_total{model_name="m",reason="engine_error"}') == 1
    assert _value(text, 'dllm:request_errors_total{model_name="m",reason="aborted"}') == 1
    assert _value(text, 'dllm:forwards_total{model_name="m"}') == 1
    assert _value(text, 'dllm:tokens_per_forward_sum{model_name="m"}') == 2.0
    assert _value(text, 'vllm:time_to_first_token_seconds_count{model_name="m"}') == 1  # None is not observed
    assert _value(text, 'dllm:batch_size_sum{model_name="m"}') == 3
    with pytest.raises(ValueError):
        m.count_error("bogus")
    m.unregister()
    assert "vllm:" not in generate_latest(registry).decode()


def test_tuning_doc_lists_every_flag():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "tuning.md").read_text()
    missing = [o.name for o in server_args.SERVER_OPTIONS + server_args.DECODING_OPTIONS
               if f"`--{o.name}`" not in doc or f"`{o.env}`" not in doc]
    assert not missing, f"docs/tuning.md does not document: {missing}"
