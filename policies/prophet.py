"""Prophet's early commit-all (arXiv 2508.19982; pixeli99/Prophet ``generate_earlyexit.py``) on top
of LLaDA's block decoding, as span / score / selection plugins.

Decoding is LLaDA's (current block, low-confidence or random order, front-loaded schedule of
``steps / num_blocks`` steps per block). At every step ``score`` also measures how settled the
answer is: the mean over an *answer window* of the gap between the largest and the second
largest logit. When the gap reaches the threshold of the current phase of decoding (progress
``= forwards so far / generation.steps``: ``early_threshold`` below ``early_until``,
``mid_threshold`` below ``mid_until``, ``late_threshold`` after), ``select_tokens`` finishes the
row: every mask left in the canvas, in every block, takes this step's candidate (the argmax,
or the Gumbel-max sample at T > 0) and the row stops. This uses ``Selection.finish``: the only
way to commit outside the current block, which the trigger (known only once the logits are in)
cannot arrange through ``choose_span``.

The answer window: the reference forces "The answer is" at fixed offsets (200-202 of a 256-token
canvas) and watches the 5 positions from the first forced token. There are no forced tokens
here; the window starts ``answer_start`` positions after the start of the generated region
(default 0: the first ``answer_length`` generated positions) and is clipped to the canvas. The
gap is taken whether the positions are masked or already decoded, as in the reference.

Deviations: the gap is computed on the logits ``score`` receives, on which the engine has set the
mask token's logit (and, with ``eos.ban``, the EOS logits) to -inf; the reference takes raw
logits (the mask token is never among a trained model's top two in practice). The gap is taken
in float64 from the two largest logits. The reference's confidence is a softmax in the model
dtype, here float64 as in LLaDA. Rows of a batch trigger independently (the reference runs one
row). The plan must query every position still masked when a row finishes (no cache, or a
cache whose plan covers the rest of the canvas); otherwise the engine refuses the step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from dllm_decode import PluginMeta, PluginOptions, Selection, hookimpl
from dllm_decode.blocks import block_schedule_commit, block_schedule_problems, current_block, llada_candidates


class Options(PluginOptions):
    remasking: Literal["low_confidence", "random"] = Field(
        "low_confidence", description="Commit order of the LLaDA schedule: the candidate's softmax "
        "probability (low_confidence) or a uniform random number (random).")
    answer_start: int = Field(0, ge=0, description="First position of the answer window, counted "
                              "from the start of the generated region (the reference: the first "
                              "forced token, e.g. 200).")
    answer_length: int = Field(5, ge=1, le=4096, description="Positions in the answer window whose "
                               "mean top-1 minus top-2 logit gap is watched.")
    early_threshold: float = Field(7.5, ge=0.0, description="Gap that finishes decoding while "
                                   "progress < early_until.")
    mid_threshold: float = Field(5.0, ge=0.0, description="Gap that finishes decoding while "
                                 "early_until <= progress < mid_until.")
    late_threshold: float = Field(2.5, ge=0.0, description="Gap that finishes decoding once "
                                  "progress >= mid_until.")
    early_until: float = Field(0.33, ge=0.0, le=1.0, description="End of the early phase, as a "
                               "fraction of generation.steps.")
    mid_until: float = Field(0.67, ge=0.0, le=1.0, description="End of the middle phase, as a "
                             "fraction of generation.steps.")

    @model_validator(mode="after")
    def _phases_ordered(self) -> "Options":
        if self.mid_until < self.early_until:
            raise ValueError(f"mid_until ({self.mid_until}) must not be below early_until ({self.early_until})")
        return self


dllm_meta = PluginMeta(summary="Prophet: LLaDA blocks plus early commit-all once the answer's "
                       "top-2 logit gap is wide enough", options=Options,
                       pairs=(("select_tokens", "score"),))

GAP = "prophet_gap"        # Candidates.info key: (B,) float64 mean gap, NaN without a window


@hookimpl
def check_recipe(recipe, options, slots):
    gen = recipe.generation
    problems = []
    if "select_tokens" in slots:
        problems += block_schedule_problems(gen)
    if "score" in slots and options.answer_start >= gen.gen_length:
        problems.append(f"answer_start ({options.answer_start}) must lie inside the generated region "
                        f"(gen_length {gen.gen_length})")
    return problems


@hookimpl
def choose_span(state):
    return current_block(state)


def answer_gap(state, logits: torch.Tensor, positions: torch.Tensor | None, options: Options) -> torch.Tensor:
    """(B,) float64 mean top-1 minus top-2 logit over the answer window's columns that the
    logits cover; NaN for a row that has none."""
    B, q, _ = logits.shape
    lo = state.gen_start + options.answer_start
    cols = torch.arange(lo, min(lo + options.answer_length, state.length), device=logits.device)  # (n,)
    if positions is None:
        j = cols.expand(B, -1)                                              # (B, n)
        found = torch.ones_like(j, dtype=torch.bool)
    else:                                                                   # rows of positions ascend
        target = cols.expand(B, -1).contiguous()
        j = torch.searchsorted(positions.contiguous(), target).clamp(max=q - 1)
        found = positions.gather(1, j) == target
    window = logits.gather(1, j[..., None].expand(-1, -1, logits.shape[-1]))      # (B, n, V)
    top2 = window.topk(2, dim=-1).values.to(torch.float64)                  # (B, n, 2)
    gap = torch.where(found, top2[..., 0] - top2[..., 1], 0.0)
    n = found.sum(1)
    return torch.where(n > 0, gap.sum(1) / n.clamp(min=1), float("nan"))


@hookimpl
def score(state, logits, positions, options):
    cand = llada_candidates(state, logits, positions, options.remasking)
    cand.info[GAP] = answer_gap(state, logits, positions, options)
    return cand


@hookimpl
def select_tokens(state, candidates, options, scratch):
    commit = block_schedule_commit(state, candidates.confidence, scratch)
    gap = candidates.info.get(GAP)
    if gap is None:
        return commit
    progress = (state.step + 1) / state.config.total_steps                 # the reference counts this step
    if progress < options.early_until:
        threshold = options.early_threshold
    elif progress < options.mid_until:
        threshold = options.mid_threshold
    else:
        threshold = options.late_threshold
    return Selection(commit=commit, finish=gap >= threshold)                # NaN compares False
