"""The family-agnostic denoiser: `ModelSpec`, the `Denoiser` base class and the compute-plan
executor. A family (llada.py, dream.py, sdar.py, fast_dllm_v2.py, llada2.py) only declares its
modules under the checkpoint's own parameter names and says where the embedding, blocks, final
norm and head are; the forward below is shared, so every family executes every plan the same way.

Block-causal families (``ModelSpec.block_size``): position p belongs to block pos(p) // size
(pos: the RoPE position, so a left-padded row keeps the blocks it has alone) and a query sees
the keys of its own block and of earlier ones. Their attention always runs over a full-length
key buffer (the store, or a per-forward scratch one) under that per-query mask, and the
per-token work of a range feed (projections, attention, FFN / MoE, head) runs one canvas chunk
of `size` positions at a time: a block fed against the K/V its predecessors left in the store
gets the same bits as the same rows of a forward over the whole canvas. An index feed runs in
chunks of `size` consecutive slots (whole canvas chunks, for rows fed at their own columns), each
row's attention over as many keys as that chunk has in a range feed."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import RMSNorm, Sel, apply_rope, attend, attend_weights, position_ids_from_mask, rope_tables
from .output import ForwardOutput
from .plan import ComputePlan
from .store import CacheStore

__all__ = ["ModelSpec", "Arch", "BlockParts", "Denoiser", "init_random_"]


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about a model, whatever its family."""
    family: str                 # 'llada' | 'dream' | 'sdar' | 'fast_dllm_v2' | 'llada2'
    vocab_size: int             # logit width (the head's rows; LLaDA: embedding_size)
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    eot_token_id: int | None    # instruct turn end (LLaDA <|eot_id|>, Dream <|im_end|>), if known
    max_length: int             # max positions (max_sequence_length / max_position_embeddings)
    shift_logits: bool          # raw logit i predicts token i+1 (Dream); forward() re-aligns
    block_size: int | None = None  # block-causal attention with this default block; None: bidirectional


@dataclass(frozen=True)
class Arch:
    """Architecture numbers the executor needs, in family-neutral names."""
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    rope_full_precision: bool
    qkv_bias: bool
    tied: bool
    logit_scale: float = 1.0
    rotary_dim: int | None = None   # rotated features per head (partial rotary); None: head_dim


class BlockParts(NamedTuple):
    """One transformer block's sub-modules, whatever the checkpoint calls them. Optional parts:
    per-head q/k RMSNorms applied before RoPE (Qwen3 / SDAR, LLaDA2), a fused projection whose
    output rows stack q, k and v (LLaDA2's query_key_value, used instead of q / k / v), and an
    FFN module used instead of gate / up / down (LLaDA2's mixture of experts)."""
    attn_norm: RMSNorm
    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear
    ffn_norm: RMSNorm
    gate: nn.Linear | None
    up: nn.Linear | None
    down: nn.Linear | None
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None
    qkv: nn.Linear | None = None
    ffn: nn.Module | None = None


_FULL = ComputePlan.full()
#: V-verify similarity resolution per compute dtype (see Denoiser._layer_reuse)
SIM_GRID = {torch.float64: 1e-9, torch.float32: 1e-5}


@dataclass
class Feed:
    """What every layer of one forward shares; built once per forward by `Denoiser._feed`."""
    plan: ComputePlan
    store: CacheStore | None
    fed: Sel                      # the fed positions
    s: int                        # fed range [s, e) (index feeds: [0, L))
    e: int
    key_end: int                  # exclusive bound on store keys
    pos: Tensor                   # (B, L) RoPE positions of the whole canvas
    kmask: Tensor | None          # (B, f) | (B, key_end) | per-query (B, f + S, f + S) or
                                  # block-causal (B, f, key_end) key mask
    frozen: Tensor | None = None  # (B, f) fed positions whose stored K/V and features stay
    limit: Tensor | None = None   # (B,) the plan's key_limit
    cos: Tensor | None = None     # (B, 1, f + S, D) RoPE tables of the fed (and shadow) queries
    sin: Tensor | None = None
    attention: list[Tensor] | None = None   # per layer (B, f, K) head-mean attention (plan.attention)
    block: int | None = None      # block size of a block-causal model's forward, else None
    chunks: list | None = None    # block-causal: (canvas Sel, slice of the fed stream) per chunk
    kends: list | None = None     # block-causal: per chunk, the key positions its attention spans
    kbuf: tuple | None = None     # block-causal keys='fed': scratch full-length (K, V) buffers
    key_top: int = 0              # block-causal: the most keys any chunk spans (may pass L)


def _check_store(plan: ComputePlan, store: CacheStore | None) -> None:
    if plan.writes and store is None:
        raise ValueError(f"plan {plan.name!r} reads or writes the cache store, but store=None")
    if plan.reads and not store.has_kv:
        raise RuntimeError(f"plan {plan.name!r} reads cached K/V but the store is empty; "
                           "run a refresh plan first")
    if plan.reuse_features and not store.has_features:
        raise RuntimeError(f"plan {plan.name!r} reuses cached features but none were written; "
                           "run ComputePlan.refresh(features=True) first")


def _check_ranges(plan: ComputePlan, s: int, e: int, key_end: int, L: int) -> None:
    if plan.keys == "store" and plan.index is None and not e <= key_end <= L:
        raise ValueError(f"key_end {key_end} must lie in [{e}, {L}] for the fed range [{s}, {e})")
    if plan.reuse_features:
        for ra, rb in plan.recompute + ((plan.verify,) if plan.verify else ()):
            rb = e if rb == -1 else rb
            if not s <= ra <= rb <= e:
                raise ValueError(f"plan {plan.name!r}: range [{ra}, {rb}) is not inside the "
                                 f"fed range [{s}, {e})")


class Denoiser(nn.Module):
    """Base class of every family's model (LLaDAModel, DreamModel, SDARModel, FastDLLMv2Model,
    LLaDA2Model).

    forward(input_ids (B, L), attention_mask (B, L) bool | None, plan, store) -> logits (B, q, V)
    where q = plan.num_queries(L) and logits[:, j] predicts canvas position
    plan.query_positions(L)[:, j] (aligned for both families); a plan with `shadow` (B, S)
    appends the S shadow queries' logits: (B, q + S, V)."""

    spec: ModelSpec
    arch: Arch
    config: object  # the family's own dataclass config (LLaDAConfig, DreamConfig, ...)

    # ---- family hooks -------------------------------------------------------------------
    def embed_weight(self) -> Tensor:
        raise NotImplementedError

    def head_weight(self) -> Tensor:
        raise NotImplementedError

    def final_norm(self) -> RMSNorm:
        raise NotImplementedError

    def block_parts(self) -> list[BlockParts]:
        raise NotImplementedError

    # ---- conveniences ---------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight().dtype

    @property
    def device(self) -> torch.device:
        return self.embed_weight().device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_store(self) -> CacheStore:
        """A fresh, empty per-request cache store for this model (it records the model's logit
        shift, which a cache choosing positions to recompute needs)."""
        return CacheStore(shift=1 if self.spec.shift_logits else 0)

    # ---- the executor ---------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                plan: ComputePlan | None = None, store: CacheStore | None = None) -> Tensor:
        """Logits (B, q, V) of the plan's queries; `execute` also returns their positions and
        the shadow queries' logits."""
        return self.execute(input_ids, attention_mask, plan, store).logits

    def execute(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                plan: ComputePlan | None = None, store: CacheStore | None = None) -> ForwardOutput:
        """Run `plan` (None: a plain forward of the whole canvas) against `store`."""
        run = _FULL if plan is None else plan
        if run.write_hidden:
            # layer-adaptive forwards (Elastic-Cache) run their own loop: adaptive.py
            from .adaptive import adaptive_forward
            return adaptive_forward(self, input_ids, attention_mask, run, store)
        a = self.arch
        B, L = input_ids.shape
        feed = self._feed(input_ids, attention_mask, run, store)
        fed = feed.fed
        fpos = fed.take(feed.pos, 1)                                        # (B, f)
        x = F.embedding(fed.take(input_ids, 1), self.embed_weight())        # (B, f, d)
        S = 0 if run.shadow is None else run.shadow.shape[1]
        if S:
            x, fpos, feed.kmask = self._add_shadow(run.shadow.to(x.device), x, fpos, feed.pos, feed.kmask, fed)
        feed.cos, feed.sin = rope_tables(fpos, a.rotary_dim or a.head_dim, a.rope_theta, self.dtype)
        if feed.block and run.keys == "fed":
            # scratch K/V over the whole canvas and past it as far as a chunk's keys run: unfed
            # positions stay zero and are masked out
            feed.kbuf = tuple(torch.zeros(B, a.n_kv_heads, max(L, feed.key_top), a.head_dim, dtype=self.dtype,
                                          device=x.device) for _ in range(2))
        if store is not None:
            keys = L if feed.block and run.keys == "fed" else None
            store.flops += self._flops(run, B, fed.n + S, feed.s, feed.e, feed.key_end, keys) \
                + 2.0 * B * S * a.d_model * a.vocab_size
        if run.attention:
            feed.attention = []
        hidden = [] if run.hidden else None
        for i, parts in enumerate(self.block_parts()):
            reuse = run.reuse_features and i not in run.full_layers
            layer = self._layer_block if feed.block else self._layer_reuse if reuse else self._layer_full
            x = layer(i, parts, x, feed)
            if hidden is not None:
                hidden.append(x)
        hidden = None if hidden is None else tuple(hidden)
        attention = None if feed.attention is None else tuple(feed.attention)
        if attention is not None and store is not None:
            store.attention = attention
        if not fed.is_range:
            logits, positions = self._index_logits(x, run, fed.idx, L, feed.chunks)
            return ForwardOutput(logits, positions, attention=attention)
        positions = None if plan is None else run.query_positions(L, B, device=input_ids.device)
        if S:
            # the shadow queries' logits follow the fed ones (unshifted: LLaDA family only)
            return ForwardOutput(self._logits(x[:, :-S], run, fed, feed.s, feed.e, L), positions,
                                 self._head(x[:, -S:]), attention=attention)
        return ForwardOutput(self._logits(x, run, fed, feed.s, feed.e, L, feed.block), positions,
                             attention=attention, hidden=hidden)

    def _feed(self, input_ids: Tensor, attention_mask: Tensor | None, plan: ComputePlan,
              store: CacheStore | None) -> "Feed":
        """Check `plan` against the canvas and the store, and build what every layer shares:
        the fed selection, RoPE positions, key mask, and the fed positions whose stored K/V and
        features stay as they are."""
        _check_store(plan, store)
        B, L = input_ids.shape
        dev = input_ids.device
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        pos = plan.position_ids if plan.position_ids is not None else \
            position_ids_from_mask(mask, B, L, dev)                         # (B, L)
        cut = limit = None
        if plan.key_limit is not None:
            # positions were taken from the full mask above: cutting keys must not renumber them
            limit = plan.key_limit.to(dev)                                  # (B,)
            cut = torch.arange(L, device=dev)[None, :] < limit[:, None]     # (B, L)
        if plan.keep is not None:
            keep = plan.keep.to(dev)                                        # (B, L)
            cut = keep if cut is None else cut & keep
        if cut is not None:
            mask = cut if mask is None else mask & cut
        if plan.index is None:
            s, e = plan.fed_range(L)
            fed = Sel(s, e)
        else:
            s, e = 0, L
            fed = Sel(idx=plan.index.to(dev))
        key_end = L if plan.key_end is None else plan.key_end
        _check_ranges(plan, s, e, key_end, L)
        # fed positions (B, f) whose stored K/V and features stay as they are: outside the row's
        # write window (APD), or at or past its key limit (a row cut shorter than the batch's
        # feed writes nothing there, exactly as if it had been fed alone)
        frozen = None if plan.write_window is None else ~self._in_window(plan.write_window, s, e)
        if cut is not None:
            beyond = ~fed.take(cut, 1)
            frozen = beyond if frozen is None else frozen | beyond
        pad = None if plan.index_pad is None else plan.index_pad.to(dev)   # (B, f) top-up slots
        if pad is not None:
            frozen = pad if frozen is None else frozen | pad
        if store is not None and plan.writes:
            self._prepare_store(store, plan, fed, frozen, B, L, dev)
        # an explicit mask (training with clean copies beside noisy ones) replaces block-causality
        block = self._block_size(plan) if plan.attend is None else None
        kmask = _key_mask(plan, store, fed, mask, pad, bool(block), key_end, B, L, dev)
        feed = Feed(plan=plan, store=store, fed=fed, s=s, e=e, key_end=key_end, pos=pos, kmask=kmask,
                    frozen=frozen, limit=limit)
        if block:
            self._block_feed(feed, block)
        if plan.attend is not None:                 # (B, f, f) per query, padding kept
            rows = plan.attend.to(dev)[:, s:e, s:e]
            feed.kmask = rows if kmask is None else rows & kmask[:, None, :]
        return feed

    def _block_size(self, plan: ComputePlan) -> int | None:
        """The block size of this forward's block-causal attention (the plan's, else the
        model's), or None for a bidirectional model; refuses what block-causal attention cannot
        combine with."""
        block = self.spec.block_size if plan.block_size is None else plan.block_size
        if plan.block_size is not None and self.spec.block_size is None:
            raise ValueError(f"plan {plan.name!r} sets block_size={plan.block_size}, but the "
                             f"{self.spec.family} model attends bidirectionally")
        if block and (plan.shadow is not None or plan.reuse_features or plan.attention):
            raise ValueError(f"plan {plan.name!r}: shadow queries, feature reuse and attention weights are "
                             f"not supported by the block-causal {self.spec.family} model")
        return block

    @staticmethod
    def _block_feed(feed: Feed, block: int) -> None:
        """Block-causal forward: turn the key mask into a per-query one (a query sees the keys
        of its own block and of earlier blocks, blocks counted from the RoPE positions) and cut a
        range feed into canvas chunks of `block` positions aligned at 0 (an index feed into
        consecutive slots, `block` at a time)."""
        fed, pos = feed.fed, feed.pos
        blk = torch.div(pos, block, rounding_mode="floor")                 # (B, L)
        n_keys = feed.kmask.shape[1]
        qb = fed.take(blk, 1)                                               # (B, f)
        feed.kmask = feed.kmask[:, None, :] & (blk[:, None, :n_keys] <= qb[:, :, None])   # (B, f, Lk)
        feed.block = block
        if not fed.is_range:
            # consecutive slots, `block` at a time (whole canvas chunks for ComputePlan.block_rows);
            # a chunk's keys end where its last query's block can: per row, grouped by that end
            edges = [*range(0, fed.n, block), fed.n]
            feed.chunks = [(Sel(idx=fed.idx[:, a:b]), slice(a, b)) for a, b in zip(edges, edges[1:])]
            ends = torch.stack([c.idx.max(1).values + block for c, _ in feed.chunks]).tolist() \
                if feed.chunks else []                                                     # (chunks, B)
            feed.kends = [_row_groups(row, fed.idx.device) for row in ends]
            top = max(map(max, ends), default=0)
        else:
            s, e = feed.s, feed.e
            edges = [s, *range((s // block + 1) * block, e, block), e]
            feed.chunks = [(Sel(a, b), slice(a - s, b - s)) for a, b in zip(edges, edges[1:])]
            # A chunk [a, b)'s queries see no key at or past b + block - 1 (a left-padded row's block
            # may run on past b). Attention spans exactly that many keys, zeros and masked past the
            # canvas: its kernel's reduction order then depends on the chunk alone, never on how
            # wide the canvas is, so K/V stored while the canvas was narrower are the same bits.
            feed.kends = [b + block - 1 for b in edges[1:]]
            top = max(feed.kends)
        if top > n_keys:
            feed.kmask = F.pad(feed.kmask, (0, top - n_keys))
        feed.key_top = top

    def _prepare_store(self, store: CacheStore, plan: ComputePlan, fed: Sel, frozen: Tensor | None,
                       B: int, L: int, dev: torch.device) -> None:
        a = self.arch
        store.check_canvas(B, L)
        if plan.keys == "store" or plan.write_kv:
            store.ensure_kv(a.n_layers, B, a.n_kv_heads, L, a.head_dim, self.dtype, dev)
            # every layer writes K/V for at least the fed positions (feature reuse: for the
            # recomputed set, which only ever holds positions already valid)
            if not plan.reuse_features:
                written = torch.ones(B, fed.n, dtype=torch.bool, device=dev) if frozen is None \
                    else fed.take(store.kv_valid, 1) | ~frozen
                fed.put(store.kv_valid, 1, written)
        if plan.write_features or plan.reuse_features:
            store.ensure_features(a.n_layers, B, L, a.d_model, self.dtype, dev)

    def _add_shadow(self, shadow: Tensor, x: Tensor, fpos: Tensor, pos: Tensor,
                    kmask: Tensor | None, fed: Sel) -> tuple[Tensor, Tensor, Tensor]:
        """WINO's shadow block (`plan.shadow` (B, S) canvas columns): append S MASK queries with
        the RoPE positions of their columns to the fed stream x (B, f, d) / fpos (B, f), and turn
        the key mask into a per-query one (B, f + S, f + S): fed queries see the fed keys as
        before and no shadow; a shadow query sees every fed key but its own column, and every
        shadow (itself included)."""
        if self.spec.shift_logits:
            raise ValueError("ComputePlan.shadow (WINO's verification block) needs a model whose logit i "
                             f"predicts token i (LLaDA family); {self.spec.family} logits are shifted")
        B, f = fpos.shape
        S, dev = shadow.shape[1], fpos.device
        xs = self.embed_weight()[self.spec.mask_token_id].to(x.dtype).expand(B, S, -1)
        keys = torch.ones(B, f, dtype=torch.bool, device=dev) if kmask is None else kmask   # (B, f)
        not_own = fed.index(B, dev)[:, None, :] != shadow[:, :, None]                     # (B, S, f)
        top = torch.cat([keys[:, None, :].expand(B, f, f),
                         torch.zeros(B, f, S, dtype=torch.bool, device=dev)], dim=2)      # (B, f, f + S)
        bottom = torch.cat([keys[:, None, :] & not_own,
                            torch.ones(B, S, S, dtype=torch.bool, device=dev)], dim=2)    # (B, S, f + S)
        return (torch.cat([x, xs], dim=1), torch.cat([fpos, pos.gather(1, shadow)], dim=1),
                torch.cat([top, bottom], dim=1))

    def _flops(self, plan: ComputePlan, B: int, f: int, s: int, e: int, key_end: int,
               n_keys: int | None = None) -> float:
        """Matmul FLOPs (2 per multiply-add) this plan computes for the whole batch: projections,
        attention scores and mixing, FFN (a mixture of experts: router plus the experts a token
        runs, `ffn_macs`), V-verify's value projections, and the LM head. Norms, RoPE and softmax
        are left out (linear in the tokens, small). `n_keys`: keys each fed query attends over
        (default: the fed positions, or key_end with keys='store')."""
        a = self.arch
        hd = a.n_heads * a.head_dim
        kvd = a.n_kv_heads * a.head_dim
        ffn = self.ffn_macs()

        def layer(i: int, n: int, n_keys: int) -> float:
            return 2.0 * B * n * (a.d_model * (hd + 2 * kvd) + hd * a.d_model + ffn[i] + 2 * n_keys * hd)

        if n_keys is None:
            n_keys = f if plan.keys == "fed" else key_end
        full = [layer(i, f, n_keys) for i in range(a.n_layers)]
        total = sum(full)
        if plan.reuse_features:
            n = sum((e if rb == -1 else rb) - ra for ra, rb in plan.recompute)
            verify = 0.0
            if plan.verify is not None:
                G = (e if plan.verify[1] == -1 else plan.verify[1]) - plan.verify[0]
                n += int(plan.verify_rho * G)
                verify = 2.0 * B * G * a.d_model * kvd
            total += sum(layer(i, n, key_end) + verify - full[i] for i in range(a.n_layers)
                         if i not in plan.full_layers)
        if plan.index is not None:
            n_out = f
        else:
            o = s if plan.out_start is None else plan.out_start
            # a shifted family also computes the raw logit just before out_start (see _logits)
            n_out = e - o + (1 if self.spec.shift_logits and plan.shift is not False and o > s else 0)
        return total + 2.0 * B * n_out * a.d_model * a.vocab_size

    def _qkv(self, p: BlockParts, h: Tensor, cos: Tensor, sin: Tensor):
        a = self.arch
        B, n, _ = h.shape
        if p.qkv is None:
            q, k, v = p.q(h), p.k(h), p.v(h)
        else:  # fused projection: output rows are q (H*D), then k, then v (Hkv*D each)
            hd, kvd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
            q, k, v = p.qkv(h).split((hd, kvd, kvd), dim=-1)
        q = q.view(B, n, a.n_heads, a.head_dim)
        k = k.view(B, n, a.n_kv_heads, a.head_dim)
        if p.q_norm is not None:  # per-head RMSNorm over D, before RoPE
            q, k = p.q_norm(q), p.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                         # (B, H | Hkv, n, D)
        v = v.view(B, n, a.n_kv_heads, a.head_dim).transpose(1, 2)         # (B, Hkv, n, D)
        q = apply_rope(q, cos, sin, a.rope_full_precision)
        k = apply_rope(k, cos, sin, a.rope_full_precision)
        return q, k, v

    def _v(self, p: BlockParts, h: Tensor) -> Tensor:
        """The value projection alone (V-verify): (B, n, Hkv*D)."""
        if p.qkv is None:
            return p.v(h)
        a = self.arch
        return p.qkv(h)[..., (a.n_heads + a.n_kv_heads) * a.head_dim:]

    @staticmethod
    def _in_window(w: Tensor, s: int, e: int) -> Tensor:
        """(B, e - s) bool: columns of the range [s, e) inside each row's window w (B, 2)."""
        cols = torch.arange(s, e, device=w.device)[None, :]
        return (cols >= w[:, :1]) & (cols < w[:, 1:])

    @staticmethod
    def _mlp(p: BlockParts, h: Tensor) -> Tensor:
        if p.ffn is not None:
            return p.ffn(h)
        return p.down(F.silu(p.gate(h)) * p.up(h))

    def ffn_macs(self) -> list[float]:
        """Multiply-adds per token of each layer's FFN (a mixture of experts overrides this)."""
        a = self.arch
        return [3.0 * a.d_model * a.mlp_hidden] * a.n_layers

    def _layer_full(self, i, p: BlockParts, x: Tensor, feed: Feed) -> Tensor:
        """Every fed position is recomputed. Plain forward, refresh, window, prefix/dual,
        subset (dKV) and dLLM-Cache's always-full layers. `feed.frozen` (B, f): fed positions
        whose stored K/V and features stay as they are (write window, key limit)."""
        plan, store, fed, frozen = feed.plan, feed.store, feed.fed, feed.frozen
        q, k, v = self._qkv(p, p.attn_norm(x), feed.cos, feed.sin)
        if plan.keys == "fed":
            if plan.write_kv:
                fed.put_unless(store.k[i], 2, k, frozen)
                fed.put_unless(store.v[i], 2, v, frozen)
            K, V = k, v
        else:
            # fresh K/V replace the stale ones in place; frozen positions attend with what the
            # store holds
            fed.put_unless(store.k[i], 2, k, frozen)
            fed.put_unless(store.v[i], 2, v, frozen)
            K, V = store.k[i][:, :, :feed.key_end], store.v[i][:, :, :feed.key_end]  # (B, Hkv, Lk, D)
        if feed.attention is None:
            att = p.o(attend(q, K, V, feed.kmask))                          # (B, f, d)
        else:
            o, w = attend_weights(q, K, V, feed.kmask)                      # (B, f, H*D), (B, f, Lk)
            feed.attention.append(w)
            att = p.o(o)
        if plan.write_features or plan.reuse_features:
            fed.put_unless(store.attn[i], 1, att, frozen)
        x = x + att
        mlp = self._mlp(p, p.ffn_norm(x))                                   # (B, f, d)
        if plan.write_features or plan.reuse_features:
            fed.put_unless(store.ffn[i], 1, mlp, frozen)
        return x + mlp

    def _layer_block(self, i, p: BlockParts, x: Tensor, feed: Feed) -> Tensor:
        """Block-causal layer: every fed position is recomputed, one canvas chunk at a time (see
        the module docstring). All chunks' K/V are written before any chunk attends, so a query
        also sees later chunks of its own block. keys='fed' attends over a scratch full-length
        buffer (and with write_kv also fills the store); keys='store' over the store, as
        `_layer_full` does."""
        plan, store, frozen = feed.plan, feed.store, feed.frozen
        K, V = feed.kbuf if plan.keys == "fed" else (None, None)
        qs = []
        for sel, sl in feed.chunks:
            q, k, v = self._qkv(p, p.attn_norm(x[:, sl]), feed.cos[:, :, sl], feed.sin[:, :, sl])
            qs.append(q)
            keep = None if frozen is None else frozen[:, sl]
            if plan.keys == "fed":
                sel.put(K, 2, k)
                sel.put(V, 2, v)
            if plan.keys == "store" or plan.write_kv:
                sel.put_unless(store.k[i], 2, k, keep)
                sel.put_unless(store.v[i], 2, v, keep)
        if plan.keys == "store":
            # after the writes (it may be a copy); every chunk's keys cut from this one
            # (B, Hkv, key_top, D) span, not each padded past the canvas on its own
            K, V = store.kv_upto(i, feed.key_top)
        att = torch.cat([p.o(_attend_chunk(q, K, V, feed.kmask[:, sl], kend))
                         for q, (_, sl), kend in zip(qs, feed.chunks, feed.kends)], dim=1)   # (B, f, d)
        if plan.write_features:
            feed.fed.put_unless(store.attn[i], 1, att, frozen)
        x = x + att
        mlp = torch.cat([self._mlp(p, p.ffn_norm(x[:, sl])) for _, sl in feed.chunks], dim=1)
        if plan.write_features:
            feed.fed.put_unless(store.ffn[i], 1, mlp, frozen)
        return x + mlp

    def _layer_reuse(self, i, p: BlockParts, x: Tensor, feed: Feed) -> Tensor:
        """dLLM-Cache layer: recompute the static ranges plus the V-verify picks; every other
        fed position adds its cached attention / FFN output to the current residual stream.
        `feed.limit` (B,): the plan's key_limit. A row's positions at or past it are outside
        its forward: never written, never verified, and its V-verify count is taken over its
        own cut range, so a cut row in a batch computes what it would alone."""
        a = self.arch
        plan, store, s, e, limit = feed.plan, feed.store, feed.s, feed.e, feed.limit
        B, dev = x.shape[0], x.device
        h = p.attn_norm(x)                                                  # (B, f, d)
        parts: list[Tensor] = []
        keeps: list[Tensor] = []            # per part (B, n) bool: recomputed but not written
        ranges = [(ra, e if rb == -1 else rb) for ra, rb in plan.recompute]
        for ra, rb in ranges:
            cols = torch.arange(ra, rb, device=dev).unsqueeze(0).expand(B, -1)
            parts.append(cols)
            if limit is not None:
                keeps.append(cols >= limit[:, None])
        verified = self._verify(i, p, h, feed) if plan.verify is not None else None
        if verified is not None and verified[0] is not None:
            parts.append(verified[0])
            if limit is not None:
                keeps.append(verified[1])
        if len(parts) == 1 and len(ranges) == 1:
            C = Sel(*ranges[0])
        elif parts:
            C = Sel(idx=torch.cat(parts, dim=1))
        else:
            C = Sel(s, s)                                                   # nothing recomputed
        keep = torch.cat(keeps, dim=1) if keeps else None                   # (B, c) | None
        slots = C.offset(s)                                                 # positions within x
        if C.n:
            q, k, v = self._qkv(p, slots.take(h, 1), *rope_tables(C.take(feed.pos, 1), a.rotary_dim or a.head_dim,
                                                                   a.rope_theta, h.dtype))
            C.put_unless(store.k[i], 2, k, keep)
            C.put_unless(store.v[i], 2, v, keep)
        if verified is not None:
            va, vb, v_new = verified[2]
            # dLLM-Cache replaces the whole cached V of the verified range by the new values
            store.v[i][:, :, va:vb] = v_new
        if C.n:
            K, V = store.k[i][:, :, :feed.key_end], store.v[i][:, :, :feed.key_end]
            C.put_unless(store.attn[i], 1, p.o(attend(q, K, V, feed.kmask)), keep)
        x = x + store.attn[i][:, s:e]
        if C.n:
            C.put_unless(store.ffn[i], 1, self._mlp(p, p.ffn_norm(slots.take(x, 1))), keep)
        return x + store.ffn[i][:, s:e]

    def _verify(self, i, p: BlockParts, h: Tensor, feed: Feed):
        """dLLM-Cache's V-verify over the plan's verify range: -> (picked positions (B, k) or
        None, their keep-mask (B, k) under a key limit, (va, vb, new V (B, Hkv, G, D)) to store).
        The floor(rho * G) positions whose fresh V is least similar to the cached one are picked
        (per row over its own cut range under a key limit)."""
        a = self.arch
        plan, store, s, limit = feed.plan, feed.store, feed.s, feed.limit
        B, dev = h.shape[0], h.device
        va, vb = plan.verify
        vb = feed.e if vb == -1 else vb
        G = vb - va
        n_pick = int(plan.verify_rho * G)
        v_new = self._v(p, h[:, va - s: vb - s])                            # (B, G, Hkv*D)
        v_old = store.v[i][:, :, va:vb].transpose(1, 2).reshape(B, G, -1)
        ct = torch.promote_types(v_new.dtype, torch.float32)
        sim = F.cosine_similarity(v_new.to(ct), v_old.to(ct), dim=-1)       # (B, G)
        # Unchanged inputs give cosine 1 up to rounding, and rounding differs between kernels
        # and batch shapes: similarities are snapped to a grid (SIM_GRID) so that such near-ties
        # become exact ties, which the stable sort breaks by position.
        sim = torch.round(sim / SIM_GRID[ct]) * SIM_GRID[ct]
        v_new = v_new.view(B, G, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, G, D)
        keep = None
        if limit is not None:
            outside = torch.arange(va, vb, device=dev)[None, :] >= limit[:, None]   # (B, G)
            sim = sim.masked_fill(outside, float("inf"))
            v_new = torch.where(outside[:, None, :, None], store.v[i][:, :, va:vb], v_new)
            # each row recomputes floor(rho * its own range), as upstream's int(rho * G)
            g_row = (limit.clamp(max=vb) - va).clamp(min=0)
            n_row = torch.floor(plan.verify_rho * g_row.to(torch.float64)).long()  # (B,)
            keep = torch.arange(n_pick, device=dev)[None, :] >= n_row[:, None]
        pick = None
        if n_pick > 0:
            # least similar first; a stable sort breaks exact ties by position, so the choice
            # does not depend on the kernel (topk's tie order is unspecified)
            pick = sim.argsort(dim=1, stable=True)[:, :n_pick] + va          # (B, k)
        return pick, keep, (va, vb, v_new)

    def _head(self, h: Tensor) -> Tensor:
        """Final norm and LM head: hidden states (B, n, d) -> raw logits (B, n, V)."""
        out = F.linear(self.final_norm()(h), self.head_weight())
        scale = self.arch.logit_scale
        return out if scale == 1.0 else out * scale

    def _head_chunks(self, x: Tensor, lo: int, block: int) -> Tensor:
        """`_head` over rows of x that start at canvas position lo, one canvas chunk of `block`
        positions at a time (block-causal: a row's logit does not depend on the feed's length)."""
        n = x.shape[1]
        if n == 0:
            return self._head(x)
        edges = [0, *range((lo // block + 1) * block - lo, n, block), n]
        return torch.cat([self._head(x[:, a:b]) for a, b in zip(edges, edges[1:])], dim=1)

    def _logits(self, x: Tensor, plan: ComputePlan, fed: Sel, s: int, e: int, L: int,
                block: int | None = None) -> Tensor:
        """Aligned logits of a range feed [s, e) from its output start on."""
        shift = self.spec.shift_logits and plan.shift is not False
        o, e = plan.out_range(L)
        lo = o - 1 if (shift and o > s) else o
        rows = x[:, lo - s: e - s]
        raw = self._head_chunks(rows, lo, block) if block else self._head(rows)   # (B, e - lo, V)
        if not shift or raw.shape[1] == 0:
            return raw
        if plan.shift_from is not None:
            # per row: position shift_from[b] keeps its own logit (the in-window shift of a
            # row whose own feed would start there), every other one takes p - 1's
            cols = torch.arange(o, e, device=raw.device)[None, :]           # (1, q)
            own = (cols - 1 < lo) | (cols == plan.shift_from.to(raw.device)[:, None])
            src = torch.where(own, cols, cols - 1) - lo                     # (B, q)
            return raw.gather(1, src.unsqueeze(-1).expand(-1, -1, raw.shape[-1]))
        if lo < o:
            return raw[:, :-1]        # position p gets the raw logit of p - 1
        # window start gets its own logit: the reference samplers' in-window shift
        return torch.cat((raw[:, :1], raw[:, :-1]), dim=1)

    def _index_logits(self, x: Tensor, plan: ComputePlan, idx: Tensor, L: int,
                      chunks: list | None = None) -> tuple[Tensor, Tensor]:
        """Aligned logits (B, f, V) of an index feed and the canvas positions they predict (B, f)
        (the contract is the plan's `index`): a real slot's own output (LLaDA family); in a
        shifted family the output at p - 1 when p - 1 is a real fed slot, or p's own at
        shift_from. Columns that predict nothing repeat their row's nearest one that does.
        `chunks` (block-causal): the head runs chunk by chunk, as over a range feed."""
        raw = self._head(x) if chunks is None else \
            torch.cat([self._head(x[:, sl]) for _, sl in chunks], dim=1)   # (B, f, V)
        shift = self.spec.shift_logits and plan.shift is not False
        pad = None if plan.index_pad is None else plan.index_pad.to(idx.device)
        if not shift and pad is None:
            return raw, idx
        B, f = idx.shape
        col = torch.arange(f, device=idx.device).expand(B, f)
        real = torch.ones_like(idx, dtype=torch.bool) if pad is None else ~pad
        src, ok = col, real
        if shift:
            # inv[b, p] = the column of the real slot at p - 1 (-1: none)
            inv = torch.full((B, L + 1), -1, dtype=torch.long, device=idx.device)
            inv.scatter_(1, idx + 1, torch.where(real, col, -1))
            prev = inv.gather(1, idx)                                       # (B, f)
            ok = prev >= 0
            src = torch.where(ok, prev, col)
            if plan.shift_from is not None:
                ok = ok | (real & (idx == plan.shift_from.to(idx.device)[:, None]))
        before = torch.where(ok, col, -1).cummax(dim=1).values              # nearest predicting column <= j
        after = torch.where(ok, col, f).flip(1).cummin(dim=1).values.flip(1)   # nearest >= j
        near = torch.where(before >= 0, before, after)
        near = torch.where(near < f, near, col)                             # nothing predicts: as fed
        src = src.gather(1, near)
        return raw.gather(1, src.unsqueeze(-1).expand(-1, -1, raw.shape[-1])), idx.gather(1, near)


@torch.no_grad()
def init_random_(model: Denoiser, seed: int = 0) -> Denoiser:
    """Deterministic random weights (same values for any dtype / device): O(1) activations so
    numerical checks see every parameter. Norm weights and biases are non-trivial on purpose."""
    g = torch.Generator().manual_seed(seed)
    # persistent float buffers (LLaDA2's router expert_bias) after the parameters, like biases
    saved = model.state_dict().keys()
    buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point() and n in saved]
    for name, prm in [*model.named_parameters(), *buffers]:
        is_norm = "norm" in name or name.endswith("ln_f.weight")
        if prm.dim() == 1 and is_norm:
            val = 1.0 + 0.2 * torch.randn(prm.shape, generator=g, dtype=torch.float64)
        elif prm.dim() == 1:
            val = 0.2 * torch.randn(prm.shape, generator=g, dtype=torch.float64)
        elif "embed" in name or "wte" in name:
            val = torch.randn(prm.shape, generator=g, dtype=torch.float64)
        else:
            val = torch.randn(prm.shape, generator=g, dtype=torch.float64) / math.sqrt(prm.shape[1])
        prm.copy_(val.to(prm.dtype))
    return model


def _row_groups(kends: list[int], device) -> int | list[tuple[Tensor, int]]:
    """A chunk's key end: one int when every row shares it, else (rows, key end) per value."""
    if len(set(kends)) == 1:
        return kends[0]
    return [(torch.tensor([b for b, k in enumerate(kends) if k == end], device=device), end)
            for end in sorted(set(kends))]


def _attend_chunk(q: Tensor, K: Tensor, V: Tensor, kmask: Tensor, kend) -> Tensor:
    """Block-causal attention of one chunk's queries q (B, H, n, D) over exactly `kend` keys (an
    int, or (rows, key end) groups: rows whose chunks sit at different columns), so each row's
    kernel reduces over as many keys as in a range feed of the same columns. K, V span at least
    every chunk's keys (`Feed.key_top`: zeros past the canvas). Returns (B, n, H*D)."""
    if isinstance(kend, int):
        return attend(q, K[:, :, :kend], V[:, :, :kend], kmask[..., :kend])
    B, H, n, D = q.shape
    out = q.new_empty(B, n, H * D)
    for rows, end in kend:
        # only these rows' keys are copied
        k, v = K[:, :, :end].index_select(0, rows), V[:, :, :end].index_select(0, rows)
        out.index_copy_(0, rows, attend(q.index_select(0, rows), k, v, kmask.index_select(0, rows)[:, :, :end]))
    return out


def _key_mask(plan: ComputePlan, store: CacheStore | None, fed: Sel, mask: Tensor | None,
              pad: Tensor | None, block: bool, key_end: int, B: int, L: int, dev) -> Tensor | None:
    """Which keys attention may read: over the fed positions (B, f), over the whole canvas of
    which only the fed positions exist (block-causal feeds, (B, L)), or over the store
    (B, key_end). None: every key."""
    if plan.keys == "fed" and not block:
        kmask = None if mask is None else fed.take(mask, 1)                 # (B, f)
        if pad is not None:                                                 # top-up slots hold no key
            kmask = ~pad if kmask is None else kmask & ~pad
        return kmask
    if plan.keys == "fed":
        kmask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        fed.put(kmask, 1, torch.ones(B, fed.n, dtype=torch.bool, device=kmask.device))
        return kmask if mask is None else kmask & mask                      # (B, L)
    kmask = store.kv_valid[:, :key_end]
    return kmask if mask is None else kmask & mask[:, :key_end]             # (B, key_end)
