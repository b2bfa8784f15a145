"""Elastic-Cache (arXiv 2510.14973, "Attention Is All You Need for KV Cache in Diffusion LLMs";
VILA-Lab/Elastic-Cache ``llada/generate.py`` ``generate_with_elastic_cache`` with the attention of
``llada/model/modeling_llada.py``, and the Dream port ``dream/model/generation_utils_elastic.py``
``_sample`` with ``dream/model/modeling_dream.py``) as a ``cache_policy`` plugin, with its sliding
window as ``choose_span``. Approximate.

- ``choose_span``: the sliding window, the first ``window_length`` masked positions of the row
  (the span runs from the first to the last of them). Once the row has decoded an EOS (the
  lowest one among the positions of the first step that decoded any; ``generation.eos.ids``),
  only masks at or before it are decoded.
- ``cache_policy``: the first forward runs the whole canvas and stores, per layer, every
  position's input hidden state, query, key and value. Every later forward feeds only the
  *tracked* positions (per layer, the ``track_num`` keys that received the most attention from
  the window in the previous forward, that forward's masks counted as zero, so that they are
  tracked only where fewer unmasked keys are left), the positions decoded in the previous step
  and the window (with ``block_caching: false`` every masked position, while only the window is
  decoded), against the stored K/V of everything else. At every layer the tracked positions'
  attention as the store had it is compared with their attention now (cosine similarity across
  heads per (tracked, key) pair, averaged); below ``gamma`` the row recomputes every position
  from the next layer on, its other positions resuming from their stored layer inputs
  (``ComputePlan.drift``, executed by ``dllm_decode/models/adaptive.py``). Masked positions
  outside the window keep the K/V of the last forward that computed them (the code's block
  caching of far-away MASK tokens).

The select rule and the score are other slots; the code decodes with Fast-dLLM's threshold rule
(every window position whose probability reaches 0.9, else the best: ``select_tokens:
threshold``) on the float64 softmax (``score: llada``; on Dream its ``sample_tokens``, ``score:
dream`` with ``alg: confidence_threshold``, equal at T = 0 in float64).

Differences from the code, which is batch 1: every row has its own window, tracked positions and
switch layer; once any row switches the batch runs full width, a row that has not switched
recomputing only its fed positions, so a row decodes alike alone and in a batch (a finished row
feeds nothing and is not drift-tested); left padding is never attended to nor tracked, and the
similarity is averaged over the row's own keys; ties in the tracked ranking (the zeroed masks,
when fewer than ``track_num`` keys are unmasked) go to the lowest columns, where the code's
``topk`` orders them by an unspecified rule that depends on the row's length (a padded row would
track other masks than alone); the drift test's attention weights are computed in at least
float32 (the code's in the model dtype); the Dream code's duplicate query rows are fed once
(they hold identical values); the EOS ids are ``generation.eos.ids`` (the code watches
``<|endoftext|>``). When every mask up to the EOS is decoded the code stops and leaves the later
masks as they are; here ``generation.eos.stop`` fills them with that EOS (the recipe turns it
on; without it the window moves on past the EOS), and an EOS decoded later before the first ends
the answer there, where the code decodes on behind it. The code's top-k mode (``threshold``
None) and classifier-free guidance are not offered.
"""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode.hookspecs import hookimpl
from dllm_decode.models.plan import ComputePlan, Drift
from dllm_decode.plugins import PluginMeta, PluginOptions


class Options(PluginOptions):
    window_length: int = Field(16, ge=1, le=1 << 20, description="beta: the sliding window, the first "
                               "window_length masked positions are decoded and queried (the code's default).")
    gamma: float = Field(0.9, ge=0.0, le=1.0, description="A row recomputes every position from the layer "
                         "after the one where its tracked positions' attention similarity falls below gamma.")
    track_num: int = Field(1, ge=1, le=1024, description="Most-attended positions tracked per layer.")
    block_caching: bool = Field(True, description="Query only the window's masks and reuse the cached K/V "
                                "of the masks beyond it; false: query every mask, decode the window.")


dllm_meta = PluginMeta(summary="Elastic-Cache: sliding-window queries against cached K/V, refreshed from "
                       "the layer where the most-attended tokens' attention drifts", options=Options,
                       exact=False, requires=("compute_plans", "bidirectional"), drops_rows=True)


@hookimpl
def check_recipe(recipe, slots):
    if "cache_policy" in slots and recipe.generation.cfg_scale > 0:
        return ["generation.cfg_scale: elastic_cache does not support classifier-free guidance"]
    return []


@hookimpl
def on_request_start(state, scratch):
    scratch.update(eos_at=torch.full((state.batch_size,), state.length, dtype=torch.long, device=state.device),
                   excluded=None, recomputed=0)


def decodable(state, scratch: dict) -> torch.Tensor:
    """(B, L) the masks the row may still decode: those at or before its first decoded EOS (all
    of them when none is left there, e.g. with eos.stop off)."""
    masked = state.masked
    limited = masked & (state.columns[None, :] <= scratch["eos_at"][:, None])
    return torch.where(limited.any(dim=1, keepdim=True), limited, masked)


def _first(mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k True columns of each row of ``mask`` (B, L) -> positions (B, k), padding (B, k)."""
    k = min(k, mask.shape[1])
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    return idx, ~mask.gather(1, idx)


@hookimpl
def choose_span(state, options, scratch):
    allowed = decodable(state, scratch)
    window = allowed & (allowed.cumsum(dim=1) <= options.window_length)
    cols = state.columns[None, :]
    L = state.length
    lo = torch.where(window, cols, L).amin(dim=1)
    hi = torch.where(window, cols + 1, 0).amax(dim=1)
    return torch.stack([torch.minimum(lo, hi), hi.clamp(min=0)], dim=1).clamp(min=state.gen_start)


def _tracked(state, options, scratch) -> torch.Tensor:
    """(B, L) bool: per layer the track_num positions that the previous forward's window attended
    to most, masked positions of that forward zeroed (as in the code: they are tracked only when
    fewer than track_num others are left) and padding never. Ties (the zeroed masks) go to the
    lowest columns: ``topk`` orders ties by an unspecified rule that depends on the row's length
    and place, so a padded row would track other masks than alone."""
    mass = state.store.batch_rows(state.store.attn_mass, state.batch_size)  # (B, n_layers, L)
    mass = mass.masked_fill(scratch["excluded"][:, None, :], 0.0)
    real = state.attention_mask[:, None, :].expand_as(mass)
    mass = mass.masked_fill(~real, float("-inf"))
    k = min(options.track_num, mass.shape[-1])
    # a stable descending sort keeps equal masses in column order; left padding sorts last and
    # is dropped where a row has fewer than track_num real positions
    top = mass.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # (B, n_layers, k)
    ok = real.gather(-1, top)
    hits = torch.zeros(state.masked.shape, dtype=torch.long, device=mass.device)
    return hits.scatter_add_(1, top.flatten(1), ok.flatten(1).long()) > 0


@hookimpl
def cache_policy(state, options, scratch):
    window = state.masked & state.in_span()                                 # (B, L)
    allowed = decodable(state, scratch)
    queried = window if options.block_caching else allowed | window
    # one host read: how many queries the widest row has (the span may come from another plugin)
    watch, watch_pad = _first(queried, max(1, int(queried.sum(dim=1).max())))
    if scratch["excluded"] is None:
        scratch["excluded"] = allowed         # the masks of this forward, never tracked after it
        drift = Drift(gamma=options.gamma, watch=watch, watch_pad=watch_pad)
        return ComputePlan(write_kv=True, write_hidden=True, drift=drift, name="elastic:refresh")
    probes = _tracked(state, options, scratch)
    scratch["excluded"] = allowed
    n_layers = state.store.attn_mass.shape[1]
    probe, probe_pad = _first(probes, n_layers * options.track_num)
    # a finished row (the engine's record) is not drift-tested (it would switch the batch to
    # full width) and feeds nothing: its tracked and last tokens would widen the rows left's steps
    live = ~state.done
    probe_pad = probe_pad | ~live[:, None]
    drift = Drift(gamma=options.gamma, watch=watch, watch_pad=watch_pad, probe=probe, probe_pad=probe_pad)
    # the window's predictions come from p (LLaDA) or p - 1 (Dream): both are in the index, the
    # executor feeds the one the model family needs
    before = torch.zeros_like(queried)
    before[:, :-1] = queried[:, 1:]
    fed = (probes | state.last.committed) & live[:, None]
    return ComputePlan.sparse(fed, out=queried | before, keys="store", write_hidden=True, drift=drift,
                              name="elastic")


@hookimpl
def after_step(state, scratch):
    rec = state.last
    eos = rec.committed & torch.isin(state.x, state.eos_ids)                 # (B, L) EOS written now
    first = torch.where(eos, state.columns[None, :], state.length).amin(dim=1)
    scratch["eos_at"] = torch.where(scratch["eos_at"] == state.length, first, scratch["eos_at"])
    store = state.store
    if store is not None and store.refresh_from is not None and store.attn_mass is not None:
        n_layers = store.attn_mass.shape[1]
        live = rec.active.long()
        start = store.batch_rows(store.refresh_from, state.batch_size)   # a dropped row: not active
        scratch["recomputed"] = scratch["recomputed"] + (n_layers - start) * live


@hookimpl
def on_request_end(state, scratch):
    # layers each row recomputed in full over the request (the code's "cache update frequency"
    # is this over n_layers x forwards); one host read at the end
    done = scratch.get("recomputed", 0)
    if isinstance(done, torch.Tensor):
        state.counters["elastic_full_layers"] = int(done.sum())
