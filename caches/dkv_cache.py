"""dKV-Cache-Decode (arXiv 2505.15781; horseee/dKV-Cache) as a ``cache_policy`` plugin: delayed
K/V caching, for the LLaDA family (``generation_utils/llada_dkv_cache_decode.py``) and the Dream
family (``generation_utils/dream_generation_utils.py``, ``cache_type="decoded"``,
``shift_type="un"``, the README's and ``dream_generate.py --decode``'s settings).

A position's K/V are reused once the token its output predicts is decoded, and only one step
later ("delayed"): a token decoded at step ``i`` is recomputed once more at step ``i + 1``, now
as the decoded token, and frozen from step ``i + 2`` on. Each cached step therefore feeds the
positions whose outputs predict a position that was masked when the previous step began (LLaDA:
those positions themselves; Dream, whose output at ``p`` predicts ``p + 1``: the ones just
before them), writes their fresh K/V to the store, and attends to the stored K/V of every other
position (``ComputePlan.subset``, RoPE at each token's own position). Steps are counted from the
start of a row's span (the semi-autoregressive block): step ``i`` of a span is a full forward
that refreshes every position's K/V when ``i % refresh_interval == 0``, and for the LLaDA family
also at ``i == 1`` (the LLaDA code's first forward of a block caches nothing, so its second is
full too); the Dream code caches from its first forward. A new span starts over.

Approximate: the reused K/V were computed against an older canvas. ``refresh_interval: 1``
refreshes every step and gives exactly the tokens of no cache.

Code-faithful details: the Dream code builds its first cached set with the canvas's last column
looking at itself and every later one with it looking at column 0 (a wrap-around), so the last
canvas position is recomputed at the request's second step and reused from then on; kept.
Deviations, all invisible at batch 1: rows keep their own step counters and block starts (the
code holds the batch in one block); rows of a batched forward that are refreshed while others
are not are fed whole, and a row whose subset is shorter than the batch's is topped up with
query-only positions that write nothing (``ComputePlan.subset``), so each row computes what it
would alone; left padding uses the engine's positions and key mask (the LLaDA code attends to
pads; its README allows batches with padding). Under classifier-free guidance (which the LLaDA
code refuses with the cache) both halves use the same positions: their canvases hold the same
masks.
"""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode.hookspecs import hookimpl
from dllm_decode.models.plan import ComputePlan
from dllm_decode.plugins import PluginMeta, PluginOptions


class Options(PluginOptions):
    refresh_interval: int = Field(
        8, ge=1, le=1 << 20, description="Refresh every position's K/V at the span steps i with "
        "i % refresh_interval == 0 (upstream `cache_reloading_step` for LLaDA, `cache_steps` for "
        "Dream; 8 as in the README's LLaDA example, which uses 16 for Dream). 1: every step, the "
        "exact limit.")


dllm_meta = PluginMeta(summary="dKV-Cache-Decode: delayed K/V caching, decoded tokens frozen one step "
                       "after decoding, full refresh every refresh_interval steps of a block",
                       options=Options, exact=False, requires=("compute_plans",), drops_rows=True)


@hookimpl
def on_request_start(scratch):
    scratch.update(span=None, i=None)


def span_steps(span: torch.Tensor, scratch: dict) -> torch.Tensor:
    """(B,) each row's step index since its span began (0 at a new span)."""
    if scratch["span"] is None:
        i = torch.zeros(span.shape[0], dtype=torch.long, device=span.device)
    else:
        i = torch.where((span != scratch["span"]).any(dim=1), 0, scratch["i"] + 1)
    scratch.update(span=span.clone(), i=i)      # a span plugin may reuse its tensor in place
    return i


def delayed_queries(state, shift: int) -> torch.Tensor:
    """(B, L) bool: the positions whose outputs predict a position that was masked when the
    previous step began (masked now, or committed by that step)."""
    was_masked = state.masked | (state.commit_step == state.step - 1)      # (B, L)
    if shift == 0:
        return was_masked
    # the output at p predicts p + 1; the last column predicts nothing and is reused, except at
    # the request's second step (the Dream code's first cached set, see the module docstring)
    last = torch.full_like(was_masked[:, :1], state.step == 1)
    return torch.cat([was_masked[:, 1:], last], dim=1)


@hookimpl
def cache_policy(state, options, scratch):
    i = span_steps(state.span, scratch)                                     # (B,)
    shift = getattr(state.store, "shift", 0)
    full = i % options.refresh_interval == 0
    if shift == 0:
        full = full | (i == 1)
    # A finished row (no mask left) is read by nobody: no refresh and no query, so it does not
    # widen the batch's subset (its span moves as it finishes, which had made it refresh whole).
    live = ~state.done                                                      # (B,)
    full = full & live
    # host reads: whether every row refreshes (then one plain refresh forward), and the
    # subset's width (in ComputePlan.subset); both while building the plan, not in the forward
    if bool((full | ~live).all()):
        return ComputePlan.refresh(name="dkv:refresh")
    queries = (delayed_queries(state, shift) | full[:, None]) & live[:, None]   # refreshed rows: whole
    return ComputePlan.subset(queries, shift=shift, name="dkv")
