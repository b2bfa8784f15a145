"""Building blocks shared by the families: RMSNorm, rotary embeddings (full or partial), masked
attention, the gated (SwiGLU) MLP, sparse mixture-of-experts dispatch and position selections.
Numerics follow the reference checkpoints' own code: norms and RoPE tables in (at least) float32,
LLaDA's `rope_full_precision` rotation in float32."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "rope_tables", "apply_rope", "attend", "attend_weights", "Sel", "position_ids_from_mask",
           "GatedMLP", "moe_combine"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 are upcast like the references do; float64 stays float64 (exact mode)
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. `weight_upcast`: the weight multiplies in the compute dtype
    before the cast back (flash-attn's fused Triton RMSNorm, which SDAR's checkpoint code calls);
    otherwise in the model dtype (LLaDA / Qwen2 / Qwen3 / EuroBERT). The two agree in float32
    and float64."""

    def __init__(self, d: int, eps: float, weight_upcast: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.weight_upcast = weight_upcast

    def forward(self, x: Tensor) -> Tensor:
        ct = _compute_dtype(x.dtype)
        xc = x.to(ct)
        xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_upcast:
            return (self.weight.to(ct) * xc).to(x.dtype)
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


def rope_tables(pos: Tensor, dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """pos (B, n) -> cos, sin (B, 1, n, dim), half-split layout (cat(freqs, freqs)); `dim` is the
    rotated width (head_dim, or head_dim * partial_rotary_factor for LLaDA2).
    inv_freq is computed in float32 like the reference rotary modules; the angles and tables in
    float32 for float32 / bf16 models (as the references), in float64 for float64 models."""
    ct = _compute_dtype(dtype)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
    freqs = pos.to(ct).unsqueeze(-1) * inv_freq.to(ct)   # (B, n, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                 # (B, n, D)
    return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool) -> Tensor:
    """x (B, H, n, D). full_precision rotates in float32 (LLaDA); otherwise in x's dtype (Qwen2).
    Tables narrower than D (partial rotary, LLaDA2) rotate the first cos.shape[-1] features and
    pass the rest through."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin, full_precision), x[..., rot:]), dim=-1)
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
class GatedMLP(nn.Module):
    """SwiGLU MLP under the Qwen / LLaDA2 names: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def moe_combine(x: Tensor, idx: Tensor, weight: Tensor, experts: nn.ModuleList) -> Tensor:
    """Sparse mixture of experts: x (N, d), the router's expert ids idx (N, k) and weights
    (N, k) -> sum_j weight[:, j] * experts[idx[:, j]](x) (N, d). Token-expert pairs are grouped by
    expert (stable, so each group keeps token order) and every used expert runs once on its
    group; the weighted sum over k is taken in the weights' dtype, then cast to x's, as the
    reference MoE blocks do. The group sizes are read on the host once per call (they decide
    which slices go to which expert; a fixed-capacity layout would avoid it at the cost of
    padding)."""
    N, k = idx.shape
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)                               # (N*k,) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    xs = x.index_select(0, order // k)                              # (N*k, d) the pairs' tokens
    out = x.new_empty(N * k, x.shape[-1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            rows = order[start:start + c]
            out[rows] = experts[e](xs[start:start + c])
            start += c
    return (out.view(N, k, -1).to(weight.dtype) * weight.unsqueeze(-1)).sum(dim=1).to(x.dtype)


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
