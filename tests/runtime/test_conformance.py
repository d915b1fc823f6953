"""The conformance runner against the golden vectors (tests/golden, ALGORITHMS.md §4).

Every LLaDA / Fast-dLLM case must reproduce the unmodified reference token for token, end to end
with the real tiny model (output canvas, NFE, every forward's input and cache window, per-forward
logits), and also with the decoder driven by the stored logits (`LogitsReplayModel`: a test of the
decoder logic in isolation, not of the model). The runner must also *fail* when a case is wrong,
and `dllm-serve conformance` is exercised as a real subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dllm_runtime.conformance import (
    ConformanceOptions,
    GoldenFile,
    LogitsReplayModel,
    RecordingModel,
    ReplayRandomSource,
    RowRandomSource,
    _SharedDraws,
    case_special_ids,
    default_model_provider,
    load_golden_dir,
    replay_model_provider,
    run_case,
    run_directory,
)
from dllm_runtime.decoding.base import RandomSource
from tests.runtime.golden_replay import GOLDEN, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LLADA_FILE = GoldenFile(GOLDEN / "llada_golden.json", json.loads((GOLDEN / "llada_golden.json").read_text()))
LLADA_CASES = {c["name"]: c for c in LLADA_FILE.cases}
SAMPLING = [n for n, c in LLADA_CASES.items() if c.get("rng_draws")]
WITH_LOGITS = [n for n, c in LLADA_CASES.items() if all("logits_key" in t for t in c["trace"])]


@pytest.fixture(scope="module")
def provider():
    return default_model_provider(ConformanceOptions())


def test_golden_llada_set_is_complete() -> None:
    assert len(LLADA_CASES) == 19
    assert len(SAMPLING) == 4 and len(WITH_LOGITS) == 16


@pytest.mark.parametrize("name", sorted(LLADA_CASES))
def test_case_end_to_end_with_tiny_model(name: str, provider) -> None:
    result = run_case(LLADA_FILE, LLADA_CASES[name], ConformanceOptions(), provider)
    assert result.passed, result.line()
    assert result.nfe == LLADA_CASES[name]["nfe"] == result.forwards
    if name in WITH_LOGITS:
        assert result.logits_max_diff is not None and result.logits_max_diff < 1e-3


@pytest.mark.parametrize("name", sorted(WITH_LOGITS))
def test_case_decoder_in_isolation_with_stored_logits(name: str) -> None:
    """Decoder logic alone: the i-th forward returns the reference's i-th logits."""
    options = ConformanceOptions(decoder_only=True)
    result = run_case(LLADA_FILE, LLADA_CASES[name], options, replay_model_provider)
    assert result.passed, result.line()


@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_sampling_case_with_injected_draws(name: str, provider) -> None:
    """The RNG seam: the stored draws, injected in call order, give the same tokens as seeding."""
    result = run_case(LLADA_FILE, LLADA_CASES[name], ConformanceOptions(rng="replay"), provider)
    assert result.passed, result.line()


def test_wrong_seed_is_detected(provider) -> None:
    case = dict(LLADA_CASES["llada_lowconf_semiar_temp1.5"], seed_before_call=1)
    result = run_case(LLADA_FILE, case, ConformanceOptions(), provider)
    assert not result.passed and "output differs" in result.line()


def test_failing_sampling_case_explains_rng_differences(provider) -> None:
    case = json.loads(json.dumps(LLADA_CASES["llada_lowconf_semiar_temp0.8"]))
    case["seed_before_call"] += 1  # fails ...
    case["rng_draws"][2]["shape"] = [1, 41, 256]  # ... and the recorded third draw is not what we draw
    result = run_case(LLADA_FILE, case, ConformanceOptions(), provider)
    assert not result.passed
    assert (
        "rng: draw 3: decoder rand (1, 40, 256) torch.float64, reference rand (1, 41, 256) float64" in result.problems
    )


def _tampered_dir(tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the LLaDA golden files with one case edited by `edit(case)`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("llada_tiny.safetensors", "llada_tiny_config.json", "llada_golden_tensors.safetensors"):
        (tmp_path / name).symlink_to(GOLDEN / name)
    doc = json.loads((GOLDEN / "llada_golden.json").read_text())
    doc["cases"] = [c for c in doc["cases"] if c["name"] in ("fastdllm_prefixcache_threshold0.9_t0", "llada_cfg1.5_t0")]
    for case in doc["cases"]:
        edit(case)
    (tmp_path / "llada_golden.json").write_text(json.dumps(doc))
    return tmp_path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["output"][0].__setitem__(20, (c["output"][0][20] + 1) % 250), "output differs"),
        (lambda c: c.__setitem__("nfe", c["nfe"] + 1), "nfe"),
        (lambda c: c["trace"][1]["input_ids"][0].__setitem__(0, 7), "input_ids differ"),
        (lambda c: c["trace"].append(dict(c["trace"][-1])), "forwards !="),
        (lambda c: c.__setitem__("reference", "someone/else gen.py::generate (v1)"), "no decoder reproduces"),
        (lambda c: c["kwargs"].__setitem__("new_upstream_arg", 1), "new_upstream_arg: argument not supported"),
    ],
    ids=["output", "nfe", "forward-input", "forward-count", "unknown-reference", "unknown-argument"],
)
def test_runner_reports_mismatches(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    results = run_directory(_tampered_dir(tmp_path, edit), ConformanceOptions())
    assert len(results) == 2
    for result in results:
        assert not result.passed and message in result.line(), result.line()


def test_runner_checks_the_cache_window(tmp_path: Path) -> None:
    """A prefix-cache trace claiming a different past length must fail the window check."""

    def shift_past(case: dict[str, Any]) -> None:
        for entry in case["trace"]:
            if "past_len" in entry:
                entry["past_len"] -= 1

    results = {r.name: r for r in run_directory(_tampered_dir(tmp_path, shift_past), ConformanceOptions())}
    assert "cached suffix forward" in results["fastdllm_prefixcache_threshold0.9_t0"].line()
    assert results["llada_cfg1.5_t0"].passed  # no cache: untouched


def test_recording_model_does_not_change_logits(provider) -> None:
    special = case_special_ids(LLADA_CASES["llada_lowconf_semiar_t0"], LLADA_FILE)
    model = provider(LLADA_FILE, LLADA_CASES["llada_lowconf_semiar_t0"], special)
    ids = torch.tensor([LLADA_CASES["llada_lowconf_semiar_t0"]["output"][0]])
    pos = torch.arange(ids.shape[1])[None]
    recorder = RecordingModel(model)
    with torch.inference_mode():
        assert torch.equal(recorder(ids, pos), model(ids, pos))
    assert torch.equal(recorder.records[0].rows[0], ids[0])
    assert recorder.num_layers == model.num_layers  # attributes pass through


def test_replay_random_source_checks_kind_shape_and_dtype() -> None:
    tensors = {"a": torch.rand(1, 4, 3, dtype=torch.float64), "b": torch.tensor([[2]]), "c": torch.tensor([1])}
    draws = [
        {"fn": "rand_like", "shape": [1, 4, 3], "dtype": "float64", "key": "a"},
        {"fn": "multinomial", "shape": [1, 1], "dtype": "int64", "key": "b"},
        {"fn": "categorical_sample", "shape": [1], "dtype": "int64", "key": "c"},
    ]
    rng = ReplayRandomSource(draws, tensors)
    with pytest.raises(RuntimeError, match="decoder drew"):
        rng.rand((1, 4, 2), torch.float64, torch.device("cpu"))
    rng = ReplayRandomSource(draws, tensors)
    assert torch.equal(rng.rand((1, 4, 3), torch.float64, torch.device("cpu")), tensors["a"])
    # Categorical.sample's internal multinomial is skipped, the sampled id returned
    assert rng.categorical(torch.ones(1, 5)).tolist() == [1]
    with pytest.raises(RuntimeError, match="reference made 3"):
        rng.rand((1,), torch.float32, torch.device("cpu"))


def test_row_random_sources_split_one_batched_draw() -> None:
    shared = _SharedDraws(RandomSource(5), rows=2)
    row0, row1 = RowRandomSource(shared, 0), RowRandomSource(shared, 1)
    a1, b1 = (
        row1.rand((1, 3), torch.float32, torch.device("cpu")),
        row0.rand((1, 3), torch.float32, torch.device("cpu")),
    )
    expected = torch.rand((2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([b1, a1]), expected)


def test_logits_replay_model_refuses_extra_forwards() -> None:
    special = case_special_ids(LLADA_CASES["llada_lowconf_semiar_t0"], LLADA_FILE)
    model = LogitsReplayModel([torch.zeros(1, 4, 8)], special)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="only 1"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_special_ids_fall_back_to_model_config(tmp_path: Path) -> None:
    """d3LLM-style files carry no `special_ids`: the model config's `_golden_note` provides them."""
    shutil.copy(GOLDEN / "llada_tiny_config.json", tmp_path / "m_config.json")
    golden = GoldenFile(tmp_path / "x_golden.json", {"cases": []})
    ids = case_special_ids({"model": "m"}, golden)
    assert (ids.mask, ids.eos, ids.eot, ids.pad, ids.bos) == (250, 251, 252, 251, 248)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dllm_runtime.cli", "conformance", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_reports_bad_directory(tmp_path: Path) -> None:
    proc = _cli(str(tmp_path))
    assert proc.returncode == 2 and "no *_golden.json" in proc.stderr


def test_cli_fails_on_a_wrong_case(tmp_path: Path) -> None:
    directory = _tampered_dir(tmp_path / "set", lambda c: c.__setitem__("nfe", 99))
    report = tmp_path / "report.json"
    proc = _cli(str(directory), "--case", "cfg", "--report", str(report))
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == "0 passed, 1 failed"
    doc = json.loads(report.read_text())
    assert (doc["passed"], doc["failed"]) == (0, 1)
    assert doc["cases"][0]["name"] == "llada_cfg1.5_t0" and "nfe 16 != 99" in doc["cases"][0]["problems"]


def test_cli_whole_golden_directory() -> None:
    """`dllm-serve conformance tests/golden`: every case of every family, one line each."""
    proc = _cli(str(GOLDEN))
    lines = proc.stdout.strip().splitlines()
    total = sum(len(g.cases) for g in load_golden_dir(GOLDEN))
    assert len(lines) == total + 1, proc.stdout + proc.stderr
    assert lines[-1] == f"{total} passed, 0 failed", proc.stdout
    assert proc.returncode == 0
    for name in LLADA_CASES:
        assert any(line.startswith(f"PASS {name} ") for line in lines), name


# ---------------------------------------------------------------------------- a batched Fast-dLLM set
def _assert_runner_passes(tmp_path: Path, case: dict[str, Any], output: torch.Tensor, trace: list[torch.Tensor]) -> None:
    """Run a hand-built case (its oracle's `output` and forward inputs) as a one-case golden file."""
    case = {**case, "output": output.tolist(), "nfe": len(trace), "trace": [{"input_ids": t.tolist()} for t in trace]}
    for name in ("llada_tiny.safetensors", "llada_tiny_config.json"):
        (tmp_path / name).symlink_to(GOLDEN / name)
    doc = {"special_ids": LLADA_FILE.doc["special_ids"], "cases": [case]}
    (tmp_path / "synthetic_golden.json").write_text(json.dumps(doc))
    [result] = run_directory(tmp_path, ConformanceOptions())
    assert result.passed, result.line()


def _oracle_fast_dllm_generate(model, prompt: torch.Tensor, block: int, threshold: float, temperature: float):  # type: ignore[no-untyped-def]
    """Test oracle: ALGORITHMS.md §1.2 `generate` for B rows written out directly (global RNG,
    one (B, L) forward per step, a block ends when NO row has a mask left in it).

    Independent of the policies under test; it lets the runner be checked on a batched Fast-dLLM
    call, which the shipped golden set does not contain.
    """
    mask_id = 250
    rows, lp = prompt.shape
    x = torch.cat([prompt, torch.full((rows, 4 * block), mask_id)], dim=1)
    positions = torch.arange(x.shape[1]).expand(rows, -1)
    trace = []
    for b in range(4):
        s, e = lp + b * block, lp + (b + 1) * block
        while True:
            masked = x == mask_id
            trace.append(x.clone())
            with torch.inference_mode():
                logits = model(x, positions, None)
            masked[:, e:] = False
            noisy = logits
            if temperature > 0:
                noise = torch.rand_like(logits, dtype=torch.float64)
                noisy = logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature
            x0 = noisy.argmax(-1)
            conf = torch.softmax(logits.to(torch.float64), -1).gather(-1, x0[..., None])[..., 0]
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, conf, torch.finfo(torch.float64).min)
            take = masked & (conf >= threshold)
            take |= torch.zeros_like(take).scatter_(1, conf.argmax(1, keepdim=True), True)
            take &= masked
            x[take] = x0[take]
            if not (x[:, s:e] == mask_id).any():
                break
    return x, trace


def test_runner_replays_a_batched_fast_dllm_call(tmp_path: Path, provider) -> None:
    """B = 2 rows advance blocks together (idle forwards for the finished row), draws shared."""
    model = provider(LLADA_FILE, LLADA_CASES["llada_lowconf_semiar_t0"], case_special_ids({}, LLADA_FILE))
    prompt = torch.tensor([[248, 17, 99, 3, 42, 120, 7, 230], [248, 55, 66, 77, 88, 91, 92, 93]])
    torch.manual_seed(3)
    output, trace = _oracle_fast_dllm_generate(model, prompt, block=8, threshold=0.9, temperature=0.7)
    case = {
        "name": "synthetic_fastdllm_batch2_temp0.7",
        "reference": "NVlabs/Fast-dLLM v1/llada/generate.py::generate (a9b81e4)",
        "model": "llada_tiny",
        "seed_before_call": 3,
        "prompt": prompt.tolist(),
        "kwargs": {"threshold": 0.9, "steps": 32, "gen_length": 32, "block_length": 8, "temperature": 0.7},
    }
    _assert_runner_passes(tmp_path, case, output, trace)
    # the case exercises idle forwards: a threshold step always commits a token unless the row's block
    # is already complete, so an unchanged row after some forward proves it waited for the other
    changed = [[bool((t[r] != n[r]).any()) for t, n in zip(trace, trace[1:] + [output])] for r in range(2)]
    assert not all(changed[0]) or not all(changed[1])


def _oracle_llada_cfg_generate(model, prompt, attention_mask, block: int, cfg: float, temperature: float):  # type: ignore[no-untyped-def]
    """Test oracle: ALGORITHMS.md §1.1 `generate` for B left-padded rows with CFG, written out
    directly: one forward over `[x; x with prompt masked]`, quota per row, float64 Gumbel on the
    guided logits, softmax in the logits' dtype, topk over full rows."""
    from dllm_runtime.models.attention import KeyMaskAttention

    mask_id, gen, steps = 250, 2 * block, 4
    rows, lp = prompt.shape
    x = torch.cat([prompt, torch.full((rows, gen), mask_id)], dim=1)
    valid = torch.cat([attention_mask.bool(), torch.ones(rows, gen, dtype=torch.bool)], dim=1)
    prompt_index = x != mask_id
    positions = torch.arange(x.shape[1]).expand(2 * rows, -1)
    spb, trace = steps // 2, []
    for b in range(2):
        lo, hi = lp + b * block, lp + (b + 1) * block
        counts = [int(n) for n in (x[:, lo:hi] == mask_id).sum(1)]
        quotas = [[n // spb + (1 if i < n % spb else 0) for i in range(spb)] for n in counts]
        for i in range(spb):
            masked = x == mask_id
            unconditional = x.clone()
            unconditional[prompt_index] = mask_id
            both = torch.cat([x, unconditional])
            trace.append(both.clone())
            with torch.inference_mode():
                out = model(both, positions, KeyMaskAttention(torch.cat([valid, valid])))
            cond, uncond = out.chunk(2)
            logits = uncond + (cfg + 1) * (cond - uncond)
            noisy = logits
            if temperature > 0:
                noise = torch.rand_like(logits, dtype=torch.float64)
                noisy = logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature
            x0 = noisy.argmax(-1)
            p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            p[:, hi:] = -torch.inf
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, p, -torch.inf)
            for j in range(rows):
                idx = torch.topk(conf[j], quotas[j][i]).indices
                x[j, idx] = x0[j, idx]
    return x, trace


def test_runner_replays_a_batched_llada_cfg_call(tmp_path: Path, provider) -> None:
    """B = 2, left padding, CFG (reference row order [x0, x1, u0, u1]) and shared Gumbel draws."""
    model = provider(LLADA_FILE, LLADA_CASES["llada_lowconf_semiar_t0"], case_special_ids({}, LLADA_FILE))
    prompt = torch.tensor([[248, 17, 99, 3, 42, 120, 7, 230], [251, 251, 251, 248, 55, 66, 77, 88]])
    attention_mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
    torch.manual_seed(11)
    output, trace = _oracle_llada_cfg_generate(model, prompt, attention_mask, block=8, cfg=1.0, temperature=0.8)
    case = {
        "name": "synthetic_llada_cfg_batch2_leftpad_temp0.8",
        "reference": "ML-GSAI/LLaDA generate.py::generate (HEAD b7e6c35)",
        "model": "llada_tiny",
        "seed_before_call": 11,
        "prompt": prompt.tolist(),
        "kwargs": {
            "attention_mask": attention_mask.tolist(),
            "steps": 4,
            "gen_length": 16,
            "block_length": 8,
            "temperature": 0.8,
            "cfg_scale": 1.0,
            "mask_id": 250,
        },
    }
    _assert_runner_passes(tmp_path, case, output, trace)
