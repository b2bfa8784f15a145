"""Pure tensor functions shared by policies: noise, schedules, batched top-k.

Kept free of state so that each is testable alone and the hot step stays a pure function.
"""

from __future__ import annotations

import torch


def gumbel_perturb(logits: torch.Tensor, temperature: float,
                   noise: torch.Tensor | torch.Generator | None = None) -> torch.Tensor:
    """Perturb logits so that their argmax is a sample from ``softmax(logits / temperature)``.

    Uses LLaDA's form ``exp(logits) / (-log u) ** T`` in float64: low-precision Gumbel-max
    degrades generation quality (arXiv 2409.02908). Returns the logits unchanged at T = 0.
    ``noise``: the uniforms ``u`` (shaped like ``logits``; per-row ones from
    :func:`dllm_decode.noise.draws`), or a generator to draw them from. Shape is preserved:
    ``(..., V)``.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = noise if isinstance(noise, torch.Tensor) else torch.rand(
        logits.shape, dtype=torch.float64, device=logits.device, generator=noise)
    return logits.exp() / (-torch.log(u)) ** temperature


def front_loaded_counts(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each of ``steps`` steps for ``n_masked`` (B,) masks, LLaDA style.

    Even split with the remainder on the earliest steps. Returns ``(B, steps)`` long.
    """
    base = n_masked // steps                          # (B,)
    rem = n_masked % steps                            # (B,)
    idx = torch.arange(steps, device=n_masked.device)  # (steps,)
    return base[:, None] + (idx[None, :] < rem[:, None]).long()


def count_at_step(n_masked: torch.Tensor, steps: int, step: torch.Tensor) -> torch.Tensor:
    """Entry ``step`` (B,) of :func:`front_loaded_counts` without building the table."""
    return n_masked // steps + (step < n_masked % steps).long()


def topk_mask(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, L) bool marking each row's ``k[b]`` highest confidences.

    A stable descending sort breaks ties by the lower column, so the result is deterministic.
    ``-inf`` entries are never chosen: rows ask for at most as many as they have eligible.
    """
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices  # (B, L)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    finite = confidence > float("-inf")
    return (ranks < k[:, None]) & finite


def token_probability(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(float64 logits) at ``tokens``: (B, q, V), (B, q) -> (B, q) float64."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter (Dream / HF form): keep the smallest prefix of the sorted distribution whose
    cumulative probability exceeds ``top_p``, always the best token; the rest get the dtype's
    lowest value. ``(..., V)`` -> same shape."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()      # shift right: the token crossing top_p stays
    drop[..., 0] = False
    remove = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (ties with the k-th kept too); ``(..., V)``."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def gumbel_topk_keys(scores: torch.Tensor, temperature: float, gumbel: torch.Tensor) -> torch.Tensor:
    """Keys whose top-n is a draw of n positions without replacement from softmax(scores / T).

    The Gumbel-top-k trick: batched, with a different n per row, and never short of candidates
    (``torch.multinomial`` refuses rows with fewer non-zero weights than samples). ``gumbel``:
    standard Gumbel noise shaped like ``scores``. ``-inf`` scores stay ``-inf``."""
    return scores.to(torch.float64) / temperature + gumbel


def threshold_commit(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) confidences (-inf where not eligible) -> (B, L) bool: every entry >= threshold,
    plus each row's best entry (Fast-dLLM's parallel decoding rule)."""
    best = topk_mask(confidence, torch.ones(confidence.shape[0], dtype=torch.long, device=confidence.device))
    return best | ((confidence >= threshold) & (confidence > float("-inf")))


def dream_sample_tokens(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None,
                        alg: str, gumbel: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``sample_tokens`` (``generation_utils.py``; d2Cache's sampler is the same): (B, q, V)
    logits -> tokens (B, q) long, confidence (B, q) float64.

    At T > 0 the token is drawn by Gumbel-max over the filtered logits (``gumbel``: (B, q, V)
    standard Gumbel noise), the same distribution as Dream's ``torch.multinomial`` on their
    softmax but drawn from per-row noise."""
    logits = logits.to(torch.float64)
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)                                   # (B, q, V)
    if temperature > 0:
        x0 = (logits + gumbel).argmax(dim=-1)                               # (B, q)
        conf = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        conf, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return x0, conf
