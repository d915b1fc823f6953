"""LLaDA-8B-shaped forward throughput on a GPU, against the HBM-bandwidth floor (issue #7), one table.

Not a test: it measures. An LLaDA model with the shapes of LLaDA-8B (d_model 4096, 32 layers,
32 heads, MLP 12288, vocabulary 126464) is built with the project's own classes and random weights,
directly on the device in the requested dtype (no checkpoint, no files). Random prompts of
`--prompt-len` tokens then decode `--gen-len` tokens in `--block-length` blocks through the serving
path: `DecodingParams(algorithm="fast_dllm", steps=gen_len / quota, cache=...)` (no threshold, so
Fast-dLLM commits a fixed quota of `--quota` tokens per forward), `registry.build_policy`, and all
sequences of a batch driven together by the engine's batched step `engine.step.run_step`. Per
(batch size, cache mode) it reports forwards, wall time, forwards/s, generated tokens/s
(batch x gen_len / wall), ms per forward, peak GPU memory and, at batch 1, the floor
`weight bytes read per forward / HBM bandwidth` and measured/floor. A last line times a bare
batch-1 full-canvas forward (`model(ids, positions)`, median of `--repeats`) against the same floor.

    python bench/gpu_forward.py                                   # on a GPU box: 8B shapes, bf16, batch 1 and 32
    python bench/gpu_forward.py --batch-sizes 1,8,32 --caches dual --json out.json
    python bench/gpu_forward.py --hbm-gbps 2000                   # a GPU the bandwidth table does not know
    python bench/gpu_forward.py --batch-sizes 32 --prompt-spread 256  # distinct prompt lengths: packed, varlen
    python bench/gpu_forward.py --preset tiny --device cpu --dtype float32 --prompt-len 32 \\
        --gen-len 32 --block-length 16 --batch-sizes 1,2        # CPU smoke run (tests/runtime/test_bench_gpu_forward.py)

Reading the numbers. The floor counts the bytes every forward must stream: all parameters except
the token embedding (a forward gathers only its rows of it). It ignores KV-cache and activation
traffic and compute, so it is a lower bound, not a prediction: a full-canvas forward at prompt 512 +
gen 256 runs 768 tokens through every matmul (~12 TFLOP at 8B), which is compute-bound on an H100/H200
(the bare-forward line reports the achieved TFLOP/s to show it); the dual cache's in-block forwards
(block_length tokens) are the ones that can approach the bandwidth floor. Times include the step
loop's host-side work (planning, batch layout, the logits index, commit), i.e. what serving pays per
step; "model ms" is the part inside the model call and "host ms" the rest, so a large host share
says the step loop, not the GPU, bounds that configuration.
Weights are random, so the committed tokens are noise; with a fixed quota the number of forwards
does not depend on them (block_length / quota per block, every cache mode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from dllm_runtime.decoding.base import DecodingPolicy, RandomSource, Sequence  # noqa: E402
from dllm_runtime.decoding.params import DecodingParams  # noqa: E402
from dllm_runtime.decoding.registry import build_policy  # noqa: E402
from dllm_runtime.engine.step import run_step  # noqa: E402
from dllm_runtime.models.base import SpecialIds  # noqa: E402
from dllm_runtime.models.layers import RMSNorm  # noqa: E402
from dllm_runtime.models.llada import LLaDAConfig, LLaDAModel  # noqa: E402

#: the released LLaDA-8B config's shape keys (the rest take LLaDAConfig.from_dict's defaults)
CONFIG_8B: dict[str, Any] = {
    "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
    "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "max_sequence_length": 4096, "weight_tying": False, "include_qkv_bias": False,
}  # fmt: skip
#: tests/golden/llada_tiny_config.json's shapes: a CPU smoke run in seconds
CONFIG_TINY: dict[str, Any] = {
    "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 128,
    "vocab_size": 256, "embedding_size": 256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "max_sequence_length": 256, "weight_tying": False, "include_qkv_bias": False,
}  # fmt: skip
PRESETS: dict[str, tuple[dict[str, Any], SpecialIds]] = {
    "8b": (CONFIG_8B, SpecialIds(mask=126336, eos=126081, pad=126081, eot=126348, bos=126080)),
    "tiny": (CONFIG_TINY, SpecialIds(mask=250, eos=251, pad=251, eot=252, bos=248)),
}
#: peak HBM bandwidth in GB/s by `torch.cuda.get_device_name()`: every substring must occur (first match wins)
HBM_GBPS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 4800.0),
    (("H100", "HBM3"), 3350.0),  # "NVIDIA H100 80GB HBM3" is the SXM part; the PCIe/NVL parts differ
    (("H100", "SXM"), 3350.0),
    (("A100", "80GB"), 2039.0),
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Row:
    """One (batch, cache) configuration's timed decode."""

    batch: int
    cache: str
    forwards: int  # batched model calls of the timed decode
    nfe_min: int  # forwards per sequence (all sequences run in lockstep: equal to `forwards`)
    nfe_max: int
    wall_s: float
    forwards_per_s: float
    tokens_per_s: float  # generated tokens (batch x gen_len) per second
    ms_per_forward: float
    model_ms_per_forward: float  # inside the model call (device time between CUDA events on a GPU)
    host_ms_per_forward: float  # the rest: the step loop's own work that the device does not overlap
    floor_ms: float | None  # batch 1 only: weight bytes read per forward / HBM bandwidth
    vs_floor: float | None  # ms_per_forward / floor_ms
    peak_mem_gib: float | None  # torch.cuda.max_memory_allocated during the timed decode (weights included)
    masks_left: int  # mask tokens still in the generated slots of all canvases (must be 0)


# ---------------------------------------------------------------------------- model
def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int) -> LLaDAModel:
    """The preset's LLaDA with random weights allocated once, on `device`, in `dtype`.

    Built on the meta device first, so an 8B model never materialises in host memory (or in fp32).
    """
    config, special = PRESETS[preset]
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig.from_dict(config), special)
    model = model.to(dtype=dtype).to_empty(device=device)
    init_random(model, seed)
    return model.eval()


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int) -> None:
    """N(0, 0.02) matrices and unit RMSNorm gains: cheap, and keeps activations finite in bf16.

    A private generator on the weights' device: the global RNG stays untouched (in-process callers).
    """
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    device = next(model.parameters()).device
    if device.type == "meta":  # shapes only: nothing to fill
        return
    generator = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        if id(p) in norms:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=generator)


def weight_bytes(model: LLaDAModel) -> tuple[int, int]:
    """(all parameter bytes, bytes a forward streams): the embedding table is gathered, not read whole."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.transformer.wte.weight
    return total, total - embed.numel() * embed.element_size()


def hbm_gbps(device: torch.device, override: float | None) -> float | None:
    """Peak HBM bandwidth (GB/s) for the floor: the flag, else the table; None on CPU (no floor)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for needles, gbps in HBM_GBPS:
        if all(n in name for n in needles):
            return gbps
    raise SystemExit(f"unknown HBM bandwidth for {name!r}: pass --hbm-gbps")


# ---------------------------------------------------------------------------- decoding
def random_prompts(batch: int, length: int, vocab: int, mask: int, seed: int) -> torch.Tensor:
    """`(batch, length)` token ids uniform over the vocabulary minus the mask id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (batch, length), generator=g)
    return ids + (ids >= mask).long()


def prompt_lengths(longest: int, spread: int, batch: int) -> list[int]:
    """Prompt lengths spread evenly over `[longest - spread, longest]`: with a spread, no two rows of a
    batch share a length, as in serving, and the step loop packs them (varlen attention on a GPU)."""
    return [longest - (spread * i) // max(1, batch - 1) for i in range(batch)]


def make_batch(
    model: LLaDAModel, params: DecodingParams, prompts: list[torch.Tensor], device: torch.device
) -> list[tuple[Sequence, DecodingPolicy]]:
    """One (sequence, policy) per prompt, canvases on `device`, initialised as the engine does."""
    special = model.special_ids
    slots = params.generation_slots()
    batch = []
    for i, prompt in enumerate(prompts):
        canvas = torch.full((1, len(prompt) + slots), special.mask, dtype=torch.long, device=device)
        canvas[0, : len(prompt)] = prompt.to(device)
        seq = Sequence(canvas=canvas, prompt_len=len(prompt), special=special, rng=RandomSource(i, device=device))
        policy = build_policy(params, model)
        policy.init(seq)
        batch.append((seq, policy))
    return batch


class ModelTimer:
    """The model as `run_step` sees it, timing each call: splits a step into the model and the rest.

    On a GPU the time is read from CUDA events around each call (device time, read after the decode:
    no extra sync inside the timed loop); on a CPU it is wall time around the call. What the table
    calls host time is the step's wall time minus this: planning, batch layout, the logits index,
    commits and the syncs they make, as far as the device does not overlap them.
    """

    def __init__(self, model: LLaDAModel) -> None:
        self.model = model
        self.events: list[tuple[Any, Any]] = []
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:  # special_ids, num_layers, ...
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.model.model.transformer.wte.weight.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.model(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return out
        begin = time.perf_counter()
        out = self.model(*args, **kwargs)
        self.seconds += time.perf_counter() - begin
        return out

    def total_ms(self) -> float:
        """Milliseconds inside model calls so far (call after the device is synchronised)."""
        return 1000 * self.seconds + sum(start.elapsed_time(end) for start, end in self.events)


def decode(model: Any, batch: list[tuple[Sequence, DecodingPolicy]], max_forwards: int | None = None) -> int:
    """Run the engine's batched step until every sequence is done (or `max_forwards`); returns forwards."""
    forwards = 0
    while not all(seq.finished for seq, _ in batch) and (max_forwards is None or forwards < max_forwards):
        if run_step(model, batch).sequences:
            forwards += 1
    return forwards


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def masks_left(batch: list[tuple[Sequence, DecodingPolicy]]) -> int:
    return sum(int((seq.canvas[0, seq.prompt_len :] == seq.special.mask).sum()) for seq, _ in batch)


def run_config(
    model: LLaDAModel, args: argparse.Namespace, batch_size: int, cache: str, floor_ms: float | None
) -> Row:
    """Warm up `--warmup` steps on a throw-away batch, then time one full decode of a fresh one."""
    params = DecodingParams(
        algorithm="fast_dllm", max_tokens=args.gen_len, block_length=args.block_length,
        steps=args.gen_len // args.quota, cache=cache, temperature=0.0,
    )  # fmt: skip
    assert params.resolved_threshold() is None, "a threshold would replace the fixed quota"
    full = random_prompts(batch_size, args.prompt_len, model.config.vocab_size, model.special_ids.mask, args.seed)
    prompts = [p[:n] for p, n in zip(full, prompt_lengths(args.prompt_len, args.prompt_spread, batch_size))]
    if args.warmup:
        decode(model, make_batch(model, params, prompts, args.device), args.warmup)
    batch = make_batch(model, params, prompts, args.device)
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(args.device)
    timer = ModelTimer(model)
    sync(args.device)
    start = time.perf_counter()
    forwards = decode(timer, batch)
    sync(args.device)
    wall = time.perf_counter() - start
    nfe = [seq.nfe for seq, _ in batch]
    ms = 1000 * wall / forwards
    model_ms = timer.total_ms() / forwards
    floor = floor_ms if batch_size == 1 else None
    return Row(
        batch=batch_size, cache=cache, forwards=forwards, nfe_min=min(nfe), nfe_max=max(nfe), wall_s=wall,
        forwards_per_s=forwards / wall, tokens_per_s=batch_size * args.gen_len / wall, ms_per_forward=ms,
        model_ms_per_forward=model_ms, host_ms_per_forward=ms - model_ms,
        floor_ms=floor, vs_floor=None if floor is None else ms / floor,
        peak_mem_gib=torch.cuda.max_memory_allocated(args.device) / 2**30 if args.device.type == "cuda" else None,
        masks_left=masks_left(batch),
    )  # fmt: skip


# ---------------------------------------------------------------------------- bare forward
def bare_forward(model: LLaDAModel, args: argparse.Namespace, floor_ms: float | None) -> dict[str, Any]:
    """Median time of one batch-1 forward over the whole canvas (full attention, full LM head)."""
    length = args.prompt_len + args.gen_len
    ids = random_prompts(1, length, model.config.vocab_size, model.special_ids.mask, args.seed).to(args.device)
    positions = torch.arange(length, device=args.device).unsqueeze(0)
    times = []
    with torch.inference_mode():
        for i in range(args.repeats + 1):  # the first call warms up (kernels, allocator)
            sync(args.device)
            start = time.perf_counter()
            model(ids, positions)
            sync(args.device)
            if i:
                times.append(time.perf_counter() - start)
    ms = 1000 * statistics.median(times)
    return {
        "tokens": length,
        "ms": ms,
        "floor_ms": floor_ms,
        "vs_floor": None if floor_ms is None else ms / floor_ms,
        "tflops": forward_flops(model.config, length) / (ms / 1000) / 1e12,
    }


def forward_flops(cfg: LLaDAConfig, tokens: int) -> float:
    """Matmul FLOPs of one full forward of `tokens` tokens (projections, MLP, attention, LM head)."""
    head_dim = cfg.d_model // cfg.n_heads
    attn_proj = cfg.d_model * (2 * cfg.d_model + 2 * cfg.n_kv_heads * head_dim)  # q, out; k, v
    mlp = 3 * cfg.d_model * cfg.mlp_hidden_size
    head = cfg.d_model * cfg.embedding_size
    attention = 2 * tokens * tokens * cfg.d_model  # multiply-adds of QK^T and PV, per layer
    return 2.0 * (tokens * (cfg.n_layers * (attn_proj + mlp) + head) + cfg.n_layers * attention)


# ---------------------------------------------------------------------------- output
def render(rows: list[Row], bare: dict[str, Any], meta: dict[str, Any]) -> str:
    """The markdown table plus a header line and the bare-forward line."""

    def opt(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"{meta['preset']} LLaDA ({meta['params'] / 1e9:.3g}B params, {meta['streamed_gb']:.3g} GB streamed per forward), "
        f"{meta['dtype']} on {meta['device_name']}, HBM {opt(meta['hbm_gbps'], '.0f')} GB/s; "
        f"prompt {meta['prompt_len']} (spread {meta['prompt_spread']}), gen {meta['gen_len']}, block {meta['block_length']}, fast_dllm fixed quota {meta['quota']} tokens/forward",
        "",
        "| batch | cache | forwards | wall s | forwards/s | tokens/s | ms/forward | model ms | host ms | floor ms "
        "| measured/floor | peak GiB | masks left |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.batch} | {r.cache} | {r.forwards} | {r.wall_s:.3f} | {r.forwards_per_s:.1f} | {r.tokens_per_s:.1f} | "
            f"{r.ms_per_forward:.2f} | {r.model_ms_per_forward:.2f} | {r.host_ms_per_forward:.2f} | "
            f"{opt(r.floor_ms, '.3g')} | {opt(r.vs_floor, '.2f')} | {opt(r.peak_mem_gib, '.2f')} | {r.masks_left} |"
        )
    lines += [
        "",
        f"bare batch-1 forward, {bare['tokens']} tokens, full LM head: {bare['ms']:.2f} ms (median of {meta['repeats']}), "
        f"floor {opt(bare['floor_ms'], '.3g')} ms, measured/floor {opt(bare['vs_floor'], '.2f')}, {bare['tflops']:.3g} TFLOP/s",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument(
        "--prompt-spread", type=int, default=0,
        help="batch prompts get lengths spread over [prompt-len - spread, prompt-len] (0: all equal)",
    )  # fmt: skip
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--quota", type=int, default=8, help="tokens committed per forward (steps = gen_len / quota)")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    p.add_argument("--caches", default="none,prefix,dual", help="comma-separated: none, prefix, dual")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--warmup", type=int, default=2, help="steps of each configuration run before it is timed")
    p.add_argument("--repeats", type=int, default=5, help="bare forwards timed (median)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="peak HBM bandwidth (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write meta, rows and the bare forward here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.caches = args.caches.split(",")
    if args.gen_len % args.block_length or args.block_length % args.quota:
        p.error("a fixed quota per forward needs --gen-len % --block-length == 0 and --block-length % --quota == 0")
    if not 0 <= args.prompt_spread < args.prompt_len:
        p.error("--prompt-spread must be >= 0 and below --prompt-len")
    if args.prompt_len + args.gen_len > PRESETS[args.preset][0]["max_sequence_length"]:
        p.error("--prompt-len + --gen-len exceeds the preset's max_sequence_length")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.preset, args.device, DTYPES[args.dtype], args.seed)
    total, streamed = weight_bytes(model)
    gbps = hbm_gbps(args.device, args.hbm_gbps)
    floor_ms = None if gbps is None else 1000 * streamed / (gbps * 1e9)
    meta = {
        "preset": args.preset, "params": sum(p.numel() for p in model.parameters()), "weight_bytes": total,
        "streamed_gb": streamed / 1e9, "streamed_bytes": streamed, "hbm_gbps": gbps, "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else str(args.device),
        "prompt_len": args.prompt_len, "prompt_spread": args.prompt_spread, "gen_len": args.gen_len,
        "block_length": args.block_length,
        "quota": args.quota, "warmup": args.warmup, "repeats": args.repeats,
    }  # fmt: skip
    rows = []
    for batch_size in args.batch_sizes:
        for cache in args.caches:
            rows.append(run_config(model, args, batch_size, cache, floor_ms))
            print(f"batch {batch_size} cache {cache}: {rows[-1].wall_s:.2f}s", file=sys.stderr, flush=True)
    bare = bare_forward(model, args, floor_ms)
    print(render(rows, bare, meta))
    if args.json:
        result = {"meta": meta, "rows": [asdict(r) for r in rows], "bare_forward": bare}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
