"""Fast-dLLM's block KV cache (NVlabs/Fast-dLLM ``generate_with_prefix_cache`` /
``generate_with_dual_cache``) as a ``cache_policy`` plugin.

The block is the policy's span. When a row's span changes (a new block, or a new SlowFast
cycle) the row gets a full forward that refreshes every layer's K/V in the store. Until its span
changes again the row feeds only:

- ``mode: prefix``: the span start to the canvas end, against the cached K/V before the span
  (block and masked suffix recomputed every step);
- ``mode: dual``: the span itself; the K/V before and after it are reused, the span's own K/V
  are rewritten every step.

The reused K/V were computed when the span began, so the result is approximate (the paper's
argument: K/V of adjacent steps are nearly identical). Rows of a batch may sit in different
blocks: one batched feed covers every row's window and each row rewrites K/V only inside its
own (``ComputePlan.write_window``), so a row decodes exactly as it would alone.
``refresh_interval`` adds periodic refreshes (1: every forward, the exact limit). After a canvas
rule (``resize_canvas``) grew rows, the engine has cleared the store and every row is refreshed. Dream's
in-window logit shift at the window start is kept per row (``shift_from``); Fast-dLLM's Dream
sampler sidesteps it by committing the block's first token at the refresh step, which is the
``dream`` policy's ``first_token: true``.

Block-causal models are refused (``requires`` bidirectional): their exact cache is ``block_kv``,
and a refresh every span start would only recompute what it keeps exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dllm_decode.hookspecs import hookimpl
from dllm_decode.models.plan import ComputePlan
from dllm_decode.plugins import PluginMeta, PluginOptions


class Options(PluginOptions):
    mode: Literal["dual", "prefix"] = Field(
        "dual", description="dual: feed only the span, reuse K/V before and after it; prefix: feed "
        "from the span start to the end, reuse K/V before it.")
    refresh_interval: int | None = Field(
        None, ge=1, le=1 << 20, description="Also refresh every row's K/V every this many forwards "
        "(null: only when a span starts; 1: every forward, which gives exactly the no-cache tokens).")


dllm_meta = PluginMeta(summary="Fast-dLLM block KV cache: refresh when a span starts, then feed the "
                       "span (dual) or span + suffix (prefix) against cached K/V",
                       options=Options, exact=False, requires=("compute_plans", "bidirectional"), resizable=True, drops_rows=True)


@hookimpl
def on_request_start(scratch):
    scratch["span"] = None


def block_plan(span: torch.Tensor, prev: torch.Tensor | None, length: int, mode: str,
               live: torch.Tensor) -> ComputePlan:
    """The plan for one step: ``span`` (B, 2) this step's spans, ``prev`` (B, 2) the spans the
    store was last built for (None: nothing cached yet), ``live`` (B,) the rows still decoding
    (none: a refresh). A finished row's logits are read by nobody: it gets an empty window, so it does
    not stretch the batch's feed (its last span, often the canvas's last block, did)."""
    if prev is None:
        return ComputePlan.refresh()
    fresh = (span != prev).any(dim=1) & live                                # (B,) new span: refresh
    lo = torch.where(fresh, 0, span[:, 0])                                  # (B,) rewritten window
    hi = torch.where(fresh, length, span[:, 1] if mode == "dual" else length)
    lo, hi = torch.where(live, lo, length), torch.where(live, hi, 0)
    # one host read: the batched feed is a Python range
    start, end, all_fresh = torch.stack([lo.min(), hi.max(), (fresh | ~live).all().long()]).tolist()
    if all_fresh:
        return ComputePlan.refresh()
    return ComputePlan.dual_step(start, end, write_window=torch.stack([lo, hi], dim=1), shift_from=lo,
                                 name=f"kv_block:{mode}")


@hookimpl
def cache_policy(state, options, scratch):
    every = options.refresh_interval            # state.nfe: forwards so far in this request
    # a canvas rule that grew rows cleared the store and moved the columns: refresh
    resized = state.last is not None and state.last.resize is not None
    prev = None if resized or (every is not None and state.nfe % every == 0) else scratch["span"]
    plan = block_plan(state.span, prev, state.length, options.mode, ~state.done)
    scratch["span"] = state.span.clone()        # a span plugin may reuse its tensor in place
    return plan
