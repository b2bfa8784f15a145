"""Canvas rules: rows that grow during a request (variable-length generation, e.g. DAEDAL).

A ``resize_canvas`` plugin returns a :class:`dllm_decode.state.Resize` after a step's commit.
:func:`apply_resize` checks it, naming the plugin, and moves every per-position tensor of the
state to the new columns:

- a row's old column ``j`` moves right by the number of positions placed before it: insertions
  before ``j`` go just left of it, appended positions after the row's last column. Inserted
  positions are masked; appended ones hold ``fill`` (masked, or a token committed at this step);
- rows may grow unevenly: the canvas is as wide as its longest row and ``state.ends`` (B,) holds
  each row's end; the columns past it are padding (pad id, not attended, never written, outside
  every row's result), as left padding is before the prompt;
- ``state.gen_length`` becomes ``L - gen_start``; this step's record (commits, confidences,
  re-masks, span) moves to the new columns too and keeps the ``Resize`` in
  ``state.last.resize``; older records keep the columns of their own step;
- the request's cache stores are cleared (their FLOP counts kept; widened instead when positions
  are only appended and the caller asks to keep them, as a block-causal request does): K/V of a moved position
  belong to its old column (RoPE) and to a canvas without the new positions. A cache plugin
  that declares ``PluginMeta.resizable`` rebuilds what it reuses after a resize (``kv_block``
  refreshes); the loader refuses a canvas rule next to any plugin that does not declare it
  (``dllm_decode.policy``), since columns kept in a plugin's scratch would no longer match;
- memoised constants (``state.constant``) are dropped and rebuilt for the new width, and rows
  given masked positions are no longer done (a row that finished in this step may be grown).

Every check and the new width come from one host read, only in steps whose rule returned a
``Resize``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dllm_decode.errors import PluginError
from dllm_decode.state import UNCOMMITTED, DecodeState, Resize

NEG_INF = float("-inf")
LONG = (torch.long, torch.int32)
PROBLEMS = ("negative counts", "insertions outside the row's generated region", "growth of a row finished "
            "before this step", "fill ids outside the vocabulary", "rows past the model's max_length")


def _tensor(blame: Callable[[str], PluginError], value: Any, shape: tuple[int, ...], what: str,
            device: torch.device) -> torch.Tensor:
    if value is None:
        return torch.zeros(shape, dtype=torch.long, device=device)
    if isinstance(value, int) and not isinstance(value, bool) and len(shape) == 1:
        return torch.full(shape, value, dtype=torch.long, device=device)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype not in LONG:
        got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise blame(f"Resize.{what} is {got}, expected a long tensor of shape {shape}")
    return value.to(torch.long)


def _checked(state: DecodeState, r: Any, active: torch.Tensor, blame: Callable[[str], PluginError],
             vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    """(insert (B, L), append (B,), fill (B,)), the new width and whether anything grows; raises
    naming the plugin for every broken rule at once."""
    if not isinstance(r, Resize):
        raise blame(f"returned {type(r).__name__}, expected a Resize or None")
    (B, L), dev = state.x.shape, state.device
    ins = _tensor(blame, r.insert, (B, L), "insert", dev)
    app = _tensor(blame, r.append, (B,), "append", dev)
    fill = _tensor(blame, state.mask_id if r.fill is None else r.fill, (B,), "fill", dev)
    cols = state.columns
    region = (cols >= state.gen_start) & (cols < state.ends[:, None])   # (B, L) a row's generated columns
    grown = ins.sum(dim=1) + app                                         # (B,)
    new_ends = state.ends + grown
    limit = state.max_length
    over = torch.zeros_like(active) if limit is None else state.prompt_lengths + new_ends - state.gen_start > limit
    bad = torch.stack([(ins < 0).any(dim=1) | (app < 0), ((ins != 0) & ~region).any(dim=1),
                       (grown != 0) & ~active, ((fill < 0) | (fill >= vocab_size)) & (app > 0), over])   # (5, B)
    read = torch.cat([bad.any(dim=1).long(), new_ends.max()[None], grown.any()[None].long()]).tolist()
    broken = [f"{what} in row(s) {torch.nonzero(bad[i]).flatten().tolist()}"
              for i, what in enumerate(PROBLEMS) if read[i]]
    if broken:
        raise blame("returned a Resize with " + "; ".join(broken))
    return ins, app, fill, read[len(PROBLEMS)], bool(read[-1])


def _placed_before(ins: torch.Tensor, app: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(B, L + 1) long: new positions placed right before each old column (appended ones before
    the row's end column)."""
    return F.pad(ins, (0, 1)).scatter_add_(1, ends[:, None], app[:, None])


def moved_columns(r: Resize, ends: torch.Tensor, L: int) -> torch.Tensor:
    """(B, L) long: the column each old column of a row moves to under ``r`` (applied to a
    canvas of width ``L`` whose rows end at ``ends``), -1 past a row's end. For tools that follow
    positions across a resize (``state.last.resize``), e.g. the invariant kit."""
    B, dev = ends.shape[0], ends.device
    ins = torch.zeros((B, L), dtype=torch.long, device=dev) if r.insert is None else r.insert.long()
    app = torch.as_tensor(0 if r.append is None else r.append, device=dev).long().expand(B)
    cols = torch.arange(L, device=dev)
    moved = cols + _placed_before(ins, app, ends).cumsum(dim=1)[:, :L]
    return torch.where(cols < ends[:, None], moved, -1)


def apply_resize(state: DecodeState, r: Any, active: torch.Tensor, *, blame: Callable[[str], PluginError],
                 pad_id: int, vocab_size: int, keep_stores: bool = False) -> bool | None:
    """Apply ``r`` (see the module doc) to ``state``. Returns whether every row is done
    afterwards, or None when nothing grew (the state is untouched). ``keep_stores``: ``r`` only
    appends (no column moves, as a block-causal request grows), so the cache stores are widened
    to the new width and keep what they hold."""
    if keep_stores and r.insert is not None:
        raise blame("a Resize that keeps the cache stores may only append positions")
    ins, app, fill, W, grows = _checked(state, r, active, blame, vocab_size)
    if not grows:
        return None
    (B, L), dev, step = state.x.shape, state.device, state.last.step
    shift = _placed_before(ins, app, state.ends).cumsum(dim=1)                         # (B, L + 1)
    # old columns of each row go to their new column; the padding past a row's end to a sink W
    target = torch.where(state.columns < state.ends[:, None], state.columns + shift[:, :L], W)   # (B, L)
    new_ends = state.ends + ins.sum(dim=1) + app
    new_cols = torch.arange(W, device=dev)
    in_row = new_cols < new_ends[:, None]                                             # (B, W)
    appended = in_row & (new_cols >= (new_ends - app)[:, None])
    written = appended & (fill != state.mask_id)[:, None]

    def move(old: torch.Tensor, new: Any, tail: Any) -> torch.Tensor:
        """``old`` (B, L) at its new columns; ``new`` at new positions, ``tail`` past a row's end."""
        out = torch.where(in_row, torch.as_tensor(new, dtype=old.dtype, device=dev),
                          torch.as_tensor(tail, dtype=old.dtype, device=dev))
        return F.pad(out, (0, 1)).scatter_(1, target, old)[:, :W]

    x = move(state.x, torch.where(appended, fill[:, None], state.mask_id), pad_id)
    commit_step = move(state.commit_step, torch.where(written, step, UNCOMMITTED), UNCOMMITTED)
    state.attention_mask = move(state.attention_mask, True, False)
    state.prompt_mask = move(state.prompt_mask, False, True)          # padding: never written
    rec = state.last
    # a boundary b of the old columns (span ends) maps past every position placed before column b
    span = rec.span + F.pad(shift, (1, 0)).gather(1, rec.span)
    state.history[-1] = replace(rec, span=span, resize=r, committed=move(rec.committed, False, False),
                                confidence=move(rec.confidence, NEG_INF, NEG_INF),
                                remasked=None if rec.remasked is None else move(rec.remasked, False, False))
    state.span, state.ends, state.gen_length = span, new_ends, W - state.gen_start
    for store in (state.store, state.guide_store):
        if keep_stores and store is not None and hasattr(store, "widen"):
            store.widen(W)
        elif store is not None and hasattr(store, "clear"):
            flops = getattr(store, "flops", 0.0)
            store.clear()
            store.flops = flops
    state.guide_residual = None
    state._memo.clear()
    masked = x == state.mask_id
    state.set_canvas(x, commit_step, masked)
    state.done = ~masked.any(dim=1)
    return bool(state.done.all())
