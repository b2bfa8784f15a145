"""SlowFast's out-of-span cache (LiangrunFlora/Slow-Fast-Sampling) as a
``cache_policy`` plugin.

In the accelerated stage the reference runs its first forward on the whole canvas and every
later one on the canvas cut at the span end; the positions after the cut keep the first
forward's logits, which are never committed (selection is span-only). Here a row in the
accelerated stage whose span has not changed since the previous step attends only to positions
before its span end (``ComputePlan.key_limit``, per row), and the engine leaves the positions
past the cut out of selection. Exploration and each accelerated stage's first forward see the
whole canvas. The rows' phases come from the policy's ``decide_phase`` (SlowFast's per-row
stages), so the plugin works with any policy that labels rows ``accelerate``.

``dllm_cache:`` adds dLLM-Cache feature reuse to every forward, as the SlowFast repository's
fork of dLLM-Cache does: a cut forward reads and writes the response cache over the cut range
only, and V-verify counts over it. The fork never forces layer 0; set ``full_first_layer:
false`` to match it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode.hookspecs import hookimpl
from dllm_decode.models.plan import ComputePlan
from dllm_decode.plugins import PluginMeta, PluginOptions

from dllm_decode.feature_cache import FeatureCacheOptions, feature_plan

ACCELERATE = "accelerate"


class Options(PluginOptions):
    dllm_cache: FeatureCacheOptions | None = Field(
        None, description="dLLM-Cache options (prompt_interval, response_interval, rho, "
        "full_first_layer) to reuse features in every forward as the SlowFast fork does; "
        "null: no feature cache.")


dllm_meta = PluginMeta(summary="SlowFast out-of-span cache: accelerated-stage forwards cut at the "
                       "span end (optionally over dLLM-Cache)", options=Options, exact=False,
                       requires=("compute_plans", "bidirectional"), drops_rows=True)


@hookimpl
def check_recipe(recipe, options):
    problems = []
    if recipe.decide_phase is None and recipe.policy is None:
        problems.append("cache_policy: slowfast_tail cuts rows in the accelerated stage; the recipe needs "
                        "a decide_phase plugin that labels rows 'accelerate' (e.g. policy: slowfast)")
    if options.dllm_cache is not None and options.dllm_cache.cfg_interval > 1 and recipe.generation.cfg_scale > 0:
        # a residual kept from a cut forward is undefined past the cut, and a later uncut step
        # would read it there
        problems.append("cache_policy.dllm_cache.cfg_interval: the cached guidance residual is not "
                        "available with slowfast_tail's cut forwards; use cfg_interval: 1")
    return problems


@hookimpl
def on_request_start(scratch):
    scratch.update(prev_span=None, prev_accel=None)


def tail_limits(state, scratch) -> torch.Tensor:
    """(B,) per-row key limit: the span end for rows in an accelerated stage past its first
    forward, else the canvas length."""
    phase = state.phase_rows
    if phase is None or ACCELERATE not in phase.names:
        raise ValueError("slowfast_tail needs per-row phases naming 'accelerate' from decide_phase "
                         f"(got {state.phase!r}); use it with policy: slowfast")
    accel = phase.rows == phase.code(ACCELERATE)                             # (B,)
    span = state.span
    if scratch["prev_span"] is None:
        cut = torch.zeros_like(accel)
    else:
        cut = accel & scratch["prev_accel"] & (span == scratch["prev_span"]).all(dim=1)
    scratch["prev_span"], scratch["prev_accel"] = span.clone(), accel
    return torch.where(cut, span[:, 1], state.length)


@hookimpl
def cache_policy(state, options, scratch):
    limit = tail_limits(state, scratch)                                     # (B,)
    # A finished row (no mask left) is read by nobody; its stale limit (a finished row is back in
    # explore, uncut) must not keep the batch's feed at the canvas end while the others are cut:
    # it takes the live rows' widest limit (not 0: its logits must stay finite for the engine's
    # check). With no row live it keeps its own.
    live = ~state.done                                                         # (B,)
    widest = torch.where(live, limit, 0).max()
    limit = torch.where(live | ~live.any(), limit, widest)
    # the one host read: the batched feed's length, and whether any row is cut at all
    end, any_cut = torch.stack([limit.max(), (limit < state.length).any().long()]).tolist()
    key_limit = limit if any_cut else None
    if options.dllm_cache is not None:
        return feature_plan(options.dllm_cache, state.nfe, state.gen_start, end=end,
                                          key_limit=key_limit, out_start=state.gen_start)
    return ComputePlan.window(0, end, key_limit=key_limit, out_start=state.gen_start, name="slowfast_tail")
