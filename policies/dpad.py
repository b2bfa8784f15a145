"""DPad, the diffusion scratchpad (arXiv 2508.14148; Crys-Chen/DPad ``llada/generate_dropout.py``
``suffix_dropout`` / ``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache``,
``llada/sampler.py``, and the Dream port ``dream/model/generation_utils_block.py``), as a
``cache_policy`` plugin: a rule over which positions of the canvas take part in the forward.

When a row's span starts (a new semi-autoregressive block from ``choose_span``), DPad draws
which masked positions after the span end it keeps for that span; the rest of the suffix is
dropped: neither fed nor attended to until the next span. The kept set is the span, everything
before it, and a sample of the suffix whose density decays with the distance ``d`` (0 for the
first position after the span):

- ``sampler: gaussian`` (distance-decay dropout): position ``d`` is kept when a uniform draw is
  below ``scale * exp(-x_d^2 / 2) / sqrt(2 pi)``, ``x_d = linspace(0, sigma, window)[d]`` (a
  Gaussian window whose end lies ``sigma`` standard deviations out, computed in float32 as the
  code does); nothing at ``d >= window``.
- ``sampler: uniform`` (the code's ``UniformSampler``, the paper's sliding window when
  ``preserved >= window``): ``preserved`` positions drawn uniformly without replacement among
  the first ``window``; the whole suffix when ``preserved`` is at least its length.

Each step then feeds only kept positions, with their own RoPE positions (the code's
``q_indices`` / ``k_indices``), and attention runs among them (``ComputePlan.sparse`` with
``keep``). ``kv_cache`` composes it with Fast-dLLM's caches as the code does: ``prefix`` (a
kept forward at the span start refreshes the K/V of every kept position, then each step feeds
the span and the kept suffix against the cached prefix) and ``dual`` (then only the span is fed,
prefix and kept suffix read from the cache). The score and the select rule are other slots
(``llada`` / ``dream`` scores, LLaDA's schedule or the ``threshold`` rule), as DPad composes with
parallel decoding; the span is ``choose_span``'s (DPad's block is the block of the loop).

Differences from the code: the draws are each row's own keyed uniforms
(``dllm_decode.draws``, stream ``dpad.keep``, at the step the span starts), so the kept sets
have the code's distribution but not torch's global-RNG samples, and a row keeps the same set
alone or in a batch (the code is batch 1: it draws one set and expands it over the batch); rows
move through blocks on their own, each with its own set; the early termination (``-e``: once a
block with an EOS is complete, everything after it becomes EOS) is the engine's
``generation.eos.stop``, which fills as soon as an EOS has no mask before it; a window longer
than the generation is allowed (only its first positions are ever used; the code asserts
``window <= gen_length``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from dllm_decode import ComputePlan, PluginMeta, PluginOptions, hookimpl
from dllm_decode.noise import draws
from dllm_decode.sampling import topk_mask


class Options(PluginOptions):
    sampler: Literal["gaussian", "uniform"] = Field(
        "gaussian", description="gaussian: distance-decay dropout; uniform: `preserved` positions drawn "
        "uniformly in the window (the code's `dropout` gaussian / uniform).")
    window: int = Field(256, ge=1, le=1 << 20, description="Suffix positions after the span end that may be "
                        "kept (the code's `-w`, default 256).")
    sigma: float = Field(4.0, gt=0.0, le=64.0, description="Gaussian: the window's end lies sigma standard "
                         "deviations from the span end (the code's `-k`, default 4).")
    scale: float = Field(2.0, gt=0.0, le=1000.0, description="Gaussian: scale of the keep probability "
                         "scale * N(x; 0, 1) (the code's `-sc`, default 2.0).")
    preserved: int = Field(0, ge=0, le=1 << 20, description="Uniform: suffix positions kept (the code's "
                           "`-nt`, default 0); the whole suffix when it is at least the suffix length.")
    kv_cache: Literal["none", "prefix", "dual"] = Field(
        "none", description="none: feed every kept position each step; prefix / dual: Fast-dLLM's prefix "
        "or dual KV cache over the kept positions, refreshed when the span starts (the code's -c / -dc).")


dllm_meta = PluginMeta(summary="DPad: suffix dropout, only a distance-decayed sample of the masked suffix "
                       "is fed and attended to (optionally with a prefix / dual KV cache)",
                       options=Options, exact=False, requires=("compute_plans",), drops_rows=True)


@hookimpl
def on_request_start(scratch):
    scratch.update(span=None, keep=None)


def gaussian_keep_probability(window: int, sigma: float, scale: float, device=None) -> torch.Tensor:
    """(window,) float32: the keep probability at distances 0 .. window - 1 (the code's pdf)."""
    x = torch.linspace(0.0, sigma, window, dtype=torch.float32, device=device)
    return scale * torch.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)


def kept_positions(state, options: Options, end: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: every position before ``end`` (B,) and the sampled suffix after it."""
    cols = state.columns[None, :]                                           # (1, L)
    dist = cols - end[:, None]                                              # (B, L) distance past the span
    suffix = dist >= 0
    u = draws(state, None, "dpad.keep")                                     # (B, L) float64
    if options.sampler == "gaussian":
        pdf = gaussian_keep_probability(options.window, options.sigma, options.scale, u.device)
        inside = suffix & (dist < options.window)
        sampled = inside & (u < pdf[dist.clamp(0, options.window - 1)])
    else:
        # a uniform subset of `preserved` among the first `window`: the smallest draws there
        inside = suffix & (dist < options.window)
        k = torch.full_like(end, options.preserved)
        sampled = topk_mask(torch.where(inside, -u, float("-inf")), k)
        whole = options.preserved >= state.length - end                    # (B,) keep the whole suffix
        sampled = torch.where(whole[:, None], suffix, sampled)
    return ~suffix | sampled


@hookimpl
def cache_policy(state, options, scratch):
    span, prev = state.span, scratch["span"]
    fresh = torch.ones_like(span[:, 0], dtype=torch.bool) if prev is None else (span != prev).any(dim=1)
    keep = kept_positions(state, options, span[:, 1])
    if prev is not None:
        # a row keeps its set until its span changes
        keep = torch.where(fresh[:, None], keep, scratch["keep"])
        # A finished row (no mask left) is read by nobody: it keeps its prompt alone (no live row
        # keeps less) and refreshes nothing, so it does not widen the batch's feed. Its span moves
        # when it finishes, and the fresh set it drew then (the whole canvas) did, every step after.
        live = ~state.done                                                      # (B,)
        keep = torch.where(live[:, None], keep, state.columns[None, :] < state.gen_start)
        fresh = fresh & live
    scratch.update(span=span.clone(), keep=keep)       # a span plugin may reuse its tensor in place
    mode = options.kv_cache
    if mode == "none":
        return ComputePlan.sparse(keep, keep=keep, name="dpad")
    if prev is None:
        # the first forward fills the store: every kept position, attending among themselves
        return ComputePlan.sparse(keep, keep=keep, name=f"dpad:{mode}:refresh").with_(write_kv=True)
    cols = state.columns[None, :]
    window = cols >= span[:, :1]
    if mode == "dual":
        window = window & (cols < span[:, 1:])
    # a row whose span changed refreshes every kept position; the others feed their window
    fed = keep & (window | fresh[:, None])
    # a Dream window start whose predecessor is not fed keeps its own logit (the in-window shift)
    return ComputePlan.sparse(fed, keys="store", keep=keep, name=f"dpad:{mode}").with_(shift_from=span[:, 0])
