"""The batched decoding state: the canvas, its masks and spans, and what happened so far.

Every tensor is batched over rows. A row's canvas is ``[pad * k | prompt | MASK * gen_length]``:
prompts are left-padded so that the generated region starts at the same column
(``gen_start``) in every row, which keeps spans, blocks and caches simple column ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

#: ``commit_step`` value of a position that is not (yet) written by decoding.
UNCOMMITTED = -1


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
    """What one step did; kept in ``DecodeState.history`` for plugins, traces and metrics."""

    step: int
    span: torch.Tensor            # (B, 2) long
    phase: str | None
    committed: torch.Tensor       # (B, L) bool
    remasked: torch.Tensor | None  # (B, L) bool or None
    confidence: torch.Tensor      # (B, L) float32, -inf where not eligible
    active: torch.Tensor          # (B,) bool: rows unfinished when the step began


@dataclass
class DecodeState:
    """Per-request decoding state. Created by the engine, read by plugins."""

    x: torch.Tensor               # (B, L) long canvas
    attention_mask: torch.Tensor  # (B, L) bool, False on left padding
    prompt_mask: torch.Tensor     # (B, L) bool, True on prompt and padding (never written)
    gen_start: int                # first generated column (same for every row)
    gen_length: int
    mask_id: int
    eos_ids: torch.Tensor         # (E,) long: ids that end an answer (EOS, end of turn)
    config: Any                   # the recipe's GenerationConfig
    generator: torch.Generator    # request-wide; its stream depends on the batch (prefer noise)
    store: Any = None             # the model's per-request cache store (None without a model)
    noise: Any = None             # dllm_decode.noise.RowNoise: per-row keyed random draws
    prompt_lengths: torch.Tensor | None = None  # (B,) long, prompt tokens without padding
    commit_step: torch.Tensor = None  # (B, L) long, UNCOMMITTED until written
    span: torch.Tensor = None     # (B, 2) long, this step's span
    phase: str | None = None
    phase_rows: Phase | None = None  # per-row phases, when decide_phase gives them
    step: int = 0                 # steps taken so far (== forwards, unless a plugin skips one)
    nfe: int = 0                  # model forward calls (a CFG pair counts once)
    guide_nfe: int = 0            # unconditional forwards run on their own (cache_policy -> Guided)
    guide_store: Any = None       # the unconditional rows' cache store (Guided plans only)
    guide_residual: torch.Tensor | None = None  # (B, q, V) last cond - uncond logits (Guided plans)
    row_nfe: torch.Tensor = None  # (B,) long: forwards while each row was unfinished
    done: torch.Tensor = None     # (B,) bool
    history: list[StepRecord] = field(default_factory=list)
    remask_log: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, (n,2) row/col)
    scratch: dict[str, dict] = field(default_factory=dict)  # plugin name -> private dict
    timings: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # plugin-reported, e.g. verifier forwards
    _memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        B, L = self.x.shape
        if self.commit_step is None:
            self.commit_step = torch.full((B, L), UNCOMMITTED, dtype=torch.long, device=self.x.device)
        if self.span is None:
            self.span = self.gen_span()
        if self.row_nfe is None:
            self.row_nfe = torch.zeros(B, dtype=torch.long, device=self.x.device)
        if self.done is None:
            self.done = ~self.masked.any(dim=1)

    # ------------------------------------------------------------------ engine writes

    def set_canvas(self, x: torch.Tensor, commit_step: torch.Tensor, masked: torch.Tensor) -> None:
        """The engine's write of a step's canvas, with its mask already computed."""
        self.x, self.commit_step = x, commit_step
        self._memo["x"], self._memo["masked"] = x, masked

    def close(self) -> None:
        """End of the request: drop the plugins' scratch; count, then free, the cache stores."""
        self.scratch.clear()
        stores = [s for s in (self.store, self.guide_store) if s is not None and hasattr(s, "clear")]
        if stores:
            self.counters["flops"] = sum(getattr(s, "flops", 0.0) for s in stores)
            self.counters["store_bytes"] = sum(s.nbytes() if hasattr(s, "nbytes") else 0 for s in stores)
            for s in stores:
                s.clear()
        if self.guide_nfe:
            self.counters["guide_forwards"] = self.guide_nfe
        self.guide_residual = None

    # ------------------------------------------------------------------ derived views

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    # The derived masks below are read several times per step by the engine and the plugins.
    # They are memoised on the identity of the tensor they derive from: the engine replaces
    # ``x`` and ``span`` with new tensors every step and nothing writes them in place.

    @property
    def masked(self) -> torch.Tensor:
        """(B, L) bool: positions still holding the mask token."""
        memo = self._memo
        if memo.get("x") is not self.x:
            memo["x"], memo["masked"] = self.x, self.x == self.mask_id
        return memo["masked"]

    def constant(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per request under ``key`` (tensors every step reuses)."""
        memo = self._memo
        if key not in memo:
            memo[key] = make()
        return memo[key]

    @property
    def columns(self) -> torch.Tensor:
        """(L,) long: column indices, handy for span arithmetic."""
        return self.constant("columns", lambda: torch.arange(self.length, device=self.device))

    @property
    def last(self) -> StepRecord | None:
        return self.history[-1] if self.history else None

    def gen_span(self) -> torch.Tensor:
        """(B, 2) span covering the whole generated region."""
        span = torch.tensor([self.gen_start, self.length], dtype=torch.long, device=self.device)
        return span.expand(self.batch_size, 2).clone()

    def in_span(self, span: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) bool: columns inside each row's span (this step's span when none is given)."""
        memo = self._memo
        if span is None:
            if memo.get("span") is self.span:
                return memo["in_span"]
            memo["span"], memo["in_span"] = self.span, self.in_span(self.span)
            return memo["in_span"]
        cols = self.columns
        return (cols >= span[:, :1]) & (cols < span[:, 1:])

    def generated(self) -> torch.Tensor:
        """(B, gen_length) the generated region of the canvas."""
        return self.x[:, self.gen_start:]

    def confidence_history(self) -> list[torch.Tensor]:
        """Per-step (B, L) float32 confidences, oldest first (``-inf`` where not eligible)."""
        return [r.confidence for r in self.history]
