"""dLLM-Cache's refresh schedule, shared by the ``dllm_cache`` cache and ``slowfast_tail``'s
feature reuse: its options, and the compute plan of each forward (upstream
maomaocun/dLLM-cache, ``dllm_cache/cache/Config.py`` and ``hooks/cache_hook_LLaDA.py``)."""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode.models.plan import ComputePlan
from dllm_decode.plugins import PluginOptions
from dllm_decode.guidance import Guided

#: upstream recomputes the guidance residual in the first forwards whatever the interval
CFG_WARMUP = 5


class FeatureCacheOptions(PluginOptions):
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



def feature_plan(options: FeatureCacheOptions, n: int, prompt_end: int, *, end: int | None = None,
                 key_limit: torch.Tensor | None = None, out_start: int | None = None) -> ComputePlan:
    """Forward ``n`` (from 0) of a request whose response starts at ``prompt_end``. ``end`` /
    ``key_limit`` cut the canvas (SlowFast's fast phase): the response cache is read and
    written over the cut range only."""
    refresh_prompt = n % options.prompt_interval == 0
    refresh_response = n % options.response_interval == 0
    if refresh_prompt and refresh_response:       # also the first forward: nothing cached yet
        plan = ComputePlan.refresh(features=True, end=end, out_start=out_start, name="dllm_cache:refresh")
    else:
        plan = ComputePlan.feature_step(prompt_end, refresh_prompt=refresh_prompt,
                                        refresh_response=refresh_response, rho=options.rho,
                                        full_layers=(0,) if options.full_first_layer else (),
                                        end=end, out_start=out_start)
    return plan if key_limit is None else plan.with_(key_limit=key_limit)


def guided(options: FeatureCacheOptions, state, n_cond: int, n_uncond: int, **cut) -> ComputePlan | Guided:
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
