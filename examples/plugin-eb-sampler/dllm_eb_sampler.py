"""EB-Sampler (Ben-Hamu et al., "Accelerated Sampling from Masked Diffusion Models via Entropy
Bounded Unmasking", arXiv 2505.24857) as a dllm-decode plugin.

Each step, the eligible positions (masked, inside the span) are ordered by an error proxy:
entropy ascending (``order: entropy``) or the candidate's probability descending
(``order: confidence``). The step commits the longest prefix ``U`` of that order whose entropy
mass beyond its single most uncertain member stays within the budget::

    sum_{i in U} H_i - max_{i in U} H_i <= gamma        (and always at least one position)

``gamma = 0`` gives one token per step; a large ``gamma`` commits the whole span at once.

The rule needs every position's entropy, which the core's ``Candidates`` does not carry. So
this plugin fills two slots: ``score`` computes the candidates and puts the entropy in
``Candidates.extra`` (per queried position; the engine spreads it onto the canvas); and
``select_tokens`` reads it. ``dllm_meta.pairs`` declares that pairing, so a recipe that gives
this ``select_tokens`` another plugin's ``score`` is refused at load time, not mid-decode.
The span comes from another plugin (``choose_span: llada`` for semi-autoregressive blocks).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dllm_decode import Candidates, PluginMeta, PluginOptions, draws, gumbel_perturb, hookimpl, topk_mask

ENTROPY = "entropy"   # key of the per-position float64 entropy in Candidates.extra


class Options(PluginOptions):
    gamma: float = Field(
        0.001, ge=0.0, description="Error budget: commit the longest prefix whose summed entropy "
        "minus its largest entropy is at most gamma. 0.001 follows d2Cache's eb_sampler config; "
        "a community LLaDA port uses 0.1.")
    order: Literal["entropy", "confidence"] = Field(
        "entropy", description="Error proxy that orders the positions: entropy ascending (the "
        "paper), or candidate probability descending (d2Cache's variant).")


dllm_meta = PluginMeta(summary="EB-Sampler: commit the longest low-entropy prefix whose entropy "
                       "mass beyond its maximum stays within gamma (example third-party plugin)",
                       options=Options, pairs=(("select_tokens", "score"),),
                       resizable=True)   # keeps nothing across steps: a growing canvas changes nothing


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) float64 Shannon entropy in nats; -inf logits count as p = 0."""
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    return torch.special.entr(p).sum(dim=-1)


@hookimpl
def score(state, logits, positions, options):
    # Candidate tokens as the LLaDA baseline draws them (greedy at T = 0, float64 Gumbel-max
    # otherwise, from the row's own draws); the entropy is that of the noise-free distribution.
    T = state.config.temperature
    u = draws(state, positions, "eb_sampler.sample", logits.shape[-1]) if T > 0 else None
    tokens = gumbel_perturb(logits, T, u).argmax(dim=-1)                  # (B, q)
    h = entropy(logits)                                                     # (B, q)
    if options.order == "entropy":
        conf = -h
    else:
        probs = torch.softmax(logits.to(torch.float64), dim=-1)
        conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # per queried position (B, q): the engine spreads it onto the canvas for select_tokens
    return Candidates(tokens=tokens, confidence=conf, extra={ENTROPY: h})


def eb_counts(confidence: torch.Tensor, h: torch.Tensor, gamma: float) -> torch.Tensor:
    """How many positions each row commits.

    :param confidence: (B, L), ``-inf`` where not eligible; the commit order is descending.
    :param h: (B, L) entropies.
    :return: (B,) long, between 1 and the row's eligible count (0 for a row with none).
    """
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices  # (B, L)
    n = (confidence > float("-inf")).sum(dim=-1)                           # (B,)
    ranks = torch.arange(confidence.shape[-1], device=confidence.device)
    valid = ranks[None, :] < n[:, None]                                     # eligible prefix of the order
    hs = torch.where(valid, h.gather(-1, order), 0.0)                       # (B, L) entropies in order
    # The running maximum is taken along each row's own order (dim=-1), never across the batch.
    excess = hs.cumsum(dim=-1) - hs.cummax(dim=-1).values                   # (B, L), non-decreasing
    within = (excess <= gamma) & valid
    k = within.long().cumprod(dim=-1).sum(dim=-1)                           # longest passing prefix
    return torch.minimum(k.clamp(min=1), n)


@hookimpl
def select_tokens(candidates, options):
    h = candidates.extra.get(ENTROPY)
    if h is None:  # the recipe loader refuses such recipes; this guards direct use of the hook
        raise ValueError("eb_sampler.select_tokens: candidates carry no entropy; use score: eb_sampler")
    k = eb_counts(candidates.confidence, h, options.gamma)
    return topk_mask(candidates.confidence, k)
