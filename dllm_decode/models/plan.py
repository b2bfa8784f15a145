"""Compute plans: what one denoiser forward computes and what it reuses.

A cache policy never touches the model; it returns a `ComputePlan`, and the model executes it
against a per-request `CacheStore` (store.py). Every plan is expressed over *canvas positions*
(absolute indices into the (B, L) `input_ids` the engine passes, which is always the whole
canvas), so the engine can scatter the returned logits with `plan.query_positions(L)`.

Execution model, per transformer layer (denoiser.py `Denoiser._layer_full` / `_layer_reuse`):

    fed positions F      enter the residual stream (embedding -> layers -> head); their logits
                         are returned (from `out_start` on). A contiguous range [start, end) or
                         an explicit (B, f) index tensor.
    recomputed set C     positions (subset of F) whose attention and FFN sub-layers are computed
                         this step. Without feature reuse C = F. With feature reuse
                         (dLLM-Cache) C = static ranges + the V-verify picks, and every other fed
                         position adds the attention / FFN outputs cached in the store.
    keys                 'fed': attention runs over the fed positions only (plain forward,
                         truncated window). 'store': the fresh post-RoPE K/V of C are written
                         in place into the store's full-length per-layer K/V, then attention runs
                         over every store position in [0, key_end) that has been written and is
                         not padding (stale K/V of the others are reused: prefix / dual / dKV).

Padding: position ids are cumsum(attention_mask) - 1 clamped at 0 over the whole canvas (or
`position_ids` when given); pads are never keys.

How the built-in caches and policies build their plans (the constructors below):

    plain forward                 ComputePlan.full()
    Fast-dLLM block start         ComputePlan.refresh()                 full forward, K/V -> store
    Fast-dLLM prefix / dual step  ComputePlan.dual_step(s, e, write_window=, shift_from=)
                                  (prefix: e = L)                       feed x[:, s:e], keys = store
    SlowFast cut fast phase       ComputePlan.window(0, e, key_limit=, out_start=)
    APD lookahead                 ComputePlan.lookahead(key_limit)      rows cut at their window end
    APD with its dLLM KV cache    ComputePlan.refresh(end=, key_limit=), then
                                  ComputePlan.cached_window(a, b, write_window=, key_limit=)
    dLLM-Cache refresh            ComputePlan.refresh(features=True, end=, out_start=)
    dLLM-Cache step               ComputePlan.feature_step(P, refresh_prompt, refresh_response,
                                                           rho, full_layers=(0,))
    dKV / d2Cache subset step     ComputePlan.subset(index_or_mask)     queries = subset, keys = store
    d2Cache's attention rollout   plan.with_(attention=True)            + head-mean attention per layer
    DPad suffix dropout           ComputePlan.sparse(fed, keep=)        fed / keys = the kept positions
    Elastic-Cache                 ComputePlan.refresh(...).with_(write_hidden=True, drift=Drift(...)),
                                  then ComputePlan.sparse(fed, keys="store", write_hidden=True,
                                                          drift=Drift(...))   (see `drift` below)
    WINO verification block       ComputePlan.shadowed(cols)            extra MASK queries (below)
    block-causal prefill          ComputePlan.refresh(end=s)            finished blocks' K/V -> store
    block-causal block step       ComputePlan.block_step(s, e)          feed block [s, e), keys = store
    block-causal rows apart       ComputePlan.block_rows(starts, w, ...)  each row its own w columns
    prefix_step(s) is Fast-dLLM's PrefixCache step fed from s to the end without a write window.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

__all__ = ["ComputePlan", "Drift"]


@dataclass(frozen=True, eq=False)
class Drift:
    """Elastic-Cache's per-layer attention checks (``ComputePlan.drift``; arXiv 2510.14973).

    gamma        a row whose probes' attention similarity falls below gamma at layer l
                 recomputes every one of its positions from layer l + 1 on (see ComputePlan.drift).
    probe        (B, t) LongTensor of fed canvas positions whose attention drift is tested, or
                 None (no test: e.g. the first, full forward). probe_pad (B, t) bool marks
                 entries that only pad a row to the batch's t.
    watch        (B, w) LongTensor of canvas positions whose predictions are watched (the
                 window's masks): the rows predicting them, p itself or p - 1 for a shifted
                 family (Dream), must be in the plan's index and are fed even where index_pad
                 marks them; their attention is summed per key at every layer (over heads and
                 these rows) into ``store.attn_mass``. watch_pad (B, w) bool marks padding entries.
    """

    gamma: float
    watch: Tensor
    watch_pad: Tensor | None = None
    probe: Tensor | None = None
    probe_pad: Tensor | None = None

    def map_rows(self, f) -> "Drift":
        """The per-row tensors mapped by ``f`` (tiled or indexed, as ComputePlan's)."""
        return replace(self, **{k: f(getattr(self, k)) for k in ("watch", "watch_pad", "probe", "probe_pad")
                                if getattr(self, k) is not None})


# eq=False: plans holding index tensors compare (and hash) by identity, never by a partial
# field comparison that would ignore the tensors
@dataclass(frozen=True, eq=False)
class ComputePlan:
    """What one forward computes. Build it with the classmethods; the fields are:

    start, end      Contiguous fed range [start, end) of canvas positions (end None = L).
    index           (B, f) LongTensor of canvas positions to feed instead of a range; each row
                    sorted ascending and without duplicates. Used for arbitrary query subsets
                    (dKV delayed caching, d2Cache, DPad, Elastic-Cache). Requires keys='fed' or
                    keys='store' and no feature reuse. Its logits are aligned as a range feed's:
                    column j predicts canvas position ForwardOutput.positions[:, j], which is
                    index[:, j] where that position gets a prediction: in the LLaDA family (or
                    with shift False) from its own output, when it is a real (not index_pad)
                    slot; in a shifted family (Dream) from the output at p - 1, when p - 1 is a
                    real slot (p itself may be a real or an index_pad slot: a padding slot
                    stands for a position whose token is not fed), or from its own output at
                    shift_from (the in-window shift a range feed applies at its window start).
                    A column whose position gets no prediction repeats the row's nearest column
                    that does (same logits, same position), so a row returns only what it
                    would alone; a row where nothing gets one returns its raw outputs as fed.
    keys            'fed' (attend over fed positions only) or 'store' (write fresh K/V of the
                    recomputed positions in place into the store, then attend over all written,
                    non-pad store positions < key_end).
    key_end         Exclusive bound on key positions when keys='store' (None = L). APD's
                    lookahead: positions >= key_end are neither fed nor keys.
    write_kv        With keys='fed': also write the fed K/V into the store (refresh plans).
                    keys='store' always writes.
    write_features  Also write the attention-output and FFN-output of recomputed positions
                    (dLLM-Cache refresh). Implied by reuse_features.
    reuse_features  dLLM-Cache: fed positions outside the recomputed set take the cached
                    attention / FFN outputs from the store (the residual stream itself is always
                    recomputed). Needs a range feed.
    recompute       With reuse_features: static canvas ranges ((a, b), ...) recomputed in full
                    at every layer (prompt and/or response refresh). b = -1 means "to the end
                    of the fed range" (also for `verify`).
    verify          With reuse_features: canvas range (a, b) of the V-verify check: the value
                    projections of all its positions are computed, cosine-compared with the
                    cached V, the whole cached V of the range is replaced by the new one, and the
                    floor(verify_rho * (b - a)) least similar positions per row join the
                    recomputed set (selection is batched inside the model).
    verify_rho      Fraction of the verify range recomputed (dLLM-Cache's transfer_ratio).
    full_layers     With reuse_features: layers recomputed in full whatever the flags say
                    (upstream dLLM-Cache always refreshes layer 0: pass (0,)).
    out_start       Return logits only for fed positions >= out_start (range feeds). Saves the
                    LM head on the prompt. For Dream the raw logit at out_start - 1 is still
                    computed so the right shift stays exact.
    position_ids    (B, L) explicit RoPE positions for the whole canvas, overriding the ones
                    derived from the attention mask.
    write_window    (B, 2) LongTensor, with keys='store': row b writes fresh K/V only for fed
                    positions in [w0_b, w1_b); its other fed positions keep (and attend with)
                    what the store holds. Lets one batched range feed give each row its own
                    recompute window (APD's kv_window) exactly as if the row were alone.
    key_limit       (B,) LongTensor: row b attends only to canvas positions < key_limit[b], as if
                    the canvas were cut there (APD's lookahead M, SlowFast's cut fast phase, per
                    row). Positions keep their RoPE index; logits at or after the limit are
                    meaningless, and nothing is written to the store for them (with feature
                    reuse, V-verify ranks and counts each row over its own cut range).
    shift_from      (B,) LongTensor, Dream: position shift_from[b] keeps its own raw logit (the
                    in-window shift the reference samplers apply at a window start), so a row
                    whose window starts after the batch's feed start gets what it would get fed
                    alone; in an index feed, where p - 1 is not a real slot (see `index`).
    shift           Dream only: None/True = align logits (logit j predicts query token j),
                    False = return the raw next-token logits. Ignored for LLaDA.
    attention       Also return every layer's attention probabilities averaged over the heads,
                    (B, f, K) per layer: row j is fed position j (the index, or the fed range),
                    column k is key position k (the fed positions with keys='fed', canvas
                    positions [0, key_end) with keys='store'); masked keys get 0. The
                    attention is then computed explicitly (softmax(q k^T / sqrt(D)) v, the
                    softmax in at least float32) instead of by the fused kernel, so logits may
                    differ from the plan without it in the last bits. d2Cache's attention
                    rollout reads them (ForwardOutput.attention; also kept in store.attention).
    keep            (B, L) bool: row b's forward involves only canvas positions where keep[b] is
                    True (and the attention mask): the others are never keys and nothing is written
                    to the store for them; fed ones are computed, their logits meaningless. The
                    per-position form of key_limit (DPad's suffix dropout).
    index_pad       (B, f) bool, index feeds: slots that only top a row up to the batch's count f
                    (`sparse`, `subset` from a mask). They are computed as queries but take no
                    part: never keys among the fed (keys='fed'), nothing written for them (with
                    keys='store' the other queries read what the store already holds there),
                    and their logits are not returned (see `index`). So every row of a batch
                    computes exactly what it would alone.
    write_hidden    Also write every layer's input hidden state and post-RoPE queries of the
                    written positions to the store (store.h, store.q): what Elastic-Cache resumes
                    a layer from and compares probes against.
    drift           Elastic-Cache (a `Drift`): needs keys='store' with write_hidden (a sparse
                    step) or a refresh with write_hidden (the first forward). At every layer l,
                    for each row that has not switched yet, the attention of its probes computed
                    from the store's queries and keys as they were (before this layer's writes)
                    is compared with their attention now (fresh queries, keys after the writes):
                    cosine similarity across heads for each (probe, key) pair, averaged over the
                    row's probes and non-pad keys. Below gamma, the row switches: from layer l + 1
                    on every one of its positions is recomputed (the layer's input taken from
                    store.h where the position was not fed) and written, as in a full forward;
                    its other positions keep reading the store until then. store.refresh_from
                    (B,) records the switch layer (n_layers: none; 0 for a refresh), and
                    store.attn_mass (B, n_layers, L) the attention the watch positions paid each
                    key. One host read per layer (whether any row switched).
    shadow          (B, S) LongTensor of canvas positions (WINO's "shadow block"): S extra
                    queries, each a MASK token with the RoPE position of its canvas position,
                    that attend to every fed key except the one at their own position, and to
                    each other; no fed position attends to them, so the fed positions' logits are
                    those of the plan without shadows. Their logits come after the fed ones:
                    the forward returns (B, q + S, V) and the engine hands the last S columns to
                    ``score`` as ``shadow_logits``. Needs keys='fed', a range feed and no store
                    writes; LLaDA family only (a shifted family has no leave-one-out query).
    block_size      Block-causal models only: the block size of this forward's attention (None:
                    the model's default, ModelSpec.block_size). A position's block is its RoPE
                    position // block_size; a query sees its own block and earlier ones.
    attend          (B, L, L) bool: an explicit mask, query position x key position, ANDed with
                    the padding mask; it replaces a block-causal model's own block mask. For
                    training forwards that lay several views of a sequence on one canvas (block
                    diffusion's noisy blocks beside the clean ones, with ``position_ids``
                    repeating positions). Needs a range feed with keys='fed', no store writes and
                    no shadow queries.
    hidden          Also return the residual stream after every layer, (B, f, d) per layer
                    (ForwardOutput.hidden; the final norm not applied): for training objectives
                    that compare layers (REPR-ALIGN). Needs a range feed with keys='fed', no store
                    writes and no shadow queries.
    name            Free-form label for tracing.
    """

    start: int = 0
    end: int | None = None
    index: Tensor | None = None
    keys: Literal["fed", "store"] = "fed"
    key_end: int | None = None
    write_kv: bool = False
    write_features: bool = False
    reuse_features: bool = False
    recompute: tuple[tuple[int, int], ...] = ()
    verify: tuple[int, int] | None = None
    verify_rho: float = 0.0
    full_layers: tuple[int, ...] = ()
    out_start: int | None = None
    position_ids: Tensor | None = None
    write_window: Tensor | None = None
    key_limit: Tensor | None = None
    shift_from: Tensor | None = None
    shift: bool | None = None
    attention: bool = False
    keep: Tensor | None = None
    index_pad: Tensor | None = None
    write_hidden: bool = False
    drift: Drift | None = None
    shadow: Tensor | None = None
    block_size: int | None = None
    attend: Tensor | None = None
    hidden: bool = False
    name: str = "full"

    def __post_init__(self) -> None:
        if self.keys not in ("fed", "store"):
            raise ValueError(f"ComputePlan.keys must be 'fed' or 'store', got {self.keys!r}")
        if self.index is not None:
            if self.index.dim() != 2 or self.index.dtype != torch.long:
                raise ValueError("ComputePlan.index must be a (B, f) LongTensor of canvas positions")
            if self.reuse_features:
                raise ValueError("feature reuse (dLLM-Cache) needs a contiguous range feed, not an index")
            if self.out_start is not None:
                raise ValueError("out_start applies to range feeds only")
        if self.reuse_features:
            if self.keys != "store":
                raise ValueError("reuse_features reads cached K/V: it needs keys='store'")
            for a, b in self.recompute + ((self.verify,) if self.verify else ()):
                if a < 0 or (b != -1 and b < a):
                    raise ValueError(f"bad recompute range {(a, b)}")
            if self.verify is not None and not 0.0 <= self.verify_rho <= 1.0:
                raise ValueError(f"verify_rho must be in [0, 1], got {self.verify_rho}")
        elif self.recompute or self.verify is not None or self.full_layers:
            raise ValueError("recompute / verify / full_layers only make sense with reuse_features=True")
        if self.write_window is not None and (self.keys != "store" or self.index is not None
                                              or self.reuse_features):
            raise ValueError("write_window needs a range feed with keys='store' and no feature reuse")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"ComputePlan.block_size must be >= 1, got {self.block_size}")
        if self.start < 0 or (self.end is not None and self.end < self.start):
            raise ValueError(f"bad fed range [{self.start}, {self.end})")
        if self.attention and (self.reuse_features or self.shadow is not None or self.write_hidden):
            raise ValueError("attention weights are returned for plans without feature reuse, shadows "
                             "or write_hidden")
        if self.keep is not None and (self.keep.dim() != 2 or self.keep.dtype != torch.bool):
            raise ValueError("ComputePlan.keep must be a (B, L) bool tensor")
        if self.keep is not None and self.reuse_features:
            raise ValueError("keep is not supported with feature reuse (dLLM-Cache); use key_limit")
        if self.index_pad is not None and (self.index is None or self.index_pad.dtype != torch.bool
                                           or self.index_pad.shape != self.index.shape):
            raise ValueError("ComputePlan.index_pad must be a bool tensor shaped like index")
        if self.write_hidden and self.keep is not None:
            raise ValueError("keep does not combine with write_hidden")
        if self.write_hidden and (self.reuse_features or not self.writes):
            raise ValueError("write_hidden needs a plan that writes K/V (keys='store' or write_kv) "
                             "without feature reuse")
        if self.drift is not None:
            if not self.write_hidden:
                raise ValueError("drift (Elastic-Cache) needs write_hidden=True")
            if self.drift.probe is not None and self.keys != "store":
                raise ValueError("a drift test reads the store: it needs keys='store'")
            if self.shadow is not None or self.key_limit is not None or self.write_window is not None:
                raise ValueError("drift does not combine with shadow, key_limit or write_window")
            if self.keys == "fed" and (self.index is not None or self.start != 0 or self.end is not None):
                raise ValueError("a drift refresh feeds the whole canvas")
        self._check_training_fields()
        if self.shadow is not None:
            if self.shadow.dim() != 2 or self.shadow.dtype != torch.long:
                raise ValueError("ComputePlan.shadow must be a (B, S) LongTensor of canvas positions")
            if self.keys != "fed" or self.writes or self.index is not None:
                raise ValueError("shadow queries need a range feed with keys='fed' and no store writes")

    def _check_training_fields(self) -> None:
        """`attend` and `hidden` serve training forwards: a plain range feed, keys='fed', no store
        writes, no shadow queries."""
        if self.attend is not None and (self.attend.dim() != 3 or self.attend.dtype != torch.bool):
            raise ValueError("ComputePlan.attend must be a (B, L, L) bool mask")
        for name, on in (("attend", self.attend is not None), ("hidden", self.hidden)):
            if on and (self.keys != "fed" or self.index is not None or self.writes or self.shadow is not None):
                raise ValueError(f"ComputePlan.{name} needs a range feed with keys='fed', no store writes "
                                 "and no shadow queries")

    # ------------------------------------------------------------------ helpers for the executor
    @property
    def writes(self) -> bool:
        return self.keys == "store" or self.write_kv or self.write_features or self.reuse_features

    @property
    def reads(self) -> bool:
        return self.keys == "store"

    def fed_range(self, L: int) -> tuple[int, int]:
        end = L if self.end is None else self.end
        if end > L:
            raise ValueError(f"plan feeds [{self.start}, {end}) but the canvas has length {L}")
        return self.start, end

    def out_range(self, L: int) -> tuple[int, int]:
        s, e = self.fed_range(L)
        o = s if self.out_start is None else self.out_start
        if not s <= o <= e:
            raise ValueError(f"out_start {o} outside the fed range [{s}, {e})")
        return o, e

    def query_positions(self, L: int, batch_size: int | None = None,
                        device: torch.device | str | None = None) -> Tensor:
        """Canvas positions of the fed queries: (B, q) LongTensor. For range plans logits[:, j]
        is the prediction for canvas position query_positions[:, j] (one row expanded to
        `batch_size`; a (1, q) row when batch_size is None). For index plans these are the fed
        positions; the positions their logits predict are the forward's
        `ForwardOutput.positions` (see `index`)."""
        if self.index is not None:
            return self.index if device is None else self.index.to(device)
        a, b = self.out_range(L)
        row = torch.arange(a, b, device=device).unsqueeze(0)
        return row if batch_size is None else row.expand(batch_size, -1)

    def num_queries(self, L: int) -> int:
        if self.index is not None:
            return self.index.shape[1]
        a, b = self.out_range(L)
        return b - a

    def with_(self, **changes) -> "ComputePlan":
        return replace(self, **changes)

    def repeat_rows(self, n: int) -> "ComputePlan":
        """The same plan for the batch stacked n times (classifier-free guidance runs the
        conditional and unconditional canvases as one batch): per-row tensors are tiled."""
        return self._per_row(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def take_rows(self, rows: Tensor) -> "ComputePlan":
        """The same plan for the batch rows ``rows`` (b,) only (the engine leaves finished rows
        out of a forward that keeps nothing): per-row tensors are indexed."""
        return self._per_row(lambda t: t.index_select(0, rows.to(t.device)))

    @property
    def keeps_nothing(self) -> bool:
        """Whether the forward leaves nothing behind but its logits: no store read or write, no
        attention or hidden states returned. Its rows are then independent of each other, so any
        subset of them may run without the rest."""
        return not (self.writes or self.write_hidden or self.attention or self.hidden or self.drift is not None)

    def _per_row(self, f) -> "ComputePlan":
        rows = {k: f(getattr(self, k)) for k in ("index", "position_ids", "write_window", "key_limit", "shift_from",
                                                 "shadow", "keep", "index_pad", "attend")
                if getattr(self, k) is not None}
        if self.drift is not None:
            rows["drift"] = self.drift.map_rows(f)
        return replace(self, **rows) if rows else self

    # ------------------------------------------------------------------ constructors
    @classmethod
    def full(cls, *, out_start: int | None = None, block_size: int | None = None) -> "ComputePlan":
        """Plain forward over the whole canvas; no store. `block_size`: see the field."""
        return cls(out_start=out_start, block_size=block_size, name="full")

    @classmethod
    def refresh(cls, *, features: bool = False, out_start: int | None = None, end: int | None = None,
                key_limit: Tensor | None = None, name: str | None = None) -> "ComputePlan":
        """Full forward (of [0, end), rows cut at key_limit (B,)) that also writes every layer's
        K/V (and, with features=True, the attention / FFN outputs) of the fed positions to the
        store. Same arithmetic as full(), so the logits are bit-identical to a plain forward."""
        return cls(end=end, write_kv=True, write_features=features, out_start=out_start, key_limit=key_limit,
                   name=name or ("refresh+features" if features else "refresh"))

    @classmethod
    def lookahead(cls, key_limit: Tensor) -> "ComputePlan":
        """Plain forward in which row b sees only canvas positions < key_limit[b] (B,): the
        per-row version of feeding x[:, :key_limit] (APD's max_lookahead). No store needed."""
        return cls(key_limit=key_limit, name="lookahead")

    @classmethod
    def window(cls, start: int, end: int, *, key_limit: Tensor | None = None, out_start: int | None = None,
               name: str = "window") -> "ComputePlan":
        """Feed only x[:, start:end] (SlowFast's cut fast phase x[:, :end]), rows further cut at
        key_limit (B,). Attention is restricted to the window; no store needed. RoPE positions
        stay the canvas positions."""
        return cls(start=start, end=end, key_limit=key_limit, out_start=out_start, name=name)

    @classmethod
    def prefix_step(cls, start: int, *, out_start: int | None = None) -> "ComputePlan":
        """Fast-dLLM PrefixCache step: feed x[:, start:] against cached K/V of [0, start)."""
        return cls(start=start, keys="store", out_start=out_start, name="prefix")

    @classmethod
    def dual_step(cls, start: int, end: int, *, write_window: Tensor | None = None,
                  shift_from: Tensor | None = None, name: str = "dual") -> "ComputePlan":
        """Fast-dLLM DualCache step: feed x[:, start:end], write its K/V in place into the
        full-length cached K/V and attend over the whole canvas (prefix and suffix stale).
        Per row, write_window (B, 2) narrows the fresh K/V to the row's own window and
        shift_from (B,) is where its own feed would start (Dream's in-window shift)."""
        return cls(start=start, end=end, keys="store", write_window=write_window, shift_from=shift_from,
                   name=name)

    @classmethod
    def cached_window(cls, start: int, end: int, *, write_window: Tensor | None = None,
                      key_limit: Tensor | None = None, name: str = "cached_window") -> "ComputePlan":
        """APD with its dLLM KV cache: feed x[:, start:end], keys = cached [0, start) + fresh
        window; nothing at or beyond `end` takes part. The window's K/V stay in the store. Per
        row, write_window (B, 2) narrows the fresh K/V and key_limit (B,) cuts the canvas."""
        return cls(start=start, end=end, keys="store", key_end=end, write_window=write_window,
                   key_limit=key_limit, name=name)

    @classmethod
    def block_step(cls, start: int, end: int, *, write_window: Tensor | None = None,
                   block_size: int | None = None, name: str = "block") -> "ComputePlan":
        """Block-causal models: feed the block x[:, start:end] against the K/V the store holds
        for the finished blocks before it (written by a prefill ``refresh(end=start)`` or by
        earlier block steps). The block's fresh K/V are written in place, so the step that feeds
        the completed block leaves its final K/V for the next block (the official loops' forward
        with the K/V kept). Later positions are never seen (the model's block-causal mask), so the
        canvas after `end` may hold anything. Keys span the whole canvas under that mask: the
        logits are the same bits as a forward over the whole canvas when start and end lie on
        multiples of the block size."""
        return cls(start=start, end=end, keys="store", write_window=write_window, block_size=block_size,
                   name=name)

    @classmethod
    def block_rows(cls, starts: Tensor, width: int, full: int, end: int, *,
                   name: str = "block_rows") -> "ComputePlan":
        """Block-causal models, rows at different blocks: each row feeds its own `width` columns
        from starts[b] (B,) (multiples of the block size, ending by `full`), then every row the
        canvas's partial last chunk [full, end), against the store as ``block_step``. Fed in
        chunks of the block size at the same canvas columns as a range feed, so a row gets the
        same bits as from a range feed that holds its columns."""
        cols = torch.arange(width, device=starts.device)
        tail = torch.arange(full, end, device=starts.device).expand(starts.shape[0], -1)
        return cls(index=torch.cat([starts[:, None] + cols, tail], dim=1), keys="store", name=name)

    @classmethod
    def shadowed(cls, shadow: Tensor, *, name: str = "shadow") -> "ComputePlan":
        """Plain forward plus S shadow queries (B, S) at canvas columns (WINO's verification
        block): see the `shadow` field."""
        return cls(shadow=shadow, name=name)

    @classmethod
    def feature_step(cls, prompt_end: int, *, refresh_prompt: bool = False,
                     refresh_response: bool = False, rho: float = 0.0,
                     full_layers: tuple[int, ...] = (), end: int | None = None,
                     out_start: int | None = None) -> "ComputePlan":
        """dLLM-Cache step over the canvas split at `prompt_end` (= P for left-padded rows of
        a common prompt length). The residual stream runs over [0, end) (end None = L; a
        smaller end is SlowFast's truncated fast phase over dLLM-Cache). Prompt and/or response
        are recomputed per the flags; when the response is not refreshed and rho > 0, V-verify
        picks floor(rho * G) response positions per row to recompute."""
        rec = []
        if refresh_prompt:
            rec.append((0, prompt_end))
        if refresh_response:
            rec.append((prompt_end, -1))  # -1: resolved to `end` at execution
        verify = None
        if not refresh_response and rho > 0.0:
            verify = (prompt_end, -1)
        return cls(end=end, keys="store", key_end=end, write_kv=True, write_features=True,
                   reuse_features=True, recompute=tuple(rec), verify=verify, verify_rho=rho,
                   full_layers=tuple(full_layers), out_start=out_start, name="feature_step")

    @classmethod
    def subset(cls, positions: Tensor, *, shift: int = 0, attention: bool = False,
               name: str = "subset") -> "ComputePlan":
        """Recompute an arbitrary per-row subset of positions as queries, with their own RoPE
        positions, writing their fresh K/V to the store and attending to the store's K/V of
        every other position (dKV-Cache delayed caching, d2Cache). `positions` is a (B, q)
        LongTensor (rows sorted, no duplicates) or a (B, L) bool mask, fed as
        ``sparse(mask, keys="store")``: short rows are topped up with `index_pad` slots, so each
        row computes exactly what it would alone. `shift` is the model's logit shift
        (CacheStore.shift): with 1 (masks only), p + 1 joins the index for every fed p (as a
        padding slot where it is not fed), so the prediction each fed output makes is returned.
        Mask conversion syncs with the device; it happens here, never inside the forward."""
        if positions.dtype == torch.bool:
            out = None
            if shift:
                out = torch.cat([torch.zeros_like(positions[:, :1]), positions[:, :-1]], dim=1)
            return cls.sparse(positions, out=out, keys="store", attention=attention, name=name)
        if shift:
            raise ValueError("subset(shift=1) needs a (B, L) bool mask of positions")
        return cls(index=positions.long(), keys="store", attention=attention, name=name)

    @classmethod
    def sparse(cls, fed: Tensor, *, out: Tensor | None = None, keys: Literal["fed", "store"] = "fed",
               keep: Tensor | None = None, write_hidden: bool = False, drift: Drift | None = None,
               attention: bool = False, name: str = "sparse") -> "ComputePlan":
        """Feed each row its own set of positions, ``fed`` (B, L) bool (DPad's kept positions,
        Elastic-Cache's queries, the subset caches' recomputed positions). Rows are topped up to
        the batch's largest count with their smallest other positions, marked in ``index_pad``
        (see the field). ``out`` (B, L) bool: further positions to include as padding slots, to
        predict without feeding them (in a shifted family p's prediction comes from p - 1).
        With keys='fed' the fed positions attend among themselves; with keys='store' their K/V
        are written in place and they attend over the store. One host read (the batch's count)."""
        slots = fed if out is None else fed | out
        q = int(slots.sum(1).max())
        # stable sort: each row's own positions first (ascending), then its others ascending
        order = torch.argsort((~slots).to(torch.int8), dim=1, stable=True)[:, :q]
        index = order.sort(dim=1).values
        pad = ~fed.gather(1, index)
        return cls(index=index, index_pad=pad, keys=keys, keep=keep, write_hidden=write_hidden, drift=drift,
                   attention=attention, name=name)
