"""Streaming: what each step of a request wrote, per row, built on ``Decoder.steps``.

A diffusion decoder commits tokens anywhere in the canvas, not left to right. What a client can
show as settled text is the *committed prefix*: the generated tokens up to the first position
still masked, cut before the first stop id (EOS / end of turn). Each :class:`RowUpdate` carries
that prefix and the positions written this step, so a terminal can draw the whole canvas
filling in and an HTTP stream can send the prefix's growth as deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from dllm_decode.engine import Decoder
from dllm_decode.state import DecodeState


@dataclass(frozen=True)
class RowUpdate:
    """One row after one step."""

    row: int                      # the row's index in its batch
    step: int                     # steps the request has taken, this one included
    positions: list[int]          # generated-token indices written this step
    tokens: list[int]             # the tokens written there
    remasked: list[int]           # generated-token indices masked again this step (WINO)
    prefix: list[int]             # committed prefix: up to the first mask, before the first stop id
    canvas: list[int]             # the row's whole generated region (mask ids where still masked)
    finished: bool                # the row is done (no mask left, or its stop id committed)
    text: str | None = None       # the prefix decoded, with a tokenizer


def prefix_lengths(state: DecodeState) -> torch.Tensor:
    """(B,) long: each row's committed prefix length (first mask, or first stop id, or the row's
    generated length)."""
    gen = state.generated()                                                  # (B, G)
    G = gen.shape[1]
    cols = torch.arange(G, device=gen.device)
    masked = state.masked[:, state.gen_start:]
    stops = torch.isin(gen, state.eos_ids) & ~masked
    first = lambda hit: torch.where(hit, cols, G).amin(dim=1)               # noqa: E731
    # a canvas rule may have grown rows unevenly: nothing past a row's own end counts
    return torch.minimum(torch.minimum(first(masked), first(stops)), state.ends - state.gen_start)


def row_updates(state: DecodeState, tokenizer: Any = None) -> list[RowUpdate]:
    """Every row's :class:`RowUpdate` for the step ``state`` just took (one host read)."""
    last = state.last
    written = state.generated_rows(last.committed)
    remasked = state.generated_rows(last.remasked) if last.remasked is not None else None
    canvas = state.generated_rows()
    lengths = prefix_lengths(state).tolist()
    done = state.done.tolist()
    out = []
    for b, (row, w, n) in enumerate(zip(canvas, written, lengths)):   # host lists, after the step
        pos = [i for i, hit in enumerate(w) if hit]
        prefix = row[:n]
        out.append(RowUpdate(row=b, step=state.step, positions=pos, tokens=[row[i] for i in pos],
                             remasked=[i for i, hit in enumerate(remasked[b]) if hit] if remasked else [],
                             prefix=prefix, canvas=row, finished=bool(done[b]),
                             text=tokenizer.decode(prefix, skip_special_tokens=True) if tokenizer else None))
    return out


def stream(decoder: Decoder, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None = None,
           tokenizer: Any = None) -> Iterator[list[RowUpdate]]:
    """Decode one batch of ``prompts``, yielding every row's :class:`RowUpdate` after each step.
    The tokens are exactly those of ``decoder.generate`` for the same prompts and seeds."""
    for state in decoder.steps([list(p) for p in prompts], seeds):
        yield row_updates(state, tokenizer if tokenizer is not None else decoder.tokenizer)
