"""dLLM-Cache (maomaocun/dLLM-cache, arXiv 2506.06295; ALGORITHMS.md §5) as a ``cache_policy``
plugin: per-layer K/V, attention output and FFN output, split into prompt and response.

Forward ``n`` of a request (counting from 0, across blocks) recomputes the prompt when
``n % prompt_interval == 0`` and the response when ``n % response_interval == 0``; both means a
full forward. On the other forwards the cached sub-layer outputs are added to the current
residual stream, and V-verify picks ``floor(rho * G)`` response positions per row (the value
projections least similar by cosine to the cached ones) to recompute; the whole cached V of the
response is replaced by the fresh one, as upstream does. Upstream always recomputes the first
layer in full (``full_first_layer``). Approximate unless both intervals are 1.

With classifier-free guidance (``generation.cfg_scale > 0``) the unconditional canvas runs as
its own forward against a store of its own, with its own forward counter for K_p / K_r, as
upstream's separate "cfg" cache namespace does. The guidance residual ``cond - uncond`` is
recomputed in the first 5 forwards and every ``cfg_interval`` forwards; in between only the
conditional forward runs and the kept residual is reused (logits ``cond + w * residual``).
``cfg_interval: 1`` recomputes it every forward.
"""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode.hookspecs import hookimpl
from dllm_decode.models.plan import ComputePlan
from dllm_decode.plugins import PluginMeta, PluginOptions
from dllm_decode.state import Guided

#: upstream recomputes the guidance residual in the first forwards whatever the interval
CFG_WARMUP = 5


class Options(PluginOptions):
    prompt_interval: int = Field(100, ge=1, le=1 << 20, description="K_p: recompute the prompt's "
                                 "features every K_p forwards (upstream `prompt_interval_steps`).")
    response_interval: int = Field(7, ge=1, le=1 << 20, description="K_r: recompute the response's "
                                   "features every K_r forwards (upstream `gen_interval_steps`).")
    rho: float = Field(0.25, ge=0.0, le=1.0, description="V-verify: fraction of the response "
                       "recomputed on the other forwards (upstream `transfer_ratio`; 0 turns it off).")
    full_first_layer: bool = Field(True, description="Recompute layer 0 in full every forward, as "
                                   "upstream's hooks do (the SlowFast fork does not).")
    cfg_interval: int = Field(1, ge=1, le=1 << 20, description="With classifier-free guidance: "
                              "recompute the unconditional forward and the guidance residual every "
                              "cfg_interval forwards (and in the first 5); reuse the residual in "
                              "between (upstream `cfg_interval_steps`).")


dllm_meta = PluginMeta(summary="dLLM-Cache: prompt / response features refreshed every K_p / K_r "
                       "forwards, V-verify recomputes the least similar response tokens",
                       options=Options, exact=False, requires=("compute_plans",))


def feature_plan(options: Options, n: int, prompt_end: int, *, end: int | None = None,
                 key_limit: torch.Tensor | None = None, out_start: int | None = None) -> ComputePlan:
    """Forward ``n`` (from 0) of a request whose response starts at ``prompt_end``. ``end`` /
    ``key_limit`` cut the canvas (SlowFast's fast phase): the response cache is read and
    written over the cut range only."""
    refresh_prompt = n % options.prompt_interval == 0
    refresh_response = n % options.response_interval == 0
    if refresh_prompt and refresh_response:       # also the first forward: nothing cached yet
        plan = ComputePlan(end=end, write_kv=True, write_features=True, out_start=out_start,
                           name="dllm_cache:refresh")
    else:
        plan = ComputePlan.feature_step(prompt_end, refresh_prompt=refresh_prompt,
                                        refresh_response=refresh_response, rho=options.rho,
                                        full_layers=(0,) if options.full_first_layer else (),
                                        end=end, out_start=out_start)
    return plan if key_limit is None else plan.with_(key_limit=key_limit)


def guided(options: Options, state, n_cond: int, n_uncond: int, **cut) -> ComputePlan | Guided:
    """The plan of conditional forward ``n_cond``; under guidance, a :class:`Guided` that
    either reuses the guidance residual or runs unconditional forward ``n_uncond`` on its own
    schedule."""
    cond = feature_plan(options, n_cond, state.gen_start, **cut)
    if state.config.cfg_scale <= 0 or options.cfg_interval == 1:
        # every forward runs both halves on the same schedule: one batch of 2B rows does it
        return cond
    if n_cond >= CFG_WARMUP and n_cond % options.cfg_interval:
        return Guided(cond=cond, reuse=True)
    return Guided(cond=cond, uncond=feature_plan(options, n_uncond, state.gen_start, **cut))


@hookimpl
def cache_policy(state, options):
    # state.nfe: the forwards this request has run so far, i.e. this forward's index;
    # state.guide_nfe: the same for the unconditional canvas
    return guided(options, state, state.nfe, state.guide_nfe, out_start=state.gen_start)
