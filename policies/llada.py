"""LLaDA's baseline sampler as plugins (ML-GSAI/LLaDA ``generate.py``; ALGORITHMS.md §1).

- ``choose_span``: the current semi-autoregressive block, i.e. the first block of
  ``generation.block_length`` columns that still holds a mask.
- ``score``: candidate = argmax of float64 Gumbel-perturbed logits (greedy at T = 0);
  confidence = noise-free float64 softmax probability of the candidate (``low_confidence``)
  or U(0, 1) (``random``).
- ``select_tokens``: the ``k`` most confident positions, ``k`` from the front-loaded linear
  schedule of the block: ``steps / num_blocks`` steps per block, masks split evenly with the
  remainder on the earliest steps.

Classifier-free guidance and the EOS switches are generation settings applied by the engine.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dllm_decode.hookspecs import hookimpl
from dllm_decode.plugins import PluginMeta, PluginOptions
from dllm_decode.sampling import count_at_step, gumbel_perturb, token_probability, topk_mask
from dllm_decode.state import Candidates


class Options(PluginOptions):
    remasking: Literal["low_confidence", "random"] = Field(
        "low_confidence", description="Confidence used to order commits: the candidate's softmax "
        "probability (low_confidence) or a uniform random number (random).")


dllm_meta = PluginMeta(summary="LLaDA baseline: block span, probability/random score, "
                       "front-loaded fixed schedule", options=Options)


def steps_per_block_problems(gen) -> list[str]:
    """Schedules that split ``generation.steps`` evenly over the blocks need it to divide."""
    if gen.total_steps % gen.blocks:
        return [f"generation.steps ({gen.total_steps}) must be a multiple of the number of blocks "
                f"({gen.blocks} = gen_length {gen.gen_length} / block_length {gen.block})"]
    return []


@hookimpl
def check_recipe(recipe, slots):
    gen = recipe.generation
    if "select_tokens" not in slots:
        return []
    problems = steps_per_block_problems(gen)
    if not problems and gen.total_steps // gen.blocks > gen.block:
        problems.append(f"generation.steps ({gen.total_steps}) gives {gen.total_steps // gen.blocks} steps per "
                        f"block but a block has only {gen.block} positions; some steps would commit nothing")
    return problems


def current_block(state) -> torch.Tensor:
    """(B, 2) the first block (of ``generation.block_length``) that still holds a mask."""
    bl = state.config.block
    masked = state.masked                                                   # (B, L)
    first = torch.where(masked.any(1), masked.long().argmax(1), state.length - 1)  # (B,)
    start = state.gen_start + (first - state.gen_start).div(bl, rounding_mode="floor") * bl
    end = torch.clamp(start + bl, max=state.length)
    return torch.stack([start, end], dim=1)


@hookimpl
def choose_span(state):
    return current_block(state)


@hookimpl
def score(state, logits, options):
    x0 = gumbel_perturb(logits, state.config.temperature, state.generator).argmax(dim=-1)  # (B, q)
    if options.remasking == "low_confidence":
        conf = token_probability(logits, x0)                                # (B, q) float64
    else:
        conf = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=state.generator)
    return Candidates(tokens=x0, confidence=conf)


@hookimpl
def select_tokens(state, candidates, scratch):
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
    return topk_mask(candidates.confidence, k)
