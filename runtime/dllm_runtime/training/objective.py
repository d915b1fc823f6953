"""LLaDA's masked-diffusion objective (Nie et al. 2025, "Large Language Diffusion Models", Alg. 1/2).

Per row: draw t ~ U(0, 1], mask each maskable token with probability p = (1 - eps) * t + eps,
predict the originals, and weight the cross-entropy of each masked token by 1 / p. The sum is
normalised by the row's number of maskable tokens (LLaDA SFT divides by the answer length; for
pre-training rows that is the row length), then averaged over the batch. This is an upper bound on
the negative log-likelihood per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MaskedBatch:
    noisy: torch.Tensor  # (B, L) ids with MASK at masked positions
    masked: torch.Tensor  # (B, L) bool
    p_mask: torch.Tensor  # (B,) masking probability of each row


def sample_t(batch: int, generator: torch.Generator, stratified: bool = True) -> torch.Tensor:
    """Masking ratios in (0, 1], one per row.

    Stratified (default): exactly one ratio in each interval [i/B, (i+1)/B), assigned to rows in a
    random order (rows of a length-bucketed batch are sorted by length). Same expectation as iid
    draws, lower loss variance, as in MDLM-style trainers.
    """
    u = torch.rand(batch, generator=generator)
    if stratified:
        u = (torch.randperm(batch, generator=generator) + u) / batch
    return 1.0 - u


def mask_tokens(
    ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, t: torch.Tensor, generator: torch.Generator, eps: float = 1e-3
) -> MaskedBatch:
    """Forward process q(x_t | x_0): independent masking of the maskable positions at rate p(t)."""
    p = (1.0 - eps) * t + eps
    masked = (torch.rand(ids.shape, generator=generator) < p[:, None]) & maskable
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    return MaskedBatch(noisy, masked, p)


def diffusion_loss(masked_logits: torch.Tensor, target: torch.Tensor, batch: MaskedBatch, maskable: torch.Tensor) -> torch.Tensor:
    """The 1/p-weighted masked cross-entropy, normalised per row by its maskable length.

    `masked_logits` `(N, V)` are the logits at the masked positions only, in row-major order of
    `batch.masked` (`hidden[batch.masked]`): the LM head is the largest matmul of a small model,
    and unmasked positions carry no loss, so the trainer never computes their logits.
    """
    rows = batch.masked.nonzero(as_tuple=True)[0]
    if masked_logits.shape[0] != rows.numel():
        raise ValueError(f"expected logits for {rows.numel()} masked positions, got {masked_logits.shape[0]}")
    ce = F.cross_entropy(masked_logits.float(), target[batch.masked], reduction="none")
    per_row = torch.zeros(target.shape[0], dtype=ce.dtype, device=ce.device).index_add_(0, rows, ce)
    return (per_row / batch.p_mask / maskable.sum(dim=1).clamp(min=1)).mean()


def certainty_loss(masked_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean predictive entropy at the masked positions whose argmax is already the target.

    dParallel's certainty forcing (Chen et al. 2025, "dParallel: Learnable Parallel Decoding for
    dLLMs"): threshold decoders commit a position only once its top probability clears the
    threshold, so a model that is right but unsure spends forwards for nothing. Sharpening only the
    *correct* predictions raises tokens per forward without rewarding confident mistakes; the
    diffusion loss beside it keeps the distribution honest elsewhere.
    """
    logp = F.log_softmax(masked_logits.float(), dim=-1)
    correct = logp.argmax(-1) == target
    if not bool(correct.any()):
        return logp.new_zeros(())
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy[correct].mean()


@torch.no_grad()
def masked_token_metrics(logits: torch.Tensor, target: torch.Tensor, select: torch.Tensor) -> tuple[float, float, int]:
    """Sum of unweighted CE, number of correct argmax predictions, and count over `select`."""
    sel = select.reshape(-1)
    lg = logits.float().reshape(-1, logits.shape[-1])[sel]
    tg = target.reshape(-1)[sel]
    if tg.numel() == 0:
        return 0.0, 0.0, 0
    ce = F.cross_entropy(lg, tg, reduction="sum").item()
    correct = (lg.argmax(-1) == tg).sum().item()
    return ce, float(correct), int(tg.numel())
