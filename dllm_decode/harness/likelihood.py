"""Log-likelihood of a continuation under a masked-diffusion model, as LLaDA estimates it.

A masked-diffusion model gives no exact sequence probability; LLaDA scores a continuation by a
Monte-Carlo estimate of its ELBO (LLaDA paper, arXiv 2502.09992;
ML-GSAI/LLaDA ``get_log_likelihood.py``):

    log p(y | c)  >=  E_{l ~ U{1..T}} E_{M: |M| = l} [ (T / l) * sum_{i in M} log p(y_i | c, y with M masked) ]

where T is the continuation length and M a uniformly random set of l continuation positions.
Each sample masks l positions, runs one forward and sums the log-probabilities of the true
tokens there, weighted by T / l (the inverse masking ratio). The l of one forward's samples are
stratified: a random start, then evenly spaced around 1..T, so every batch sees low and high
masking ratios (lower variance than independent draws).

``is_greedy`` (lm-eval's "would greedy decoding produce it") comes from either one forward
with the whole continuation masked (``parallel``: every position's argmax is its true token) or
LLaDA's check (``iterative``: commit the single most confident masked position per forward,
T forwards, and compare the result).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor


def stratified_counts(n_target: int, n: int, generator: torch.Generator) -> Tensor:
    """``n`` mask counts in ``1..n_target``: a uniform random start, then steps of
    ``n_target / n`` around the cycle. -> (n,) long."""
    start = int(torch.randint(1, n_target + 1, (1,), generator=generator))
    spaced = torch.round(start + torch.arange(n, dtype=torch.float64) * (n_target / n)).long()
    return (spaced - 1) % n_target + 1


def random_masks(counts: Tensor, n_target: int, generator: torch.Generator) -> Tensor:
    """Row i masks ``counts[i]`` positions of ``n_target``, chosen uniformly: the positions of the
    ``counts[i]`` smallest of n_target uniform draws. -> (n, n_target) bool."""
    draws = torch.rand((counts.numel(), n_target), generator=generator)
    rank = draws.argsort(dim=1).argsort(dim=1)           # rank of each position's draw in its row
    return rank < counts[:, None]


def weighted_masked_nll(model: Any, seq: Tensor, n_context: int, masks: Tensor, mask_id: int) -> Tensor:
    """Per sample: (T / l) * the negative log-likelihood of the true tokens at the masked
    continuation positions, from one batched forward. ``seq`` (L,) is context + continuation,
    ``masks`` (n, T) the masked continuation positions. -> (n,) float64."""
    n, T = masks.shape
    target = seq[n_context:].expand(n, T)                                 # (n, T)
    x = torch.cat([seq[:n_context].expand(n, n_context), torch.where(masks, mask_id, target)], dim=1)
    logits = model(x)[:, n_context:].float()                              # (n, T, V), aligned
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None]).squeeze(-1)   # (n, T)
    nll = -(logp * masks).sum(dim=1).double()
    return nll * (T / masks.sum(dim=1).double())


@torch.inference_mode()
def mc_loglikelihood(model: Any, context: Sequence[int], continuation: Sequence[int], *, mask_id: int,
                     mc_num: int, mc_batch: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> float:
    """The Monte-Carlo ELBO estimate of log p(continuation | context), averaged over ``mc_num``
    samples run ``mc_batch`` per forward. Masks are drawn on the CPU from ``generator``, so the
    estimate is the same on every device."""
    if not continuation:
        return 0.0
    T = len(continuation)
    seq = torch.tensor([*context, *continuation], dtype=torch.long, device=device)
    batch = min(mc_batch, mc_num)
    total = 0.0
    for _ in range(mc_num // batch):
        masks = random_masks(stratified_counts(T, batch, generator), T, generator).to(device)
        total += float(weighted_masked_nll(model, seq, len(context), masks, mask_id).sum())
    return -total / (batch * (mc_num // batch))


@torch.inference_mode()
def is_greedy(model: Any, context: Sequence[int], continuation: Sequence[int], *, mask_id: int,
              mode: str = "parallel", device: torch.device | str = "cpu") -> bool:
    """Whether greedy decoding from ``context`` with ``len(continuation)`` masks yields it."""
    if mode == "off":
        return False
    if not continuation:
        return True
    P, T = len(context), len(continuation)
    target = torch.tensor(continuation, dtype=torch.long, device=device)
    x = torch.tensor([*context, *([mask_id] * T)], dtype=torch.long, device=device)[None]   # (1, P+T)
    if mode == "parallel":
        logits = model(x)[0, P:].float()
        logits[:, mask_id] = float("-inf")          # the mask id is never a decoded token
        return bool((logits.argmax(-1) == target).all())
    if mode != "iterative":
        raise ValueError(f"greedy_check must be 'parallel', 'iterative' or 'off', got {mode!r}")
    for _ in range(T):
        logits = model(x)[0, P:].float()
        logits[:, mask_id] = float("-inf")
        prob, tok = torch.softmax(logits, -1).max(-1)                    # (T,)
        masked = x[0, P:] == mask_id
        at = int(torch.where(masked, prob, -1.0).argmax())
        x[0, P + at] = tok[at]
    return bool((x[0, P:] == target).all())
