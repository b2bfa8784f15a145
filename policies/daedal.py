"""DAEDAL, training-free variable-length denoising (arXiv 2508.00819, ICLR 2026;
``Li-Jinsong/DAEDAL/models/LLaDA_DAEDAL.py``, ``generate``), as ``choose_span`` / ``score`` /
``select_tokens`` / ``resize_canvas`` plugins. The canvas starts at ``generation.gen_length`` masks
(the code's ``initial_gen_length``) and grows during the request through the engine's canvas rule
(``dllm_decode.canvas``).

*EOS confidence* of a row: scanning its generated region from the end towards the prompt, the
softmax probability of the EOS id at the first ``eos_check_tokens`` positions whose argmax is EOS,
summed and divided by ``eos_check_tokens`` (not by how many were found).

- Stage 1, initial length adjustment (before any token is committed): each forward, a row whose
  EOS confidence is below ``eos_confidence_threshold`` gains ``expansion_factor`` masks at its
  end; once it is not (or the row is at its maximum length), ``eos_check_tokens / 2`` EOS tokens
  are appended, written at once, and the row enters stage 2. These forwards commit nothing.
- Stage 2, iterative denoising and mask insertion, in blocks of ``generation.block_length`` from
  the prompt end: every masked position of the current block whose confidence exceeds
  ``high_conf_threshold`` is committed, or the most confident one when none does. Then, while the
  row's EOS confidence is below ``expand_eos_confidence_threshold`` and it is shorter than its
  maximum, the least confident mask of the block left uncommitted whose confidence is below
  ``low_conf_threshold`` becomes ``expansion_factor`` masks.

The candidate is the argmax (Gumbel-max at T > 0) and the confidence its softmax probability in
the model's dtype, as in the code; the EOS confidence uses the noise-free argmax. Defaults are the
code's and its evaluation scripts' (``Li-Jinsong/DAEDAL/scripts/eval_LLaDA_DAEDAL.sh``): initial length 64 (the
recipe's ``gen_length``), blocks of 32, maximum 2048, thresholds 0.9 / 0.1, EOS thresholds 0.5 /
0.9, expansion factor 8, 32 EOS-checked positions.

Differences from the code, and why:

- every row runs its own stages: the code's batched loop keeps every row in stage 1 until no row
  needs more length and starts stage 2 for all at once, and its attention mask covers the left
  padding of shorter prompts; the code's batch-1 loop is followed, which the engine's rows need to
  decode alike alone and in a batch;
- near the maximum length the code adds its ``expansion_factor`` masks and then truncates the
  row's tail to the maximum, dropping its last positions whatever they hold (the EOS padding, or
  committed tokens); here the insertion is shortened to fit instead, so nothing committed is lost;
- the maximum is also capped by the model's ``max_length`` (prompt + generated positions), which
  the code does not check;
- the mask token is never a candidate (the engine's rule), so the code's branches for a predicted
  mask token (skip it in the fallback, re-rank without it) never apply; exact ties are broken by
  the lowest column; the code's stagnation guard (stop when a step changed nothing) cannot fire,
  since every stage-2 step commits a token; at T > 0 the Gumbel noise is the row's own (float64).

The EOS confidence reads every generated position's logits, so no cache plan may narrow the
forward (refused at load time); the EOS switches ``ban`` and ``deprioritize`` would change the
signal it reads and are refused too.
"""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode import Candidates, PluginMeta, PluginOptions, Resize, hookimpl
from dllm_decode.blocks import current_block
from dllm_decode.noise import draws
from dllm_decode.sampling import gumbel_perturb, topk_mask

EOS_CONFIDENCE = "daedal_eos_confidence"   # Candidates.info: (B,) float64


class Options(PluginOptions):
    max_gen_length: int = Field(2048, ge=1, le=1 << 20, description="Largest generated length a row may "
                                "grow to (also capped by the model's max_length).")
    high_conf_threshold: float = Field(0.9, ge=0.0, le=1.0, description="Confidence above which a masked "
                                       "position of the block is committed.")
    low_conf_threshold: float = Field(0.1, ge=0.0, le=1.0, description="Confidence below which an "
                                      "uncommitted mask may become an expansion point.")
    expansion_factor: int = Field(8, ge=1, le=1 << 16, description="Masks added per stage-1 expansion, and "
                                  "masks an expansion point becomes in stage 2.")
    eos_confidence_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Stage 1: grow the row while "
                                            "its EOS confidence is below this.")
    expand_eos_confidence_threshold: float = Field(0.9, ge=0.0, le=1.0, description="Stage 2: insert masks "
                                                   "only while the EOS confidence is below this.")
    eos_check_tokens: int = Field(32, ge=1, le=1 << 16, description="EOS-predicted positions (from the row's "
                                  "end) averaged into the EOS confidence; half as many EOS end stage 1.")
    eos_id: int | None = Field(None, ge=0, description="The EOS id (null: the first stop id, the model's EOS "
                               "unless generation.eos.ids says otherwise).")


dllm_meta = PluginMeta(summary="DAEDAL: variable-length denoising; the canvas grows while EOS confidence "
                       "is low, then masks are inserted at low-confidence positions", options=Options,
                       idle_steps=True, resizable=True,
                       pairs=(("select_tokens", "score"), ("select_tokens", "resize_canvas"),
                              ("resize_canvas", "score"), ("resize_canvas", "select_tokens")))


@hookimpl
def check_recipe(recipe, options, slots):
    gen, problems = recipe.generation, []
    if "resize_canvas" in slots and gen.gen_length > options.max_gen_length:
        problems.append(f"generation.gen_length ({gen.gen_length}, the initial length) exceeds max_gen_length "
                        f"({options.max_gen_length})")
    if "score" in slots and recipe.cache_policy is not None and recipe.cache_policy.plugin != "none":
        problems.append(f"cache_policy {recipe.cache_policy.plugin!r}: the EOS confidence reads the logits of "
                        "every generated position, so every forward must be a full one (cache_policy: none)")
    problems += [f"generation.eos.{key} changes the EOS signal daedal reads; leave it off"
                 for key in ("ban", "deprioritize") if getattr(gen.eos, key) and "score" in slots]
    return problems


@hookimpl
def on_request_start(state, scratch):
    scratch["stage2"] = torch.zeros(state.batch_size, dtype=torch.bool, device=state.device)


@hookimpl
def choose_span(state):
    return current_block(state)


def _eos_id(state, options) -> int:
    if options.eos_id is not None:
        return options.eos_id
    if state.eos_ids.numel() == 0:
        raise ValueError("the model declares no EOS id; set the eos_id option")
    return int(state.eos_ids[0])


def eos_confidence(state, logits: torch.Tensor, probs: torch.Tensor, eos: int, n: int) -> torch.Tensor:
    """(B,) float64: the EOS probability at the last ``n`` positions of each row's generated
    region whose argmax is EOS, summed over ``n``. ``logits``, ``probs``: (B, L, V)."""
    cols = state.columns
    in_row = (cols >= state.gen_start) & (cols < state.ends[:, None])      # (B, L)
    is_eos = (logits.argmax(dim=-1) == eos) & in_row
    from_end = is_eos.flip(1).long().cumsum(dim=1).flip(1)                 # EOS argmaxes at or after a column
    take = is_eos & (from_end <= n)
    return (probs[..., eos].to(torch.float64) * take).sum(dim=1) / n


@hookimpl
def score(state, logits, positions, options):
    if positions is not None:
        raise ValueError("daedal needs the logits of every position (a full forward, no cache plan)")
    T = state.config.temperature
    u = draws(state, None, "daedal.sample", logits.shape[-1]) if T > 0 else None
    x0 = gumbel_perturb(logits, T, u).argmax(dim=-1)                        # (B, L)
    probs = torch.softmax(logits, dim=-1)                                   # model dtype, as the code
    conf = probs.gather(-1, x0[..., None]).squeeze(-1)
    eos = eos_confidence(state, logits, probs, _eos_id(state, options), options.eos_check_tokens)
    return Candidates(tokens=x0, confidence=conf, info={EOS_CONFIDENCE: eos})


@hookimpl
def select_tokens(candidates, options, scratch):
    conf = candidates.confidence                                            # (B, L), -inf if not eligible
    high = conf > options.high_conf_threshold
    best = topk_mask(conf, torch.ones(conf.shape[0], dtype=torch.long, device=conf.device))
    # stage-1 rows only measure their length: nothing is committed
    return torch.where(high.any(dim=1, keepdim=True), high, best) & scratch["stage2"][:, None]


def _room(state, options) -> torch.Tensor:
    """(B,) positions each row may still grow by: to max_gen_length, and within the model's limit."""
    cap = torch.full_like(state.ends, options.max_gen_length)
    if state.max_length is not None:
        cap = torch.minimum(cap, state.max_length - state.prompt_lengths)
    return (cap - (state.ends - state.gen_start)).clamp(min=0)


@hookimpl
def resize_canvas(state, candidates, options, scratch):
    active, stage2 = state.last.active, scratch["stage2"]                   # (B,) each
    eos = candidates.info[EOS_CONFIDENCE]
    room = _room(state, options)
    # stage 1: grow at the end while the EOS confidence is low; then EOS padding, and stage 2
    grow = active & ~stage2 & (eos < options.eos_confidence_threshold) & (room > 0)
    settle = active & ~stage2 & ~grow
    append = torch.where(grow, room.clamp(max=options.expansion_factor),
                         torch.where(settle, room.clamp(max=options.eos_check_tokens // 2), 0))
    fill = torch.where(grow, state.mask_id, _eos_id(state, options))
    # stage 2: the least confident mask left in the block becomes expansion_factor masks
    expand = active & stage2 & (eos < options.expand_eos_confidence_threshold) & (room > 0)
    conf = candidates.confidence
    low = state.masked & candidates.eligible & (conf < options.low_conf_threshold)
    point = topk_mask(torch.where(low, -conf.to(torch.float64), float("-inf")), expand.long())
    insert = point.long() * room.clamp(max=options.expansion_factor - 1)[:, None]
    scratch["stage2"] = stage2 | settle
    return Resize(insert=insert, append=append, fill=fill)
