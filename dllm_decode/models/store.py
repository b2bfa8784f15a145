"""Per-request cache store: the tensors compute plans read and write.

One `CacheStore` per request (per decoding state), created by whoever runs the request and
handed to every forward of that request. There is no module-level cache anywhere (dLLM-Cache's
process-wide singleton is the anti-pattern this replaces), so two decoders never interfere.

Layout, per transformer layer, indexed by absolute canvas position:
    k, v   (B, H_kv, L, D)  keys after RoPE (positions of a canvas slot never change within a
                            request, so rotating once at write time is exact), values
    attn   (B, L, d_model)  attention sub-layer output after the output projection
    ffn    (B, L, d_model)  FFN sub-layer output
    h      (B, L, d_model)  the layer's input hidden state          (plans with write_hidden)
    q      (B, H, L, D)     queries after RoPE                       (plans with write_hidden)
plus `kv_valid` (B, L): which positions hold K/V that were actually computed; attention over
the store never uses a slot nobody wrote, `flops`: what the request's forwards computed, and
`attention`: the head-mean attention probabilities of the last forward whose plan asked for
them (ComputePlan.attention; d2Cache's rollout reads them at its next step).
A plan with `drift` (Elastic-Cache) also leaves `attn_mass` (B, n_layers, L), the attention its
watched queries paid each key at each layer, and `refresh_from` (B,), the layer from which each
row recomputed every position (n_layers: none).

`shift` is the model's logit shift (0: the output at position p predicts p, LLaDA family; 1: it
predicts p + 1, Dream family): a cache choosing which positions to recompute (dKV-Cache,
d2Cache) feeds the positions whose outputs predict the ones it wants.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["CacheStore"]

# What widen() grows, and along which dim: per-layer lists, then single tensors.
_LAYERED = (("k", 2), ("v", 2), ("q", 2), ("attn", 1), ("ffn", 1), ("h", 1))
_SINGLE = (("kv_valid", 1), ("attn_mass", 2))


def _leads(t: Tensor, buf: Tensor | None, dim: int, n: int) -> bool:
    """`t` is still the leading part of `buf` along `dim` (nobody replaced it), and `buf` holds
    at least n positions there."""
    return (buf is not None and buf.shape[dim] >= n and t.data_ptr() == buf.data_ptr()
            and t.stride() == buf.stride() and t.shape == buf.narrow(dim, 0, t.shape[dim]).shape)


def _grown(t: Tensor, dim: int, L: int, buf: Tensor | None) -> tuple[Tensor, Tensor]:
    """`t` grown along `dim` to L positions, the new ones zero -> (it, the buffer it views).
    When `t` is still the leading part of `buf` and `buf` has room, no copy: `buf` past `t` was
    zeros when allocated and nothing writes past a view. Else a buffer with room for half as many
    positions again, so a canvas widened block by block copies O(L) in all, not O(L^2)."""
    if _leads(t, buf, dim, L):
        return buf.narrow(dim, 0, L), buf
    buf = t.new_zeros(*t.shape[:dim], L + L // 2, *t.shape[dim + 1:])
    buf.narrow(dim, 0, t.shape[dim]).copy_(t)
    return buf.narrow(dim, 0, L), buf


class CacheStore:
    """Per-layer K/V and sub-layer outputs of one request. Allocated lazily on the first write
    (zeros, so unwritten slots are finite); the (B, L) canvas shape is then fixed until clear()."""

    def __init__(self, shift: int = 0) -> None:
        self.shift = shift
        self.clear()

    def clear(self) -> None:
        """Drop every tensor (new request, new canvas length, or a cache reset)."""
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.attn: list[Tensor] = []
        self.ffn: list[Tensor] = []
        self.h: list[Tensor] = []
        self.q: list[Tensor] = []
        self.attn_mass: Tensor | None = None
        self.refresh_from: Tensor | None = None
        self.kv_valid: Tensor | None = None
        self.shape: tuple[int, int] | None = None
        # free space for the cache plugin that owns this store (step counters, refresh marks)
        self.meta: dict[str, Any] = {}
        # matmul FLOPs the forwards of this request actually computed (executor's count)
        self.flops: float = 0.0
        # per layer (B, f, K): the last forward's head-mean attention, when its plan asked
        self.attention: tuple[Tensor, ...] | None = None
        # the request's batch rows the tensors hold, once finished rows were dropped (None: all;
        # under guidance row B + r holds row r's unconditional canvas)
        self.rows: Tensor | None = None
        # name -> the buffers widen() allocated with room past the canvas (their leading parts
        # are the tensors above while nobody replaced them)
        self._room: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ state
    @property
    def has_kv(self) -> bool:
        return bool(self.k)

    @property
    def has_features(self) -> bool:
        return bool(self.attn)

    @property
    def has_hidden(self) -> bool:
        return bool(self.h)

    def nbytes(self) -> int:
        """Bytes the per-layer tensors hold, the room widen() keeps past the canvas included."""
        ts = self.k + self.v + self.attn + self.ffn + self.h + self.q
        return sum(t.untyped_storage().nbytes() for t in ts)

    def check_canvas(self, B: int, L: int) -> None:
        if self.shape is not None and self.shape != (B, L):
            raise ValueError(
                f"CacheStore holds a (B, L) = {self.shape} canvas but the forward got {(B, L)}; "
                "call store.clear() (or select_rows) when the canvas changes")

    # ------------------------------------------------------------------ allocation
    def ensure_kv(self, n_layers: int, B: int, n_kv: int, L: int, hd: int,
                  dtype: torch.dtype, device: torch.device) -> None:
        self.check_canvas(B, L)
        if self.k:
            return
        self.shape = (B, L)
        self.k = [torch.zeros(B, n_kv, L, hd, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(B, n_kv, L, hd, dtype=dtype, device=device) for _ in range(n_layers)]
        self.kv_valid = torch.zeros(B, L, dtype=torch.bool, device=device)

    def ensure_features(self, n_layers: int, B: int, L: int, d: int,
                        dtype: torch.dtype, device: torch.device) -> None:
        self.check_canvas(B, L)
        if self.attn:
            return
        self.shape = (B, L)
        self.attn = [torch.zeros(B, L, d, dtype=dtype, device=device) for _ in range(n_layers)]
        self.ffn = [torch.zeros(B, L, d, dtype=dtype, device=device) for _ in range(n_layers)]

    def ensure_hidden(self, n_layers: int, B: int, L: int, d: int, n_heads: int, hd: int,
                      dtype: torch.dtype, device: torch.device) -> None:
        self.check_canvas(B, L)
        if self.h:
            return
        self.shape = (B, L)
        self.h = [torch.zeros(B, L, d, dtype=dtype, device=device) for _ in range(n_layers)]
        self.q = [torch.zeros(B, n_heads, L, hd, dtype=dtype, device=device) for _ in range(n_layers)]

    def widen(self, L: int) -> None:
        """Grow the canvas to ``L`` positions at its end, keeping every tensor's values at their
        positions (new positions unwritten): rows that grew by appended positions only (a
        block-causal request's next block), so nothing moved."""
        if self.shape is None or L == self.shape[1]:
            return
        if L < self.shape[1]:
            raise ValueError(f"CacheStore.widen({L}) would shrink a canvas of {self.shape[1]} positions")
        for name, dim in _LAYERED:
            lst, bufs = getattr(self, name), self._room.get(name, [])
            grown = [_grown(t, dim, L, bufs[i] if i < len(bufs) else None) for i, t in enumerate(lst)]
            lst[:] = [t for t, _ in grown]
            self._room[name] = [b for _, b in grown]
        for name, dim in _SINGLE:
            t = getattr(self, name)
            if t is not None:
                t, buf = _grown(t, dim, L, (self._room.get(name) or [None])[0])
                setattr(self, name, t)
                self._room[name] = [buf]
        self.attention = None          # per-forward attention rows keep their own width: dropped
        self.shape = (self.shape[0], L)

    def kv_upto(self, i: int, n: int) -> tuple[Tensor, Tensor]:
        """Layer i's K, V (B, H_kv, n, D): cut to n positions, or run on past the canvas into
        zeros (block-causal attention spans whole blocks past a canvas end). The zeros are
        widen()'s room when it has that many, so the whole cache is not copied to pad it."""
        K, V = self.k[i], self.v[i]
        L = K.shape[2]
        if n <= L:
            return K[:, :, :n], V[:, :, :n]
        out = []
        for t, buf in zip((K, V), (self._room.get("k", []), self._room.get("v", []))):
            b = buf[i] if i < len(buf) else None
            if _leads(t, b, 2, n):
                out.append(b[:, :, :n])
            else:
                out.append(torch.nn.functional.pad(t, (0, 0, 0, n - L)))
        return out[0], out[1]

    # ------------------------------------------------------------------ batch surgery
    def select_rows(self, rows: Tensor) -> None:
        """Keep only the given batch rows (e.g. when finished rows leave the batch)."""
        rows = rows.to(self.k[0].device if self.k else (self.attn[0].device if self.attn else "cpu"))
        for lst in (self.k, self.v, self.attn, self.ffn, self.h, self.q):
            lst[:] = [t.index_select(0, rows) for t in lst]
        for name in ("kv_valid", "attn_mass", "refresh_from"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows))
        if self.attention is not None:
            self.attention = tuple(a.index_select(0, rows) for a in self.attention)
        if self.shape is not None:
            self.shape = (int(rows.numel()), self.shape[1])
        self._room = {}                 # the tensors are new ones now: the old buffers go

    def keep_rows(self, rows: Tensor) -> None:
        """Hold only the request's batch rows ``rows`` (b,) long, ascending, from now on: each a
        row it holds (finished rows leave; none comes back). A no-op when it holds them: as many
        rows as it holds (rows only leave, so no host read is needed to tell)."""
        if self.rows is not None and rows.numel() == self.rows.numel():
            return
        held = self.rows
        self.select_rows(rows if held is None else torch.searchsorted(held.to(rows.device), rows))
        self.rows = rows

    def batch_rows(self, t: Tensor, B: int) -> Tensor:
        """A per-row tensor the store holds (``attn_mass``, ``refresh_from``, ``attention``'s
        layers) laid out as the request's batch of B rows: zeros for the rows it dropped. Under
        guidance the rows from B on (the unconditional halves) are left out, as ``t[:B]`` leaves
        them out of a store that dropped nothing."""
        if self.rows is None:
            return t[:B]
        # unconditional rows are parked on a spare row B, then cut (no host read to filter them)
        at = self.rows.to(t.device).clamp(max=B)
        return t.new_zeros(B + 1, *t.shape[1:]).index_copy(0, at, t)[:B]

    def __repr__(self) -> str:
        return (f"CacheStore(shape={self.shape}, layers={len(self.k) or len(self.attn)}, "
                f"kv={self.has_kv}, features={self.has_features}, MiB={self.nbytes() / 2**20:.1f})")
