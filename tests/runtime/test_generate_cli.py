"""`dllm-serve generate` as a user runs it: a subprocess on tiny model folders.

The subprocess output is checked against the same decode done in-process (same params, same seed),
so the test fails if the command maps a flag wrongly, cuts the text in the wrong place or reports
statistics that do not match the decode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm_runtime.cli import main
from dllm_runtime.commands.generate import completion_tokens
from dllm_runtime.decoding.base import RandomSource, Sequence
from dllm_runtime.decoding.params import DecodingParams
from dllm_runtime.decoding.registry import build_policy
from dllm_runtime.engine.step import run_to_completion
from dllm_runtime.models import load_model
from dllm_runtime.models.base import SpecialIds
from dllm_runtime.tokenizer import apply_chat_template, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "dllm_runtime.cli", "generate", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )


def _expected(folder: Path, prompt: list[int], params: DecodingParams) -> tuple[str, int, str]:
    """The decode the command should have done, in-process."""
    model = load_model(folder, dtype="float32").eval()
    tok = load_tokenizer(folder)
    special = model.special_ids
    canvas = torch.tensor([prompt + [special.mask] * params.generation_slots()])
    seq = Sequence(canvas=canvas, prompt_len=len(prompt), special=special, rng=RandomSource(params.seed))
    run_to_completion(model, [(seq, build_policy(params, model))])
    ids, finish = completion_tokens(seq.canvas[0, len(prompt):].tolist(), special, params.max_tokens)
    return tok.decode(ids, skip_special_tokens=True), seq.nfe, finish


def test_generate_llada_json_matches_in_process_decode(tiny_llada_dir: Path) -> None:
    proc = _cli("--model", str(tiny_llada_dir), "--prompt", "The answer is", "--max-tokens", "12",
                "--block-length", "4", "--algorithm", "fast_dllm", "--threshold", "0.5",
                "--temperature", "0.8", "--seed", "7", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    prompt = list(load_tokenizer(tiny_llada_dir).encode("The answer is", add_special_tokens=True))
    params = DecodingParams(algorithm="fast_dllm", max_tokens=12, block_length=4, threshold=0.5,
                            temperature=0.8, seed=7)
    text, nfe, finish = _expected(tiny_llada_dir, prompt, params)
    assert (out["text"], out["nfe"], out["finish_reason"]) == (text, nfe, finish)
    assert out["prompt_tokens"] == len(prompt) and out["algorithm"] == "fast_dllm"
    assert out["tokens_per_forward"] == pytest.approx(out["completion_tokens"] / out["nfe"], abs=1e-3)
    assert out["wall_s"] > 0


def test_generate_dream_chat_prints_text_and_stats(tiny_dream_dir: Path) -> None:
    """No --algorithm on a Dream checkpoint: Dream's own sampler; text on stdout, stats on stderr."""
    proc = _cli("--model", str(tiny_dream_dir), "--chat", "Hi", "--max-tokens", "8", "--steps", "4")
    assert proc.returncode == 0, proc.stderr
    stats_line = proc.stderr.strip().splitlines()[-1]
    assert stats_line.startswith("[") and "algorithm=dream" in stats_line and "nfe=4" in stats_line
    prompt = apply_chat_template(load_tokenizer(tiny_dream_dir), [{"role": "user", "content": "Hi"}])
    text, nfe, _ = _expected(tiny_dream_dir, prompt, DecodingParams(algorithm="dream", max_tokens=8, steps=4))
    assert proc.stdout == text + "\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "3"], "--steps:"),  # 8 slots / block 4 = 2 blocks; 3 steps do not split
        (["--algorithm", "dream", "--alg", "best"], "--alg:"),
        (["--cache", "dual", "--algorithm", "llada"], "--cache:"),
    ],
)
def test_bad_decoding_flag_is_named(tiny_llada_dir: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str) -> None:
    code = main(["generate", "--model", str(tiny_llada_dir), "--prompt", "x", "--max-tokens", "8",
                 "--block-length", "4", "--algorithm", "llada", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    proc = _cli("--model", str(tmp_path / "nope"), "--prompt", "x")
    assert proc.returncode == 2
    assert "--model" in proc.stderr and "config.json" in proc.stderr


def test_completion_is_cut_at_stop_ids_masks_and_max_tokens() -> None:
    special = SpecialIds(mask=9, eos=1, pad=1, eot=2)
    assert completion_tokens([5, 6, 2, 7, 1], special, 10) == ([5, 6], "stop")
    assert completion_tokens([5, 6, 1, 1], special, 10) == ([5, 6], "stop")
    assert completion_tokens([5, 6, 7, 8], special, 3) == ([5, 6, 7], "length")
    assert completion_tokens([5, 9, 7], special, 3) == ([5], "length")
