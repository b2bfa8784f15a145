"""Building blocks shared by both families: RMSNorm, rotary embeddings, masked attention and
position selections. Numerics follow the reference checkpoints' own code: norms and RoPE tables
in (at least) float32, LLaDA's `rope_full_precision` rotation in float32."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "rope_tables", "apply_rope", "attend", "attend_weights", "Sel", "position_ids_from_mask"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 are upcast like the references do; float64 stays float64 (exact mode)
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xc = x.to(_compute_dtype(x.dtype))
        xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        # the weight multiplies in the model dtype, as in LLaDA / Qwen2 / EuroBERT
        return self.weight * xc.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def position_ids_from_mask(mask: Tensor | None, B: int, L: int, device) -> Tensor:
    """(B, L) RoPE positions: a left-padded row gets 0, 1, ... from its first real token, so it
    sees the same positions as the row alone. Pads get 0 (they are never keys)."""
    if mask is None:
        return torch.arange(L, device=device).unsqueeze(0).expand(B, L)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def rope_tables(pos: Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """pos (B, n) -> cos, sin (B, 1, n, head_dim), half-split layout (cat(freqs, freqs)).
    inv_freq is computed in float32 like the reference rotary modules; the angles and tables in
    float32 for float32 / bf16 models (as the references), in float64 for float64 models."""
    ct = _compute_dtype(dtype)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=pos.device) / head_dim))
    freqs = pos.to(ct).unsqueeze(-1) * inv_freq.to(ct)   # (B, n, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                 # (B, n, D)
    return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool) -> Tensor:
    """x (B, H, n, D). full_precision rotates in float32 (LLaDA); otherwise in x's dtype (Qwen2)."""
    ct = _compute_dtype(x.dtype) if full_precision else x.dtype
    xc = x.to(ct)
    x1, x2 = xc.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xc * cos.to(ct) + rotated * sin.to(ct)).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """Bidirectional attention. q (B, H, n, D); k, v (B, Hkv, Lk, D); key_mask (B, Lk) bool,
    True = may be attended, or (B, n, Lk) for a mask per query (shadow queries). Returns
    (B, n, H*D)."""
    B, H, n, D = q.shape
    m = _sdpa_mask(key_mask)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=k.shape[1] != H)
    return o.transpose(1, 2).reshape(B, n, H * D)


def _sdpa_mask(key_mask: Tensor | None) -> Tensor | None:
    """(B, Lk) or (B, n, Lk) key mask -> a mask broadcasting over (B, H, n, Lk)."""
    if key_mask is None:
        return None
    # a row without any valid key (an all-padding row or window) would softmax over -inf
    # everywhere; let it attend to everything instead: its output is irrelevant but finite
    key_mask = key_mask | ~key_mask.any(-1, keepdim=True)
    return key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]


def attend_weights(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """`attend` computed explicitly, also returning the attention probabilities averaged over
    the heads: (B, n, H*D), (B, n, Lk). Scores q k^T / sqrt(D), masked keys -inf, softmax in at
    least float32 (as eager attention implementations do), then cast back to q's dtype."""
    B, H, n, D = q.shape
    rep = H // k.shape[1]
    if rep > 1:                                             # grouped-query attention
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / D ** 0.5           # (B, H, n, Lk)
    m = _sdpa_mask(key_mask)
    if m is not None:
        scores = scores.masked_fill(~m, float("-inf"))
    w = torch.softmax(scores.to(_compute_dtype(q.dtype)), dim=-1).to(q.dtype)
    o = w @ v                                               # (B, H, n, D)
    return o.transpose(1, 2).reshape(B, n, H * D), w.mean(dim=1)


class Sel:
    """A set of sequence positions, per batch row: either the range [a, b) (sliced, fast) or a
    (B, n) LongTensor index (gathered / scattered). `take` and `put` work on any tensor whose
    batch axis is 0 and whose sequence axis is `dim`."""

    __slots__ = ("a", "b", "idx")

    def __init__(self, a: int = 0, b: int = 0, idx: Tensor | None = None) -> None:
        self.a, self.b, self.idx = a, b, idx

    @property
    def n(self) -> int:
        return self.b - self.a if self.idx is None else self.idx.shape[1]

    @property
    def is_range(self) -> bool:
        return self.idx is None

    def offset(self, off: int) -> "Sel":
        """The same positions relative to a sequence that starts at canvas position `off`."""
        if self.idx is None:
            return Sel(self.a - off, self.b - off)
        return Sel(idx=self.idx - off)

    def index(self, B: int, device) -> Tensor:
        """(B, n) index form."""
        if self.idx is not None:
            return self.idx
        return torch.arange(self.a, self.b, device=device).unsqueeze(0).expand(B, -1)

    def _expanded(self, t: Tensor, dim: int) -> Tensor:
        shape = [self.idx.shape[0]] + [1] * (t.dim() - 1)
        shape[dim] = self.idx.shape[1]
        size = list(t.shape)
        size[dim] = self.idx.shape[1]
        return self.idx.view(shape).expand(size)

    def take(self, t: Tensor, dim: int) -> Tensor:
        if self.idx is None:
            return t.narrow(dim, self.a, self.b - self.a)
        return t.gather(dim, self._expanded(t, dim))

    def put(self, t: Tensor, dim: int, src: Tensor) -> None:
        """In-place t[sel] = src along `dim`."""
        if self.idx is None:
            t.narrow(dim, self.a, self.b - self.a).copy_(src)
        else:
            t.scatter_(dim, self._expanded(t, dim), src.to(t.dtype))

    def put_unless(self, t: Tensor, dim: int, src: Tensor, keep: Tensor | None) -> None:
        """put(), except where `keep` (B, n) bool is True: there t keeps what it holds."""
        if keep is not None:
            shape = [keep.shape[0]] + [1] * (src.dim() - 1)
            shape[dim] = keep.shape[1]
            src = torch.where(keep.view(shape), self.take(t, dim).to(src.dtype), src)
        self.put(t, dim, src)
