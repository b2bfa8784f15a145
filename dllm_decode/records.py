"""What the stages of a step hand each other: candidates, selections, per-row phases, canvas
resizes, and the record of a finished step. Importable from ``dllm_decode`` (and from
``dllm_decode.state``, where they used to live)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Candidates:
    """One candidate token and confidence per position.

    From ``score`` the shapes are ``(B, q)`` over the queried positions; the engine then builds
    the canvas-wide ``(B, L)`` version handed to ``select_tokens``, where ``eligible`` is set.
    ``extra`` holds further per-position tensors (``(B, q, ...)``, e.g. an entropy per position),
    which the engine spreads onto the canvas like ``tokens`` and ``confidence`` (``(B, L, ...)``,
    zero where the forward queried nothing). ``info`` carries anything else unchanged (per-row
    values, a window, logits kept for verification).
    """

    tokens: torch.Tensor          # (B, q|L) long
    confidence: torch.Tensor      # (B, q|L) float, higher = commit sooner
    eligible: torch.Tensor | None = None  # (B, L) bool, set by the engine
    extra: dict[str, torch.Tensor] = field(default_factory=dict)   # (B, q|L, ...) per position
    info: dict[str, Any] = field(default_factory=dict)              # passed through as is


@dataclass
class Selection:
    """What ``select_tokens`` may return instead of a plain commit mask.

    ``remask`` (revocable plugins only, WINO): committed positions to mask again.
    ``finish`` (Prophet's early commit-all): rows whose every remaining mask, inside the span
    or not, is committed now with this step's candidate; the engine widens those rows' recorded
    span to the whole generated region and refuses masks the step's plan did not query.
    """

    commit: torch.Tensor                  # (B, L) bool: positions to write
    remask: torch.Tensor | None = None    # (B, L) bool: committed positions to mask again
    finish: torch.Tensor | None = None    # (B,) bool: rows to complete in this step


@dataclass(frozen=True)
class Phase:
    """What ``decide_phase`` may return instead of a plain label: a phase per row.

    ``rows[b]`` indexes ``names`` (SlowFast: 0 explore, 1 accelerate); ``label`` is the batch's
    label for traces. Caches that act on a phase (``slowfast_tail``) read ``state.phase_rows``.
    """

    names: tuple[str, ...]
    rows: torch.Tensor            # (B,) long index into names
    label: str | None = None

    def code(self, name: str) -> int:
        return self.names.index(name)


@dataclass
class StepRecord:
    """What one step did; kept in ``DecodeState.history`` for plugins, traces and metrics.

    The tensors are in the columns of the canvas as the step left it: after a ``resize_canvas``
    rule grew rows, in the new columns (new positions: not committed, confidence ``-inf``), so
    records of different steps may differ in width."""

    step: int
    span: torch.Tensor            # (B, 2) long
    phase: str | None
    committed: torch.Tensor       # (B, L) bool
    remasked: torch.Tensor | None  # (B, L) bool or None
    confidence: torch.Tensor      # (B, L) float32, -inf where not eligible
    active: torch.Tensor          # (B,) bool: rows unfinished when the step began
    resize: Resize | None = None  # the step's canvas resize: columns before it map as Resize says


@dataclass
class Resize:
    """What ``resize_canvas`` returns: new positions in some rows (variable-length generation).

    ``insert`` (B, L) long >= 0: masked positions placed right before each column, only inside a
    row's generated region (``gen_start <= column < the row's end``). ``append`` (B,) long >= 0:
    positions after the row's last one, holding ``fill``: None (the mask id: to be decoded) or a
    token id, one for every row or (B,) long, written at once (committed at this step, e.g.
    DAEDAL's EOS padding). Only rows unfinished when the step began may grow. See
    ``dllm_decode.canvas`` for how the engine applies it.
    """

    insert: torch.Tensor | None = None    # (B, L) long
    append: torch.Tensor | None = None    # (B,) long
    fill: torch.Tensor | int | None = None  # (B,) long or one id; None: masked
