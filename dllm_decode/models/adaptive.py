"""Layer-adaptive forwards: the executor of plans with ``write_hidden`` (Elastic-Cache, arXiv
2510.14973; VILA-Lab/Elastic-Cache, the attention of ``llada/model/modeling_llada.py`` and
``dream/model/modeling_dream.py`` with its ``x_cache`` / ``q_cache`` / ``track_token``).

Besides K/V, the store keeps every layer's input hidden state and queries (``store.h``,
``store.q``). A refresh (keys='fed', the whole canvas) computes and writes everything. A sparse
step (keys='store', ``plan.index``) starts *narrow*: only the fed positions run through the
layers, writing their layer inputs, queries and K/V in place and attending over the store.

With ``plan.drift``, at every layer each row that has not switched yet compares its probes'
attention before and after the layer's writes (``ComputePlan.drift``); below ``gamma`` the row
switches: from the next layer on every one of its positions is live (its input read from
``store.h`` where it was not fed) and written, as in a full forward. Once any row has switched
the batch runs full width; a row that has not switched keeps only its fed positions live (the
others are computed, read nothing fresh and write nothing), so each row computes what it
would alone. The watched queries' attention per key is summed into ``store.attn_mass``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import Sel, attend, position_ids_from_mask, rope_tables
from .output import ForwardOutput
from .plan import ComputePlan
from .store import CacheStore

if TYPE_CHECKING:  # pragma: no cover
    from .denoiser import Denoiser

__all__ = ["adaptive_forward"]


def _rows(t: Tensor, slots: Tensor) -> Tensor:
    """Rows ``slots`` (B, n) of a per-head tensor t (B, H, S, D) -> (B, H, n, D)."""
    B, H, _, D = t.shape
    return t.gather(2, slots[:, None, :, None].expand(B, H, slots.shape[1], D))


def _weights(q: Tensor, k: Tensor, kmask: Tensor) -> Tensor:
    """Attention probabilities (B, H, n, Lk) of queries q (B, H, n, D) over keys k (B, Hkv, Lk, D)
    and kmask (B, Lk), explicitly (SDPA does not return them), in at least float32."""
    ct = torch.promote_types(q.dtype, torch.float32)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.to(ct) @ k.to(ct).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    ok = kmask | ~kmask.any(-1, keepdim=True)       # a row without keys: finite, irrelevant
    return torch.softmax(scores.masked_fill(~ok[:, None, None, :], float("-inf")), dim=-1)


def _layer_flops(model: "Denoiser", B: int, n: int, n_keys: int) -> float:
    a = model.arch
    hd, kvd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return 2.0 * B * n * (a.d_model * (hd + 2 * kvd) + hd * a.d_model + 3 * a.d_model * a.mlp_hidden
                          + 2 * n_keys * hd)


def _check(plan: ComputePlan, store: CacheStore | None, L: int) -> None:
    if store is None:
        raise ValueError(f"plan {plan.name!r} writes the cache store, but store=None")
    if plan.keys == "store":
        if plan.index is None:
            raise ValueError(f"plan {plan.name!r}: a layer-adaptive step feeds an index (ComputePlan.sparse)")
        if not (store.has_kv and store.has_hidden):
            raise RuntimeError(f"plan {plan.name!r} resumes layers from the store, which holds no hidden "
                               "states; run a refresh with write_hidden=True first")
    elif plan.index is not None or plan.fed_range(L) != (0, L) or plan.out_start is not None:
        raise ValueError(f"plan {plan.name!r}: a layer-adaptive refresh feeds the whole canvas")


@dataclass
class _Run:
    """What the layers of one layer-adaptive forward share and update."""
    model: "Denoiser"
    plan: ComputePlan
    store: CacheStore
    pos: Tensor                   # (B, L) RoPE positions
    idx: Tensor                   # (B, f) fed canvas positions
    pad: Tensor                   # (B, f) top-up slots
    fed: Tensor                   # (B, L) really fed positions
    kmask: Tensor                 # (B, L) keys
    start: Tensor                 # (B,) layer from which the row recomputes everything
    narrow: bool                  # x holds the fed slots only (no row has switched)
    sel: Sel = None
    frozen: Tensor | None = None  # (B, n) positions of x that write nothing
    inv: Tensor | None = None     # (B, L) canvas -> narrow slot
    cos: Tensor | None = None
    sin: Tensor | None = None
    watch: Tensor | None = None   # (B, w) rows predicting the watched positions
    watch_ok: Tensor | None = None  # (B, w) real entries of watch
    mass: Tensor | None = None    # (B, n_layers, L)
    pairs: Tensor | None = None   # (B, t, L) probe / key pairs compared
    flops: float = 0.0

    def slots(self, positions: Tensor) -> Tensor:
        return positions if self.inv is None else self.inv.gather(1, positions)


def _start(model: "Denoiser", input_ids: Tensor, attention_mask: Tensor | None, plan: ComputePlan,
           store: CacheStore) -> _Run:
    a, dev = model.arch, input_ids.device
    B, L = input_ids.shape
    mask = torch.ones(B, L, dtype=torch.bool, device=dev) if attention_mask is None \
        else attention_mask.to(device=dev, dtype=torch.bool)
    pos = plan.position_ids.to(dev) if plan.position_ids is not None else \
        position_ids_from_mask(None if attention_mask is None else mask, B, L, dev)
    narrow = plan.keys == "store"
    if narrow:
        idx = plan.index.to(dev)                                            # (B, f)
        pad = torch.zeros_like(idx, dtype=torch.bool) if plan.index_pad is None else plan.index_pad.to(dev)
    else:
        idx = torch.arange(L, device=dev).expand(B, L)
        pad = torch.zeros(B, L, dtype=torch.bool, device=dev)
    drift = plan.drift
    watch = watch_ok = None
    if drift is not None:
        # the rows that predict the watched positions: p, or p - 1 for a shifted family (Dream);
        # they are fed even where the index marks them as padding
        watch = drift.watch.to(dev)
        watch_ok = torch.ones_like(watch, dtype=torch.bool) if drift.watch_pad is None else ~drift.watch_pad.to(dev)
        if model.spec.shift_logits:
            watch = (watch - 1).clamp(min=0)
        rows = torch.zeros(B, L, dtype=torch.long, device=dev).scatter_add_(1, watch, watch_ok.long()) > 0
        pad = pad & ~rows.gather(1, idx)
    f = idx.shape[1]
    fed = torch.zeros(B, L, dtype=torch.bool, device=dev).scatter_(1, idx, ~pad)
    store.ensure_kv(a.n_layers, B, a.n_kv_heads, L, a.head_dim, model.dtype, dev)
    store.ensure_hidden(a.n_layers, B, L, a.d_model, a.n_heads, a.head_dim, model.dtype, dev)
    store.kv_valid |= fed
    run = _Run(model=model, plan=plan, store=store, pos=pos, idx=idx, pad=pad, fed=fed,
               kmask=store.kv_valid & mask, narrow=narrow, sel=Sel(idx=idx), frozen=pad,
               start=torch.full((B,), a.n_layers if narrow else 0, dtype=torch.long, device=dev),
               inv=torch.zeros(B, L, dtype=torch.long, device=dev).scatter_(
                   1, idx, torch.arange(f, device=dev).expand(B, f)))
    run.cos, run.sin = rope_tables(pos.gather(1, idx), a.head_dim, a.rope_theta, model.dtype)
    run.watch, run.watch_ok = watch, watch_ok
    if drift is not None:
        run.mass = torch.zeros(B, a.n_layers, L, dtype=torch.promote_types(model.dtype, torch.float32), device=dev)
        if drift.probe is not None:
            ok = torch.ones_like(drift.probe, dtype=torch.bool) if drift.probe_pad is None else ~drift.probe_pad
            run.pairs = ok.to(dev)[:, :, None] & run.kmask[:, None, :]
    return run


def _widen(run: _Run, x: Tensor, i: int) -> Tensor:
    """Full width from layer i on: the fed slots' current x over the store's inputs."""
    a = run.model.arch
    wide = run.store.h[i].clone()
    run.sel.put_unless(wide, 1, x, run.pad)
    run.narrow, run.sel, run.inv = False, Sel(0, wide.shape[1]), None
    run.cos, run.sin = rope_tables(run.pos, a.head_dim, a.rope_theta, run.model.dtype)
    return wide


def _check_drift(run: _Run, i: int, before: Tensor, q: Tensor, K: Tensor) -> None:
    """The probes' attention now against before; rows below gamma switch from layer i + 1."""
    drift, n_layers = run.plan.drift, run.model.arch.n_layers
    after = _weights(_rows(q, run.slots(drift.probe.to(q.device))), K, run.kmask)   # (B, H, t, L)
    sim = F.cosine_similarity(before, after, dim=1)                         # (B, t, L): across heads
    n = run.pairs.sum((1, 2))
    score = torch.where(run.pairs, sim, 0).sum((1, 2)) / n.clamp(min=1)
    switch = (run.start == n_layers) & (n > 0) & (score < drift.gamma)
    run.start = torch.where(switch, i + 1, run.start)


def _layer(run: _Run, i: int, p, x: Tensor) -> Tensor:
    model, store, drift = run.model, run.store, run.plan.drift
    if run.narrow and bool((run.start <= i).any()):
        # a row switched at the previous layer: the batch runs full width from here on
        x = _widen(run, x, i)
    if not run.narrow:
        # positions whose input this forward computed: the fed ones, and every position of a
        # row that switched before this layer; the others resume from the store
        x = torch.where((run.fed | (run.start < i)[:, None])[..., None], x, store.h[i])
        run.frozen = ~(run.fed | (run.start <= i)[:, None])
    run.sel.put_unless(store.h[i], 1, x, run.frozen)
    q, k, v = model._qkv(p, p.attn_norm(x), run.cos, run.sin)
    probing = drift is not None and drift.probe is not None
    if probing:
        # the probes' attention as the store had it: their cached queries, the keys before
        # this layer's writes
        before = _weights(_rows(store.q[i], drift.probe.to(q.device)), store.k[i], run.kmask)
    for t, new in ((store.k[i], k), (store.v[i], v), (store.q[i], q)):
        run.sel.put_unless(t, 2, new, run.frozen)
    K, V = store.k[i], store.v[i]
    att = attend(q, K, V, run.kmask)                                        # (B, n, H*D)
    if probing:
        _check_drift(run, i, before, q, K)
    if drift is not None:
        w = _weights(_rows(q, run.slots(run.watch)), K, run.kmask)          # (B, H, w, L)
        run.mass[:, i] = (w * run.watch_ok[:, None, :, None]).sum((1, 2))
    x = x + p.o(att)
    x = x + model._mlp(p, p.ffn_norm(x))
    run.flops += _layer_flops(model, x.shape[0], x.shape[1], run.kmask.shape[1])
    return x


def adaptive_forward(model: "Denoiser", input_ids: Tensor, attention_mask: Tensor | None,
                     plan: ComputePlan, store: CacheStore | None) -> ForwardOutput:
    """Run ``plan`` (write_hidden, optionally drift) against ``store``; see the module doc."""
    B, L = input_ids.shape
    if model.spec.block_size:
        raise ValueError(f"plan {plan.name!r}: the layer-adaptive executor attends over the whole canvas; "
                         f"the {model.spec.family} model is block-causal")
    _check(plan, store, L)
    run = _start(model, input_ids, attention_mask, plan, store)
    x = F.embedding(input_ids.gather(1, run.idx), model.embed_weight())    # (B, f, d)
    for i, p in enumerate(model.block_parts()):
        x = _layer(run, i, p, x)
    f = run.idx.shape[1]
    if plan.keys == "store" and not run.narrow:
        x = x.gather(1, run.idx[..., None].expand(B, f, x.shape[-1]))      # back to the fed slots
    if plan.drift is not None:
        store.attn_mass = run.mass
    store.refresh_from = run.start
    store.flops += run.flops + 2.0 * B * f * model.arch.d_model * model.arch.vocab_size
    if plan.keys == "fed":
        logits = model._logits(x, plan, Sel(0, L), 0, L, L)
    else:
        # the slots fed for real, watched rows included (a shifted family's p - 1 predicts p)
        logits, positions = model._index_logits(x, plan.with_(index_pad=run.pad), run.idx, L)
        return ForwardOutput(logits, positions)
    return ForwardOutput(logits, plan.query_positions(L, B, device=input_ids.device))
