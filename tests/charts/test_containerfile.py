"""The Containerfile installs with the Makefile's own recipe (no second install recipe), and its images
fit OpenShift restricted-v2 and what the charts/ServingRuntime expect.

No container build runs here (no container engine, no registry access on CI); the install commands the
Containerfile passes are fed to the real Makefile with `make -n` instead."""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.cluster import ROOT

CONTAINERFILE = ROOT / "Containerfile"


@dataclass
class Stage:
    name: str
    base: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            stages.append(Stage(name=m.group(2), base=m.group(1)))
        elif op == "ARG":
            name, _, default = rest.partition("=")
            target = stages[-1].args if stages else global_args
            target[name.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
    return global_args, stages


def stage(name: str) -> Stage:
    return next(s for s in parse()[1] if s.name == name)


def make_install_calls(st: Stage) -> list[list[str]]:
    """The `make install ...` commands of a stage's RUN instructions, ARG defaults substituted."""
    calls = []
    for run in st.all("RUN"):
        for cmd in re.split(r"&&|;|\|\|", run):
            words = shlex.split(cmd)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # leading VAR=value assignments
                words = words[1:]
            if words[:2] == ["make", "install"]:
                calls.append([re.sub(r"\$\{(\w+)\}", lambda m: st.args.get(m.group(1), ""), w) for w in words])
    return calls


def test_runtime_is_the_default_target_and_operator_exists() -> None:
    global_args, stages = parse()
    assert stages[-1].name == "runtime", "a plain `podman build .` must give the model server"
    assert {"runtime", "operator"} <= {s.name for s in stages}
    assert global_args["BASE_IMAGE"].startswith("registry.access.redhat.com/ubi9/"), "UBI based"


@pytest.mark.parametrize("name", ["runtime", "operator"])
def test_python_packages_are_installed_only_by_make_install(name: str) -> None:
    st = stage(name)
    for run in st.all("RUN"):
        assert not re.search(r"\bpip3?\s+install\b|\bpython3?\s+-m\s+pip\b|\buv\s+pip\b", run), (
            f"{name}: a second install recipe: {run}")
    calls = make_install_calls(st)
    assert len(calls) == 1, f"{name}: expected one `make install`, got {calls}"
    variables = dict(w.split("=", 1) for w in calls[0][2:])
    assert {"VENV", "TORCH_SPEC", "EXTRAS"} <= set(variables)
    assert variables["EXTRAS"], "pip cannot install an empty extra set"


@pytest.mark.parametrize("name", ["runtime", "operator"])
def test_makefile_honours_what_the_containerfile_passes(name: str, tmp_path: Path) -> None:
    """`make -n` prints the recipe the image build would run: it must install exactly the torch spec and
    extras the Containerfile asks for, into its venv."""
    call = make_install_calls(stage(name))[0]
    variables = dict(w.split("=", 1) for w in call[2:])
    venv = tmp_path / "venv"
    argv = ["make", "-n", "-C", str(ROOT), "install",
            *[f"{k}={str(venv) if k == 'VENV' else v}" for k, v in variables.items()]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    recipe = proc.stdout
    if variables["TORCH_SPEC"]:
        assert f'{venv}/bin/pip install --quiet "{variables["TORCH_SPEC"]}"' in recipe
    else:  # the operator image: no torch at all
        assert "torch" not in recipe
    assert f'-e ".[{variables["EXTRAS"]}]"' in recipe
    assert "-c hack/constraints.txt" in recipe


def test_gpu_default_and_cpu_variant_differ_only_by_build_args() -> None:
    runtime = stage("runtime")
    assert "+cpu" not in runtime.args["TORCH_SPEC"], "the default runtime image is the CUDA build"
    assert re.fullmatch(r"torch==[0-9.]+", runtime.args["TORCH_SPEC"]), "torch is pinned"
    assert "runtime" in runtime.args["EXTRAS"].split(","), "the model server's stack is the `runtime` extra"
    operator = stage("operator")
    assert operator.args["TORCH_SPEC"] == "" and "runtime" not in operator.args["EXTRAS"].split(","), (
        "the operator image carries no torch")
    # The CPU variant documented in the header must name build args the runtime stage declares.
    header = CONTAINERFILE.read_text().split("ARG BASE_IMAGE", 1)[0]
    for arg in re.findall(r"--build-arg (\w+)=", header):
        assert arg in runtime.args or arg == "BASE_IMAGE", f"header documents unknown build arg {arg}"


@pytest.mark.parametrize("name", ["runtime", "operator"])
def test_images_run_as_arbitrary_non_root_uid_with_writable_home(name: str) -> None:
    st = stage(name)
    users = st.all("USER")
    assert users and users[-1].isdigit() and users[-1] != "0", "final USER must be a numeric non-root UID"
    env = " ".join(st.all("ENV"))
    home = re.search(r"\bHOME=(\S+)", env).group(1)
    run = " ".join(st.all("RUN"))
    assert home == "/tmp" or (f"chmod -R g=u {home}" in run or re.search(rf"chmod -R g=u [^&]*{home}", run)), (
        f"{name}: HOME {home} must be group-0 writable for an arbitrary UID")
    if name == "runtime":
        hf_home = re.search(r"\bHF_HOME=(\S+)", env).group(1)
        assert hf_home.startswith(home), "Hugging Face cache under the writable HOME"


def test_runtime_entrypoint_is_the_server_on_the_runtime_port() -> None:
    st = stage("runtime")
    assert st.all("ENTRYPOINT")[-1] == '["dllm-serve", "serve"]'
    assert st.all("EXPOSE") == ["8080"]
    env = " ".join(st.all("ENV"))
    assert "DLLM_PORT=8080" in env
    chart_rt = (ROOT / "manifests" / "kserve" / "servingruntime.yaml").read_text()
    rt = next(d for d in yaml.safe_load_all(chart_rt) if d)
    container = rt["spec"]["containers"][0]
    assert "command" not in container, "the ServingRuntime relies on the image's ENTRYPOINT"
    assert container["ports"][0]["containerPort"] == 8080


def test_operator_entrypoint_matches_the_operator_deployments() -> None:
    entry = stage("operator").all("ENTRYPOINT")[-1]
    assert entry == '["python", "-m", "dllm_operator"]'
    dep = next(d for d in yaml.safe_load_all((ROOT / "manifests" / "operator" / "deployment.yaml").read_text())
               if d and d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"] == ["python", "-m", "dllm_operator"]


def test_copied_sources_exist_and_context_keeps_them() -> None:
    ignore = (ROOT / ".containerignore").read_text().split()
    for st in parse()[1]:
        for copy in st.all("COPY"):
            if copy.startswith("--from"):
                continue
            for src in copy.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: missing"
                assert src.split("/")[0] not in ignore, f"COPY {src} is excluded by .containerignore"


def test_operator_code_never_imports_the_model_server_stack() -> None:
    """The operator image installs only the `operator` extra: importing every dllm_operator module must
    not need torch, transformers or kserve (a fresh interpreter, so other tests' imports don't count)."""
    code = (
        "import importlib, pkgutil, sys, dllm_operator\n"
        "for m in pkgutil.walk_packages(dllm_operator.__path__, 'dllm_operator.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in ('torch', 'transformers', 'kserve') if n in sys.modules))\n"
    )
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"dllm_operator imports {proc.stdout.strip()}"
