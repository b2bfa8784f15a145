"""Dream's ``diffusion_generate`` sampler (HKUNLP/Dream ``generation_utils.py``)
and Fast-dLLM's Dream block variant (``generation_utils_block.py``; §3.5) as plugins.

- ``choose_span``: the current block of ``generation.block_length`` (one block, the whole
  canvas, unless the recipe sets a block length: Dream itself has no blocks).
- ``score``: ``sample_tokens``: logits / T, top-p, top-k, softmax; the token is the argmax
  (T = 0) or a draw; the confidence is its probability (``maskgit_plus``,
  ``confidence_threshold``), top-1 minus top-2 (``topk_margin``) or the negative entropy
  (``entropy``), all on the filtered, tempered distribution (LLaDA scores the raw one).
- ``select_tokens``: Dream's schedule ``linspace(1, eps, steps_per_block + 1)``: at step i of a
  block ``int(n_masked * (1 - s/t))`` tokens (all that remain at the last step), the top ones
  by confidence, or positions drawn from ``softmax(conf / alg_temp)``; ``origin`` instead
  commits each masked position with probability ``1 - s/t``. Both may commit nothing in a
  step: with ``steps == gen_length`` the first step commits 0 tokens (``int(0.999)``), which
  is Dream's behaviour and why this plugin declares ``idle_steps``.
  ``confidence_threshold`` commits everything at or above ``threshold``, at least the best.
  ``first_token`` (Fast-dLLM's block sampler) commits only the block's first position at the
  first step of every block, then runs the schedule from index 1.
  The schedule restarts at every new span start. Elastic-Cache's sliding window starts one
  whenever its first mask is decoded, so a request may take ``gen_length x steps / blocks``
  steps: past ``generation.max_steps`` the recipe is refused at load time (``confidence_threshold``
  and ``first_token`` commit at every step and are not limited).

Differences from the reference, all invisible at batch 1: the count uses each row's own masks
where Dream takes the batch mean (equal there, since Dream's rows always hold the same number
of masks); rows move through blocks independently; randomness comes from each row's own
keyed draws (``dllm_decode.noise``), so T > 0 draws differ from Dream's global RNG.

Under a canvas rule (``resize_canvas``) every hook reads the canvas afresh: the schedule counts the
block's masks at each step, inserted ones included, and commits all that remain at its last step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dllm_decode import Candidates, PluginMeta, PluginOptions, hookimpl
from dllm_decode.blocks import current_block, steps_per_block_problems
from dllm_decode.noise import draws, gumbel_draws
from dllm_decode.sampling import dream_sample_tokens, gumbel_topk_keys, threshold_commit, topk_mask

Alg = Literal["origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold"]


class Options(PluginOptions):
    alg: Alg = Field("entropy", description="Order of commits: origin (random, arXiv 2107.03006), "
                     "maskgit_plus (top-1 probability), topk_margin (top-1 minus top-2), entropy "
                     "(negative entropy; Dream's evaluation default), confidence_threshold "
                     "(Fast-dLLM: every token with probability >= threshold).")
    alg_temp: float | None = Field(None, ge=0.0, description="> 0: draw the committed positions "
                                   "from softmax(confidence / alg_temp) instead of taking the top ones.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus filter before sampling.")
    top_k: int | None = Field(None, ge=1, description="Top-k filter before sampling.")
    eps: float = Field(1e-3, gt=0.0, lt=1.0, description="Last time of the schedule linspace(1, eps).")
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="Confidence threshold of "
                             "alg confidence_threshold.")
    first_token: bool = Field(False, description="Fast-dLLM's Dream block sampler: the first step "
                              "of every block commits the block's first position and nothing else.")


dllm_meta = PluginMeta(summary="Dream sampler: linspace schedule, maskgit/margin/entropy/origin, "
                       "top-p/top-k; Fast-dLLM's block variant", options=Options, idle_steps=True,
                       resizable=True)


#: span plugins whose span starts at the row's first decodable mask (Elastic-Cache's sliding
#: window): every commit of that mask starts a new span, and with it a new schedule
SLIDING_SPANS = ("elastic_cache",)


def _span_plugin(recipe, slots) -> str | None:
    if "choose_span" in slots:
        return "dream"
    if recipe.choose_span is not None:
        return recipe.choose_span.plugin
    return recipe.policy.plugin if recipe.policy is not None else None


@hookimpl
def check_recipe(recipe, options, slots):
    gen = recipe.generation
    if "select_tokens" not in slots:
        return []
    problems = steps_per_block_problems(gen)
    spb = gen.total_steps // gen.blocks
    if not problems and options.first_token and options.alg != "confidence_threshold" and spb < 2:
        problems.append(f"first_token needs at least 2 steps per block (generation.steps {gen.total_steps}, "
                        f"{gen.blocks} blocks): the first only commits the block's first position")
    span = _span_plugin(recipe, slots)
    if not problems and span in SLIDING_SPANS and options.alg != "confidence_threshold" and not options.first_token:
        # the schedule restarts at every new span and may commit nothing until its last step:
        # each slide of the window takes up to spb steps, each ends with at least one commit
        worst, cap = gen.gen_length * spb, gen.max_steps or 4 * gen.gen_length
        if worst > cap:
            problems.append(
                f"alg {options.alg!r} restarts its schedule of {spb} steps per block (generation.steps "
                f"{gen.total_steps}, {gen.blocks} blocks) at every new span, and choose_span {span!r} starts one "
                f"whenever its window's first mask is decoded: a request may take up to gen_length {gen.gen_length} "
                f"x {spb} = {worst} steps, over generation.max_steps ({cap}"
                f"{'' if gen.max_steps else ', default 4 x gen_length'}); use alg confidence_threshold (the "
                f"Elastic-Cache code's rule) or first_token, at most {cap // gen.gen_length} steps per block, or "
                f"raise generation.max_steps to {worst}")
    return problems


@hookimpl
def choose_span(state):
    return current_block(state)


@hookimpl
def score(state, logits, positions, options):
    T = state.config.temperature
    gumbel = gumbel_draws(state, positions, "dream.sample", logits.shape[-1]) if T > 0 else None
    x0, conf = dream_sample_tokens(logits, T, options.top_p, options.top_k, options.alg, gumbel)
    return Candidates(tokens=x0, confidence=conf)


def schedule_fraction(i: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """(B,) step indices -> float32 ``1 - s/t`` with t, s = linspace(1, eps, steps + 1)[i, i+1],
    in float32 as Dream computes it (its integer flooring depends on that rounding)."""
    ts = torch.linspace(1, eps, steps + 1, device=i.device)                 # float32
    idx = i.clamp(max=steps - 1)
    return 1 - ts[idx + 1] / ts[idx]


@hookimpl
def select_tokens(state, candidates, options, scratch):
    gen = state.config
    spb = gen.total_steps // gen.blocks                                     # steps per block
    start = state.span[:, 0]                                                # (B,)
    eligible, conf = candidates.eligible, candidates.confidence             # (B, L)
    if "start" not in scratch:
        scratch.update(start=torch.full_like(start, -1), i=torch.zeros_like(start))
    new = start != scratch["start"]                                         # rows entering a block
    i = torch.where(new, 0, scratch["i"])                                   # (B,) schedule index

    if options.alg == "confidence_threshold":
        commit = threshold_commit(conf, options.threshold)
    else:
        n_masked = eligible.sum(dim=1)                                      # (B,)
        last = i >= spb - 1
        frac = schedule_fraction(i, spb, options.eps)                       # (B,) float32
        if options.alg == "origin":
            u = draws(state, None, "dream.origin")                          # (B, L)
            commit = eligible & ((u < frac[:, None]) | last[:, None])
        else:
            n = torch.where(last, n_masked, (n_masked.to(torch.float32) * frac).long())   # int() floors
            keys = conf if not options.alg_temp else gumbel_topk_keys(
                conf, options.alg_temp, gumbel_draws(state, None, "dream.alg_temp"))
            commit = topk_mask(keys, n) & eligible
    if options.first_token:
        first = (state.columns[None, :] == start[:, None]) & eligible      # the block's first position
        commit = torch.where(new[:, None], first, commit)
        i = torch.where(new, 1, i + 1)
    else:
        i = i + 1
    scratch.update(start=start, i=i)
    return commit
