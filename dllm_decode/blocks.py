"""Helpers several policies share: semi-autoregressive blocks, the first masked column, the
LLaDA candidates and its front-loaded schedule, and the recipe checks that go with them.

They live in the core so that no plugin imports another: a policy that builds on LLaDA's block
schedule (Prophet) or its candidates (WINO, EB-Sampler) calls these, not the ``llada`` plugin.
"""

from __future__ import annotations

from typing import Any

import torch

from dllm_decode import block_mode
from dllm_decode.noise import draws
from dllm_decode.sampling import count_at_step, gumbel_perturb, token_probability, topk_mask
from dllm_decode.state import Candidates, DecodeState


def current_block(state: DecodeState) -> torch.Tensor:
    """(B, 2) the first block (of ``generation.block_length``) that still holds a mask. Blocks
    are counted from ``block_mode.origin``: ``gen_start``, or a block-causal model's own blocks
    (a row's first block may then begin in its prompt; its span starts at ``gen_start``)."""
    bl = state.config.block
    masked = state.masked                                                   # (B, L)
    first = torch.where(masked.any(1), masked.long().argmax(1), state.length - 1)  # (B,)
    start = block_mode.block_start(state, first, bl)                        # (B,)
    end = torch.clamp(start + bl, max=state.length)
    return torch.stack([start.clamp(min=state.gen_start), end], dim=1)


def first_masked(state: DecodeState, where: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) the first masked column of each row (within ``where`` (B, L) if given; the canvas
    length when there is none)."""
    masked = state.masked if where is None else state.masked & where
    return torch.where(masked.any(1), masked.long().argmax(1), state.length)


def steps_per_block_problems(gen: Any) -> list[str]:
    """Schedules that split ``generation.steps`` evenly over the blocks need it to divide."""
    if gen.total_steps % gen.blocks:
        return [f"generation.steps ({gen.total_steps}) must be a multiple of the number of blocks "
                f"({gen.blocks} = gen_length {gen.gen_length} / block_length {gen.block})"]
    return []


def block_schedule_problems(gen: Any) -> list[str]:
    """The checks of LLaDA's fixed schedule: steps divide over the blocks, and no block gets
    more steps than positions (such steps would commit nothing)."""
    problems = steps_per_block_problems(gen)
    if not problems and gen.total_steps // gen.blocks > gen.block:
        problems.append(f"generation.steps ({gen.total_steps}) gives {gen.total_steps // gen.blocks} steps per "
                        f"block but a block has only {gen.block} positions; some steps would commit nothing")
    return problems


def llada_candidates(state: DecodeState, logits: torch.Tensor, positions: torch.Tensor | None,
                     remasking: str) -> Candidates:
    """LLaDA's candidates: float64 Gumbel-max tokens (greedy at T = 0) and, as confidence, their
    probability (``low_confidence``) or a uniform draw (``random``). (B, q, V) -> (B, q).
    Draws are the rows' own (:mod:`dllm_decode.noise`), so a row samples alike in any batch."""
    T = state.config.temperature
    u = draws(state, positions, "llada.sample", logits.shape[-1]) if T > 0 else None
    x0 = gumbel_perturb(logits, T, u).argmax(dim=-1)                      # (B, q)
    if remasking == "low_confidence":
        conf = token_probability(logits, x0)                                # (B, q) float64
    else:
        conf = draws(state, positions, "llada.remask")                     # (B, q) float64
    return Candidates(tokens=x0, confidence=conf)


def block_schedule_commit(state: DecodeState, confidence: torch.Tensor, scratch: dict) -> torch.Tensor:
    """LLaDA's front-loaded schedule: ``generation.steps`` split evenly over the blocks, each
    block's masks split evenly over its steps (remainder first); commits each row's that many
    most confident positions. Keeps its counters in ``scratch``. (B, L) -> (B, L) bool."""
    gen = state.config
    steps_per_block = gen.total_steps // gen.blocks
    start = state.span[:, 0]                                                # (B,)
    masked_in_span = (state.masked & state.in_span()).sum(dim=1)           # (B,)
    if "start" not in scratch:
        scratch.update(start=torch.full_like(start, -1), n0=masked_in_span, k_step=torch.zeros_like(start))
    # A new block (or a new span from another span plugin) restarts the schedule.
    new = start != scratch["start"]
    n0 = torch.where(new, masked_in_span, scratch["n0"])
    k_step = torch.where(new, 0, scratch["k_step"])
    k = count_at_step(n0, steps_per_block, k_step).clamp(min=1)            # (B,)
    scratch.update(start=start, n0=n0, k_step=k_step + 1)
    return topk_mask(confidence, k)
