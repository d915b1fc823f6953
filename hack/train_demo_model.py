#!/usr/bin/env python3
"""Train dllm-serve's built-in demo model: a few-million-parameter LLaDA on GSM8K, on a CPU.

    .venv/bin/python hack/train_demo_model.py --output runtime/dllm_runtime/demo_model

Steps: (1) train a byte-level BPE tokenizer with LLaDA's special tokens and chat template on the
GSM8K train split; (2) tokenise GSM8K as LLaDA SFT rows (question = user turn, answer = assistant
turn, `<|eot_id|>`, `<|endoftext|>` padding) mixed with plain pre-training rows; (3) train
`dllm_runtime.models.LLaDAModel` (the serving class, so tensor names are the released ones) with
LLaDA's masked-diffusion objective, plus dParallel's certainty forcing for the last 300 steps (the
model becomes sure where it is right, so confidence-threshold decoders commit more per forward); (4) write a normal LLaDA model folder (config.json,
generation_config.json, model.safetensors, tokenizer files, README.md model card with the measured
losses). Deterministic for a given seed and thread count (CPU float reductions depend on threads).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))  # runnable from a source checkout without an install

from dllm_runtime.models import LLaDAModel, SpecialIds, load_model  # noqa: E402
from dllm_runtime.models.llada import LLaDAConfig  # noqa: E402
from dllm_runtime.tokenizer import load_tokenizer  # noqa: E402
from dllm_runtime.training import data as D  # noqa: E402
from dllm_runtime.training import tokenizer as T  # noqa: E402
from dllm_runtime.training.objective import (  # noqa: E402
    certainty_loss,
    diffusion_loss,
    mask_tokens,
    masked_token_metrics,
    sample_t,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="model folder to write")
    p.add_argument("--train-data", type=Path, default=REPO / "data/gsm8k_train.jsonl")
    p.add_argument("--heldout-data", type=Path, default=REPO / "data/gsm8k_test.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=2,
        help="torch CPU threads; results depend on it. 2 on a quiet 2-core box (~7500 tokens/s vs ~4100 with 1); use 1 on a shared, oversubscribed one",
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE pieces + 6 special tokens")
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--mlp-hidden", type=int, default=512)
    p.add_argument("--max-seq-len", type=int, default=256, help="rows longer than this are dropped")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--steps", type=int, default=2200)
    p.add_argument("--lr", type=float, default=1e-3, help="3e-3 left this model stuck at unigram predictions")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--certainty-weight", type=float, default=1.5, help="weight of dParallel's certainty-forcing term (entropy of correct masked predictions; 0: off)")
    p.add_argument("--certainty-from", type=int, default=1900, help="add the certainty term from this step on (the last 300 of 2200: a sharpening phase on the trained model)")
    p.add_argument("--plain-every", type=int, default=4, help="every k-th row is plain pre-training text (0: none)")
    p.add_argument("--extra-eos", type=int, default=32, help="up to this many extra EOS pads per batch")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training rows (smoke runs)")
    p.add_argument("--eval-rows", type=int, default=256, help="rows of train and held-out data for the final metrics")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="also save a loadable model folder here every --checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--save-dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        p.error("--steps and --batch-size must be positive, --warmup non-negative")
    return args


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean unweighted CE over masked response tokens
    accuracy: float
    content_loss: float  # same, excluding EOS padding
    content_accuracy: float
    tokens: int


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    train_qa = D.load_gsm8k(args.train_data, args.train_limit)
    heldout_qa = D.load_gsm8k(args.heldout_data, args.eval_rows)
    log(f"data: {len(train_qa)} train rows, {len(heldout_qa)} held-out rows")

    bpe = T.train_bpe(D.corpus_texts(train_qa), args.vocab_size)
    tids = T.save_hf_tokenizer(bpe, out)
    tok = load_tokenizer(out)  # the serving loader: train on exactly what serving will tokenise
    log(f"tokenizer: {tids.vocab_size} ids, bos {tids.bos} eos {tids.eos} mask {tids.mask} eot {tids.eot}")

    rows = D.build_rows(train_qa, tok, args.max_seq_len, args.plain_every)
    train_eval = D.build_rows(train_qa[: args.eval_rows], tok, args.max_seq_len, plain_every=0)
    heldout = D.build_rows(heldout_qa, tok, args.max_seq_len, plain_every=0)
    lengths = (rows.ids != tids.eos).sum(1)
    log(f"rows: {rows.ids.shape[0]} (dropped {rows.dropped} longer than {args.max_seq_len}), mean {lengths.float().mean():.0f} tokens")

    config = llada_config(args, tids)
    special = SpecialIds(mask=tids.mask, eos=tids.eos, pad=tids.eos, eot=tids.eot, bos=tids.bos)
    model = LLaDAModel(LLaDAConfig.from_dict(config), special)
    init_weights(model, args.n_layers, generator=torch.Generator().manual_seed(args.seed))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, d_model {args.d_model}, {args.n_layers} layers")

    def checkpoint(step: int) -> None:
        if args.checkpoint_dir is not None:
            save_model(model, config, tids, args.checkpoint_dir, args.save_dtype, tokenizer_from=out)
            (args.checkpoint_dir / "CHECKPOINT_STEP").write_text(f"{step}\n")

    history = train(model, rows, lengths, tids, args, checkpoint)
    train_time = time.time() - t_start

    gen = torch.Generator().manual_seed(args.seed + 1)
    final = {
        "train": evaluate(model, train_eval, tids.mask, gen.manual_seed(args.seed + 1)),
        "heldout": evaluate(model, heldout, tids.mask, gen.manual_seed(args.seed + 1)),
    }
    for split, r in final.items():
        log(f"eval {split}: masked-token loss {r.loss:.3f} acc {r.accuracy:.3f} | without EOS padding: loss {r.content_loss:.3f} acc {r.content_accuracy:.3f} ({r.tokens} tokens)")

    save_model(model, config, tids, out, args.save_dtype)
    reloaded = load_model(out, dtype="float32")
    saved = evaluate(reloaded, heldout, tids.mask, gen.manual_seed(args.seed + 1))
    log(f"eval heldout after {args.save_dtype} round trip: loss {saved.loss:.3f} acc {saved.accuracy:.3f}")
    metrics = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": n_params,
        "train_rows": int(rows.ids.shape[0]),
        "train_seconds": round(train_time, 1),
        "final": {k: asdict(v) for k, v in final.items()},
        "heldout_saved_dtype": asdict(saved),
        "history": history,
        "torch": torch.__version__,
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    from demo_model_card import render  # hack/demo_model_card.py, next to this script

    (out / "README.md").write_text(render(out))
    log(f"done in {fmt_s(time.time() - t_start)}: {out}")
    return 0


def llada_config(args: argparse.Namespace, tids: T.TokenizerIds) -> dict[str, object]:
    """config.json in the released LLaDA-8B format (same keys), scaled down; no auto_map (no remote code)."""
    return {
        "_name_or_path": "dllm-serve/llada-demo-gsm8k",
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": args.d_model,
        "embedding_dropout": 0.0,
        "embedding_size": tids.vocab_size,
        "eos_token_id": tids.eos,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "cpu",
        "init_fn": "normal",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": tids.mask,
        "max_sequence_length": 1024,
        "mlp_hidden_size": args.mlp_hidden,
        "mlp_ratio": max(1, args.mlp_hidden // args.d_model),
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_heads,
        "n_layers": args.n_layers,
        "pad_token_id": tids.eos,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 10000.0,
        "scale_logits": False,
        # The dtype `--dtype auto` loads in, not the file's: CPUs without AVX512-BF16/AMX run bf16
        # matmuls ~8x slower than fp32 (measured: 160 vs 20 ms per 208-token forward), and this model
        # exists for CPUs. The file stores --save-dtype (bf16: half the size, same held-out loss).
        "torch_dtype": "float32",
        "use_cache": False,
        "vocab_size": tids.vocab_size,
        "weight_tying": False,
    }


def init_weights(model: torch.nn.Module, n_layers: int, generator: torch.Generator, std: float = 0.02) -> None:
    """GPT-2 style: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2·layers)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            torch.nn.init.ones_(p)
            continue
        residual_out = name.endswith(".attn_out.weight") or (".blocks." in name and name.endswith(".ff_out.weight"))
        s = std / math.sqrt(2 * n_layers) if residual_out else std
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator) * s)


def batches(rows: D.Rows, lengths: torch.Tensor, args: argparse.Namespace, gen: torch.Generator):
    """Endless length-bucketed batches: shuffle, sort within pools of 32 batches, shuffle the batches.

    Each batch is cut to its longest row plus a random EOS tail (multiple of 16), which saves a third
    of the compute of fixed-length rows while still training EOS tails of varied length.
    """
    n, bs = rows.ids.shape[0], args.batch_size
    pool = bs * 32
    while True:
        order = torch.randperm(n, generator=gen)
        chunks = []
        for i in range(0, n - bs + 1, pool):
            idx = order[i : i + pool]
            idx = idx[torch.argsort(lengths[idx], stable=True)]
            chunks += [idx[j : j + bs] for j in range(0, len(idx) - bs + 1, bs)]
        for k in torch.randperm(len(chunks), generator=gen).tolist():
            idx = chunks[k]
            extra = int(torch.randint(0, args.extra_eos + 1, (1,), generator=gen))
            width = min(args.max_seq_len, int(math.ceil((int(lengths[idx].max()) + 1 + extra) / 16) * 16))
            yield rows.ids[idx, :width], rows.maskable[idx, :width]


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio · lr`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(
    model: LLaDAModel, rows: D.Rows, lengths: torch.Tensor, tids: T.TokenizerIds, args: argparse.Namespace, checkpoint=None
) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    data_gen = torch.Generator().manual_seed(args.seed + 10)
    mask_gen = torch.Generator().manual_seed(args.seed + 20)
    stream = batches(rows, lengths, args, data_gen)
    model.train()
    history: list[dict] = []
    t0 = time.time()
    tokens = 0
    window_loss, window_n = 0.0, 0
    for step in range(args.steps):
        ids, maskable = next(stream)
        t = sample_t(ids.shape[0], mask_gen)
        mb = mask_tokens(ids, maskable, tids.mask, t, mask_gen)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        hidden = hidden_states(model, mb.noisy, positions)
        masked_logits = head(model, hidden[mb.masked])
        loss = diffusion_loss(masked_logits, ids, mb, maskable)
        if args.certainty_weight and step >= args.certainty_from:
            loss = loss + args.certainty_weight * certainty_loss(masked_logits, ids[mb.masked])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens += ids.numel()
        window_loss += loss.item()
        window_n += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - t0
            rate = tokens / elapsed
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            entry = {"step": step + 1, "loss": round(window_loss / window_n, 4), "lr": lr_at(step, args), "tokens_per_s": round(rate), "elapsed_s": round(elapsed, 1)}
            history.append(entry)
            log(f"step {step + 1}/{args.steps} loss {entry['loss']:.3f} lr {entry['lr']:.2e} tok/s {rate:.0f} elapsed {fmt_s(elapsed)} eta {fmt_s(eta)}")
            window_loss, window_n = 0.0, 0
        if checkpoint is not None and (step + 1) % args.checkpoint_every == 0:
            checkpoint(step + 1)
    model.eval()
    return history


def hidden_states(model: LLaDAModel, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`LLaDAModel.forward` up to the final norm (full bidirectional attention, no padding).

    Training needs logits at the masked positions only; the final metrics and the saved-model check
    use the unmodified `model.forward`, so a divergence from the serving forward would show there.
    """
    t = model.model.transformer
    x = t.wte(ids)
    cos_sin = model.rotary.cos_sin(positions)
    for block in t.blocks:
        x = block(x, cos_sin, None)
    return t.ln_f(x)


def head(model: LLaDAModel, hidden: torch.Tensor) -> torch.Tensor:
    t = model.model.transformer
    return torch.nn.functional.linear(hidden, t.wte.weight if model.config.weight_tying else t.ff_out.weight)


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: D.Rows, mask_id: int, gen: torch.Generator, batch: int = 32) -> EvalResult:
    """Masked-token CE/accuracy at masking ratios spread evenly over (0, 1] (one ratio per row)."""
    was_training = model.training
    model.eval()
    n = rows.ids.shape[0]
    t_all = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    sums = [0.0, 0.0, 0, 0.0, 0.0, 0]
    for i in range(0, n, batch):
        ids, mk, ct = rows.ids[i : i + batch], rows.maskable[i : i + batch], rows.content[i : i + batch]
        mb = mask_tokens(ids, mk, mask_id, t_all[i : i + batch], gen)
        logits = model(mb.noisy, torch.arange(ids.shape[1]).expand_as(ids))
        for off, sel in ((0, mb.masked), (3, mb.masked & ct)):
            ce, correct, count = masked_token_metrics(logits, ids, sel)
            sums[off] += ce
            sums[off + 1] += correct
            sums[off + 2] += count
    model.train(was_training)
    return EvalResult(
        loss=sums[0] / max(1, sums[2]), accuracy=sums[1] / max(1, sums[2]),
        content_loss=sums[3] / max(1, sums[5]), content_accuracy=sums[4] / max(1, sums[5]), tokens=int(sums[2]),
    )


def save_model(
    model: LLaDAModel, config: dict, tids: T.TokenizerIds, out: Path, dtype: str, tokenizer_from: Path | None = None
) -> None:
    """model.safetensors with the released tensor names, config.json, generation_config.json."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy2(tokenizer_from / name, out / name)
    td = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    state = {k: v.detach().to(td).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen_cfg = {"_from_model_config": True, "bos_token_id": tids.bos, "eos_token_id": tids.eos, "pad_token_id": tids.eos}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")


def fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
