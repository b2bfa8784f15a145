"""LLaDA's baseline sampler as plugins (ML-GSAI/LLaDA ``generate.py``).

- ``choose_span``: the current semi-autoregressive block, i.e. the first block of
  ``generation.block_length`` columns that still holds a mask.
- ``score``: candidate = argmax of float64 Gumbel-perturbed logits (greedy at T = 0);
  confidence = noise-free float64 softmax probability of the candidate (``low_confidence``)
  or U(0, 1) (``random``).
- ``select_tokens``: the ``k`` most confident positions, ``k`` from the front-loaded linear
  schedule of the block: ``steps / num_blocks`` steps per block, masks split evenly with the
  remainder on the earliest steps.

Classifier-free guidance and the EOS switches are generation settings applied by the engine.
Under a canvas rule (``resize_canvas``) the hooks read the canvas afresh each step; masks inserted
into the current block are taken after the block's schedule, at its per-step base count (at
least one per step).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dllm_decode import PluginMeta, PluginOptions, hookimpl
from dllm_decode.blocks import block_schedule_commit, block_schedule_problems, current_block, llada_candidates


class Options(PluginOptions):
    remasking: Literal["low_confidence", "random"] = Field(
        "low_confidence", description="Confidence used to order commits: the candidate's softmax "
        "probability (low_confidence) or a uniform random number (random).")


dllm_meta = PluginMeta(summary="LLaDA baseline: block span, probability/random score, "
                       "front-loaded fixed schedule", options=Options, resizable=True)


@hookimpl
def check_recipe(recipe, slots):
    return block_schedule_problems(recipe.generation) if "select_tokens" in slots else []


@hookimpl
def choose_span(state):
    return current_block(state)


@hookimpl
def score(state, logits, positions, options):
    return llada_candidates(state, logits, positions, options.remasking)


@hookimpl
def select_tokens(state, candidates, scratch):
    return block_schedule_commit(state, candidates.confidence, scratch)
