"""The candidates and commit stages of a step, as pure functions of tensors.

``spread`` puts ``score``'s candidates over the queried positions onto the canvas and marks which
positions may be committed; ``commit`` turns ``select_tokens``' selection into the next canvas and
reduces every contract check to per-row violation flags, read by the engine in the step's one
host sync. Neither touches the decoding state: the engine writes what they return, or raises from
the flags and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dllm_decode.state import UNCOMMITTED, Candidates, Selection

NEG_INF = float("-inf")

#: Per-row violation flags, in the order the engine raises them.
CHECKS = ("bad_span", "empty_span", "nan_logits", "nan_conf", "outside", "stall", "bad_fill",
          "bad_token", "remask", "bad_remask")


def spread(canvas: Tensor, cand: Candidates, positions: Tensor | None, eligible: Tensor) -> Candidates:
    """Canvas-wide candidates: (B, q) tokens, confidence and ``extra`` tensors scattered to
    (B, L) at ``positions`` (None: already canvas-wide). Unqueried columns keep the canvas token,
    confidence ``-inf`` and zero extras; ``eligible`` (B, L) is narrowed to queried columns and
    the confidence is ``-inf`` wherever a position may not be committed."""
    tokens, conf, extra = cand.tokens, cand.confidence, cand.extra
    if positions is not None:
        B, L = canvas.shape
        tokens = canvas.clone().scatter_(1, positions, tokens)
        conf = torch.full((B, L), NEG_INF, dtype=conf.dtype, device=conf.device).scatter_(1, positions, conf)
        eligible = eligible & torch.zeros_like(eligible).scatter_(1, positions, True)
        extra = {k: _scatter(v, positions, L) for k, v in extra.items()}
    conf = torch.where(eligible, conf, NEG_INF)
    return Candidates(tokens=tokens, confidence=conf, eligible=eligible, extra=extra, info=cand.info)


def _scatter(value: Tensor, positions: Tensor, L: int) -> Tensor:
    """(B, q, ...) -> (B, L, ...), zero where ``positions`` (B, q) does not point."""
    index = positions.view(*positions.shape, *[1] * (value.dim() - 2)).expand_as(value)
    out = torch.zeros((value.shape[0], L, *value.shape[2:]), dtype=value.dtype, device=value.device)
    return out.scatter_(1, index, value)


@dataclass
class Committed:
    """The next canvas of a step and what it took; nothing here is written to the state yet."""

    x: Tensor                # (B, L) canvas after writes, re-masks and EOS stops
    commit_step: Tensor      # (B, L) long
    written: Tensor          # (B, L) bool: positions written this step (commits and finished rows' fills)
    fill: Tensor | None      # (B, L) bool: the finished rows' fills, if the selection finished any
    left: Tensor             # (B,) bool: rows with a mask left
    rows: dict[str, Tensor]  # check name -> (B,) bool, the rows that broke it
    flags: dict[str, bool]   # check name -> broken in any row (read in one host sync)
    masked: Tensor           # (B, L) bool: x == mask id
    finished: bool           # every row is finished
    completed: bool = False  # some row took its last mask in this step


def commit(canvas: Tensor, masked: Tensor, commit_step: Tensor, prompt_mask: Tensor, sel: Selection,
           cand: Candidates, *, step: int, active: Tensor, mask_id: int, vocab_size: int,
           stop_ids: Tensor | None, gen_start: int, checks: dict[str, Tensor]) -> Committed:
    """Apply ``sel`` to ``canvas`` (B, L), whose ``masked`` (B, L) the state already holds, with
    the canvas-wide ``cand``.

    ``checks`` holds the per-row flags of the earlier stages (span, NaN logits, NaN confidence);
    ``stop_ids`` (E,): finish rows whose committed text ends in one of them (``eos.stop``)."""
    fill = None if sel.finish is None else (sel.finish & active)[:, None] & masked   # (B, L)
    written = sel.commit if fill is None else sel.commit | fill
    n_written = written.sum(dim=1)                                         # (B,)
    tokens = cand.tokens
    x = torch.where(written, tokens, canvas)
    steps = torch.where(written, step, commit_step)
    no_rows = torch.zeros_like(active)
    rows = dict(checks)
    rows["outside"] = (sel.commit > cand.eligible).any(dim=1)             # bools: a > b is a & ~b
    rows["stall"] = active & (n_written == 0)
    # a fill needs a candidate at every mask: unqueried columns still hold the mask id
    rows["bad_fill"] = no_rows if fill is None else (fill & (tokens == mask_id)).any(dim=1)
    rows["bad_token"] = (sel.commit & ((tokens < 0) | (tokens >= vocab_size) | (tokens == mask_id))).any(dim=1)
    rows["remask"] = no_rows if sel.remask is None else sel.remask.any(dim=1)
    rows["bad_remask"] = no_rows
    if sel.remask is not None:
        bad = sel.remask & ((commit_step == UNCOMMITTED) | written | prompt_mask)
        rows["bad_remask"] = bad.any(dim=1)
        x = torch.where(sel.remask, mask_id, x)
        steps = torch.where(sel.remask, UNCOMMITTED, steps)
    if stop_ids is not None:
        x, steps = stop_at_eos(x, steps, step, mask_id, stop_ids, gen_start)
    masked_after = x == mask_id
    left = masked_after.any(dim=1)                                         # (B,)
    # every check reduced per row, then all at once: the step's one host sync
    flags = torch.stack([rows[c] for c in CHECKS] + [left, active > left]).any(dim=1).tolist()
    return Committed(x=x, commit_step=steps, written=written, fill=fill, left=left, rows=rows,
                     flags=dict(zip(CHECKS, flags[:-2])), masked=masked_after, finished=not flags[-2],
                     completed=flags[-1])


def stop_at_eos(x: Tensor, commit_step: Tensor, step: int, mask_id: int, stop_ids: Tensor,
                gen_start: int) -> tuple[Tensor, Tensor]:
    """Finish rows whose committed text ends in a stop id: fill their remaining masks with it."""
    B, L = x.shape
    gen = torch.arange(L, device=x.device) >= gen_start                    # (L,)
    is_eos = torch.isin(x, stop_ids) & gen                                 # (B, L)
    masked = x == mask_id
    first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), L)     # (B,)
    first_mask = torch.where(masked.any(1), masked.long().argmax(1), L)    # (B,)
    fill = masked & (first_eos < first_mask)[:, None]
    eos_tok = x.gather(1, first_eos.clamp(max=L - 1)[:, None])             # (B, 1) the EOS that ended it
    return torch.where(fill, eos_tok, x), torch.where(fill, step, commit_step)
