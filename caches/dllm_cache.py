"""dLLM-Cache (maomaocun/dLLM-cache, arXiv 2506.06295) as a ``cache_policy``
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

from dllm_decode import hookimpl
from dllm_decode.feature_cache import FeatureCacheOptions, guided
from dllm_decode.plugins import PluginMeta

Options = FeatureCacheOptions


dllm_meta = PluginMeta(summary="dLLM-Cache: prompt / response features refreshed every K_p / K_r "
                       "forwards, V-verify recomputes the least similar response tokens",
                       options=Options, exact=False, requires=("compute_plans", "bidirectional"), drops_rows=True)


@hookimpl
def cache_policy(state, options):
    # state.nfe: the forwards this request has run so far, i.e. this forward's index;
    # state.guide_nfe: the same for the unconditional canvas
    return guided(options, state, state.nfe, state.guide_nfe, out_start=state.gen_start)
