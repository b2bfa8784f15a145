"""WINO, wide-in narrow-out revokable decoding (arXiv 2507.18578; Feng-Hong/WINO-DLLM
``LLaDA/decoding.py decoding_wino``), as span / cache / score / selection
plugins.

Blocks are decoded in order; a block is done when it holds no mask. Every forward also runs a
*shadow block*: one extra MASK query per column of the current block, with that column's RoPE
position, which attends to the whole canvas except its own column (and to the other shadow
queries), while no canvas position attends to the shadows. A shadow query therefore predicts
its column as if the token there were hidden: the draft and its verification come from one
forward (``cache_policy`` returns a ``ComputePlan`` with ``shadow``; ``score`` receives the
shadow logits as ``shadow_logits``).

- wide in: commit every masked block token whose probability exceeds ``tau_in``; when more than
  ``cap = min(max(floor(cap_ratio * masked), cap_min), cap_max)`` qualify, the ``cap`` most
  probable; when none does, the single most probable.
- narrow out: a block token decoded in an earlier step is re-masked when its shadow probability
  (the probability of the committed token at its shadow query) is below ``tau_out``. Only in a
  step that accepted more than one token, and when at least ``last`` tokens qualify (``last``:
  tokens accepted by the previous step of the block; 30 before the first), only the ``last - 1``
  lowest.

Exact at T = 0 against a loop re-derived from the reference (tests/reference_wino.py). Choices
and deviations:
- the shadow and canvas probabilities are softmaxes of the logits ``score`` receives, on which
  the engine has set the mask token's logit (and with ``eos.ban`` the EOS ones) to -inf; the
  reference keeps the mask token in the softmax (a trained model gives it ~0);
- a padded batch decodes each row as alone: each row has its own block, shadow positions,
  re-mask budget and step counter (the reference runs one row);
- classifier-free guidance, absent from the reference, combines the shadow logits like the
  canvas ones;
- LLaDA family only: a shifted-logit (Dream) model has no leave-one-out query for a column (its
  prediction of column i comes from the query at i - 1), so the model refuses shadow plans and
  the engine refuses a Dream-family model when the recipe meets it (``dllm_meta.families``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode import Candidates, ComputePlan, PluginMeta, PluginOptions, Selection, hookimpl
from dllm_decode.blocks import current_block
from dllm_decode.noise import draws
from dllm_decode.sampling import gumbel_perturb, token_probability, topk_mask
from dllm_decode.state import UNCOMMITTED

#: the reference's re-mask budget before a block's first step (its first step has nothing to verify)
FIRST_LAST_ACCEPT = 30
VERIFY = "wino_verify"     # Candidates.extra key: (B, q) float64 shadow probabilities, +inf if not verifiable


class Options(PluginOptions):
    tau_in: float = Field(0.7, ge=0.0, le=1.0, description="Wide in: masked block tokens whose "
                          "probability exceeds it are committed (0.6 GSM8K, 0.7 HumanEval/MATH, "
                          "0.8 MBPP in the paper).")
    tau_out: float = Field(0.9, ge=0.0, le=1.0, description="Narrow out: decoded block tokens whose "
                           "shadow probability is below it are re-masked.")
    cap_ratio: float = Field(0.7, gt=0.0, le=1.0, description="Wide-in cap: at most floor(cap_ratio "
                             "* masked block tokens), clamped to [cap_min, cap_max], per step.")
    cap_min: int = Field(5, ge=1, description="Lower clamp of the wide-in cap.")
    cap_max: int = Field(20, ge=1, description="Upper clamp of the wide-in cap.")


dllm_meta = PluginMeta(summary="WINO: wide-in threshold drafts verified by a shadow block in the "
                       "same forward; re-masks tokens that fail (revocable)", options=Options,
                       revocable=True, requires=("compute_plans", "bidirectional"), families=("llada",),
                       pairs=(("select_tokens", "score"), ("score", "cache_policy")))


@hookimpl
def check_recipe(recipe, options, slots):
    problems = []
    if options.cap_max < options.cap_min:
        problems.append(f"cap_max ({options.cap_max}) must not be below cap_min ({options.cap_min})")
    return problems


@hookimpl
def on_request_start(state, scratch):
    B = state.batch_size
    scratch.update(shadow=None, block=torch.full((B,), -1, dtype=torch.long, device=state.device),
                   last=torch.full((B,), FIRST_LAST_ACCEPT, dtype=torch.long, device=state.device))


@hookimpl
def choose_span(state):
    return current_block(state)


@hookimpl
def cache_policy(state, scratch):
    # one shadow query per column of the block, from the span start (the block for WINO's span)
    cols = state.span[:, :1] + torch.arange(state.config.block, device=state.device)    # (B, S)
    scratch["shadow"] = cols.clamp(max=state.length - 1)
    return ComputePlan.shadowed(scratch["shadow"], name="wino-shadow")


@hookimpl
def score(state, logits, positions, shadow_logits, scratch):
    T = state.config.temperature
    u = draws(state, positions, "wino.sample", logits.shape[-1]) if T > 0 else None
    x0 = gumbel_perturb(logits, T, u).argmax(dim=-1)                       # (B, q)
    cand = Candidates(tokens=x0, confidence=token_probability(logits, x0))
    cols = scratch.get("shadow")
    if shadow_logits is not None and cols is not None:
        p = token_probability(shadow_logits, state.x.gather(1, cols))        # (B, S) of the current token
        verify = torch.full(state.x.shape, float("inf"), dtype=torch.float64, device=state.device)
        verify.scatter_(1, cols, p)
        decoded = state.in_span() & ~state.masked & (state.commit_step != UNCOMMITTED)
        verify = torch.where(decoded, verify, float("inf"))                 # (B, L)
        # per queried position, as every extra is; the engine spreads it back onto the canvas
        cand.extra[VERIFY] = verify if positions is None else verify.gather(1, positions)   # (B, q)
    return cand


@hookimpl
def select_tokens(state, candidates, options, scratch):
    conf = candidates.confidence                                            # (B, L), -inf if not eligible
    active = ~state.done
    n_masked = (state.masked & state.in_span()).sum(1)                      # (B,) masks in the block
    cap = torch.floor(n_masked.to(torch.float64) * options.cap_ratio).long()
    cap = cap.clamp(min=options.cap_min).clamp(max=options.cap_max)
    above = conf > options.tau_in
    n_above = above.sum(1)
    commit = torch.where((n_above > cap)[:, None], topk_mask(conf, cap), above)
    commit |= topk_mask(conf, (n_above == 0).long())                        # at least the best one
    accepted = commit.sum(1)                                                # (B,)

    start = state.span[:, 0]
    last = torch.where(start != scratch["block"], FIRST_LAST_ACCEPT, scratch["last"])   # new block: reset
    scratch["block"] = start
    scratch["last"] = torch.where(active, accepted, last)
    verify = candidates.extra.get(VERIFY)
    if verify is None:
        return commit
    # +inf never verifies; only decoded block positions are candidates for a re-mask (an
    # unqueried column would read 0 after spreading)
    decoded = state.in_span() & ~state.masked & (state.commit_step != UNCOMMITTED)
    below = (verify < options.tau_out) & decoded                            # (B, L)
    lowest = topk_mask(-verify, (last - 1).clamp(min=0))                    # the last - 1 lowest
    remask = torch.where((below.sum(1) >= last)[:, None], lowest, below)
    remask &= ((accepted > 1) & active)[:, None]
    return Selection(commit=commit, remask=remask)
