"""dLLM-Cache (maomaocun/dLLM-cache, arXiv 2506.06295; ALGORITHMS.md §5) as a ``cache_policy``
plugin: per-layer K/V, attention output and FFN output, split into prompt and response.

Forward ``n`` of a request (counting from 0, across blocks) recomputes the prompt when
``n % prompt_interval == 0`` and the response when ``n % response_interval == 0``; both means a
full forward. On the other forwards the cached sub-layer outputs are added to the current
residual stream, and V-verify picks ``floor(rho * G)`` response positions per row (the value
projections least similar by cosine to the cached ones) to recompute; the whole cached V of the
response is replaced by the fresh one, as upstream does. Upstream always recomputes the first
layer in full (``full_first_layer``). Approximate unless both intervals are 1.

With classifier-free guidance the conditional and unconditional rows share the batch and the
schedule; upstream's separate cached guidance residual is not offered.
"""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode.hookspecs import hookimpl
from dllm_decode.models.plan import ComputePlan
from dllm_decode.plugins import PluginMeta, PluginOptions


class Options(PluginOptions):
    prompt_interval: int = Field(100, ge=1, le=1 << 20, description="K_p: recompute the prompt's "
                                 "features every K_p forwards (upstream `prompt_interval_steps`).")
    response_interval: int = Field(7, ge=1, le=1 << 20, description="K_r: recompute the response's "
                                   "features every K_r forwards (upstream `gen_interval_steps`).")
    rho: float = Field(0.25, ge=0.0, le=1.0, description="V-verify: fraction of the response "
                       "recomputed on the other forwards (upstream `transfer_ratio`; 0 turns it off).")
    full_first_layer: bool = Field(True, description="Recompute layer 0 in full every forward, as "
                                   "upstream's hooks do (the SlowFast fork does not).")


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


@hookimpl
def cache_policy(state, options):
    # state.nfe: the forwards this request has run so far, i.e. this forward's index
    return feature_plan(options, state.nfe, state.gen_start, out_start=state.gen_start)
