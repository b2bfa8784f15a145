"""The batched decoding state: the canvas, its masks and spans, and what happened so far.

Every tensor is batched over rows. A row's canvas is ``[pad * k | prompt | MASK * gen_length]``:
prompts are left-padded so that the generated region starts at the same column
(``gen_start``) in every row, which keeps spans, blocks and caches simple column ranges. A
``resize_canvas`` rule may grow rows during the request (``dllm_decode.canvas``), and so does a
block-causal model's request, one block at a time (``dllm_decode.block_mode``); a row then ends
at ``ends[b]`` and the columns past it are padding (not attended, never written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dllm_decode.records import Candidates, Phase, Resize, Selection, StepRecord  # noqa: F401 (re-exported)

#: ``commit_step`` value of a position that is not (yet) written by decoding.
UNCOMMITTED = -1


@dataclass
class DecodeState:
    """Per-request decoding state. Created by the engine, read by plugins."""

    x: torch.Tensor               # (B, L) long canvas
    attention_mask: torch.Tensor  # (B, L) bool, False on left padding
    prompt_mask: torch.Tensor     # (B, L) bool, True on prompt and padding (never written)
    gen_start: int                # first generated column (same for every row)
    gen_length: int               # generated columns of the canvas (L - gen_start)
    mask_id: int
    eos_ids: torch.Tensor         # (E,) long: ids that end an answer (EOS, end of turn)
    config: Any                   # the recipe's GenerationConfig
    generator: torch.Generator    # request-wide; its stream depends on the batch (prefer noise)
    store: Any = None             # the model's per-request cache store (None without a model)
    noise: Any = None             # dllm_decode.noise.RowNoise: per-row keyed random draws
    prompt_lengths: torch.Tensor | None = None  # (B,) long, prompt tokens without padding
    ends: torch.Tensor = None     # (B,) long: each row's canvas end (L until a canvas rule grows rows)
    max_length: int | None = None  # the model's limit on a row's prompt + generated positions
    blocks: Any = None            # block_mode.BlockLayout: a block-causal model's request grows by blocks
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
    live_rows: torch.Tensor | None = None  # (b,) long: the unfinished rows, once some row finished (None: all)
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
        if self.ends is None:
            self.ends = torch.full((B,), L, dtype=torch.long, device=self.x.device)
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
        """(B, gen_length) the generated region of the canvas (with the padding past each row's
        end, when a canvas rule grew rows unevenly; see :meth:`generated_rows`)."""
        return self.x[:, self.gen_start:]

    def generated_rows(self, values: torch.Tensor | None = None) -> list[list[int]]:
        """Each row's generated region up to its own end, as host lists (of ``values`` (B, L),
        default the canvas)."""
        values = self.x if values is None else values
        return [row[self.gen_start:end] for row, end in zip(values.tolist(), self.ends.tolist())]

    def confidence_history(self) -> list[torch.Tensor]:
        """Per-step (B, L) float32 confidences, oldest first (``-inf`` where not eligible)."""
        return [r.confidence for r in self.history]
