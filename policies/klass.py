"""KLASS, KL-Adaptive Stability Sampling (arXiv 2511.05664; shkim0116/KLASS
``src/model/llada_klass.py`` ``stable_confident_decode`` and ``src/model/dream_klass.py``
``_sample``, ``alg="klass"``) as ``score`` / ``select_tokens`` plugins.

Every forward, at every queried position, the distribution ``p_t`` (float64 softmax) is compared
with the one the previous forward gave that position: ``KL_t = sum p_t (log(p_t + 1e-12) -
log(p_{t-1} + 1e-12))``, starting from ``p_{-1} = 0`` (so the first KL is about 27 nats, never
stable). The last ``history_length`` KLs are kept per position. A masked position in the span is
*ready* when all of them are below ``kl_threshold`` and its top probability clears
``conf_threshold``; every ready position is committed (or one of them, ``unmask_strategy``).
When no position is ready:

- ``variant: llada`` commits the ``k`` most probable masked positions, ``k`` from LLaDA's
  schedule for this step of the block (``steps / blocks`` steps per block, the block's masks split
  evenly, remainder first); readiness needs ``step >= history_length - 1`` within the block, and
  the confidence test is strict (``>``). At T > 0 the code takes the softmax of the Gumbel-
  perturbed logits (``exp(l) / (-log u)^T``) for tokens, confidences and KLs alike; so does this.
- ``variant: dream`` commits the single most confident masked position, ranked by Dream's
  ``sample_tokens`` (temperature, ``top_p``, ``top_k``; the drawn token's probability at T > 0),
  while the token written is always the greedy one, as in the code; no step gating, and the
  confidence test is ``>=``.

The distributions and KL histories live in ``scratch`` over the generated region, per row (the
code keeps ``(1, L, V)`` float64 for the whole canvas); a position the forward does not query
keeps its history unchanged. Differences from the code, all outside its evaluated setting
(``steps == gen_length``) or the engine's rules: the mask token's probability is 0 (its logit is
``-inf``); once a block's schedule is used up with masks left (possible only with fewer steps than
positions), the fallback commits one token per step until the block is done, where the code
would leave the masks, and it never takes more positions than are masked (the code's ``topk``
would then overwrite decoded ones); rows are independent; random draws (T > 0,
``unmask_strategy: random``) come from each row's own keyed noise.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dllm_decode import Candidates, PluginMeta, PluginOptions, hookimpl
from dllm_decode.blocks import block_schedule_problems
from dllm_decode.noise import draws, gumbel_draws
from dllm_decode.sampling import count_at_step, gumbel_perturb, top_k_filter, top_p_filter, topk_mask

EPS = 1e-12                   # the code's epsilon inside both logarithms of the KL
KL = "klass_kl"               # Candidates.extra: (B, q) float64 KL of this forward
KL_MAX = "klass_kl_max"       # (B, q) float64 largest KL of the last history_length forwards
FALLBACK = "klass_fallback"   # (B, q) float64 Dream variant: the fallback's ranking


class Options(PluginOptions):
    variant: Literal["llada", "dream"] = Field(
        "llada", description="Which released sampler: llada (schedule fallback, step gating, strict "
        "confidence test) or dream (single best fallback, no gating, >=).")
    conf_threshold: float = Field(0.9, ge=0.0, le=1.0, description="Top probability a position needs "
                                  "to be ready (scripts: 0.6-0.9 per task).")
    kl_threshold: float = Field(0.01, ge=0.0, description="Every KL of the history must be below it "
                                "(scripts: 0.01-0.015 LLaDA, 0.001-0.005 Dream).")
    history_length: int = Field(2, ge=1, le=64, description="Forwards whose KL must all be below "
                                "kl_threshold.")
    unmask_strategy: Literal["all", "max_conf", "min_kl", "random"] = Field(
        "all", description="Among several ready positions: all, the most confident, the lowest current "
        "KL, or one at random.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Dream variant: nucleus filter of the "
                                "fallback's ranking (Dream's sample_tokens).")
    top_k: int | None = Field(None, ge=1, description="Dream variant: top-k filter of the fallback's "
                              "ranking.")


dllm_meta = PluginMeta(summary="KLASS: commit positions whose top probability is high and whose "
                       "distribution is stable (small KL over the last forwards)", options=Options,
                       pairs=(("select_tokens", "score"),))


@hookimpl
def check_recipe(recipe, options, slots):
    if "select_tokens" in slots and options.variant == "llada":
        return block_schedule_problems(recipe.generation)     # the fallback's schedule
    return []


def _distribution(state, logits: torch.Tensor, positions, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 distribution whose KL is tracked (B, q, V), and the candidates (B, q)."""
    T = state.config.temperature
    if variant == "llada":
        u = draws(state, positions, "klass.sample", logits.shape[-1]) if T > 0 else None
        p = torch.softmax(gumbel_perturb(logits, T, u).to(torch.float64), dim=-1)
        return p, p.argmax(dim=-1)
    # Dream: the candidate is the argmax of the model-dtype softmax, at any temperature
    return torch.softmax(logits.to(torch.float64), dim=-1), torch.softmax(logits, dim=-1).argmax(dim=-1)


def _track(state, scratch: dict, p: torch.Tensor, positions, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL of ``p`` (B, q, V) against each queried position's previous distribution, pushed into
    its history. Returns the KL and the history's maximum, (B, q) each, +inf on prompt columns."""
    B, q, V = p.shape
    G = state.gen_length
    if "logp" not in scratch:
        # the code starts from p_prev = 0 (log(0 + eps)) and a zero history; row G is a sink for
        # the prompt columns of a full forward
        scratch["logp"] = torch.full((B, G + 1, V), EPS, dtype=torch.float64, device=p.device).log_()
        scratch["hist"] = torch.zeros((B, G + 1, H), dtype=torch.float64, device=p.device)
    cols = (state.columns[None, :] if positions is None else positions) - state.gen_start   # (1|B, q)
    gen = (cols >= 0).expand(B, q)
    row = torch.where(gen, cols, G).expand(B, q)                                              # (B, q)
    lp = torch.log(p + EPS)                                                                  # (B, q, V)
    at_v = row[..., None].expand(B, q, V)
    kl = (p * (lp - scratch["logp"].gather(1, at_v))).sum(dim=-1)                            # (B, q)
    scratch["logp"].scatter_(1, at_v, lp)
    at_h = row[..., None].expand(B, q, H)
    hist = torch.cat([scratch["hist"].gather(1, at_h)[..., 1:], kl[..., None]], dim=-1)    # oldest dropped
    scratch["hist"].scatter_(1, at_h, hist)
    inf = torch.full_like(kl, float("inf"))
    return torch.where(gen, kl, inf), torch.where(gen, hist.amax(dim=-1), inf)


def _fallback_rank(state, logits: torch.Tensor, positions, options) -> torch.Tensor:
    """Dream's ``sample_tokens`` on the logits: the probability of the drawn token (the best one
    at T = 0) after temperature, top-p and top-k; only its ranking is used. (B, q) float64."""
    T = state.config.temperature
    lg = logits.to(torch.float64) / T if T > 0 else logits
    if options.top_p is not None and options.top_p < 1:
        lg = top_p_filter(lg, options.top_p)
    if options.top_k is not None:
        lg = top_k_filter(lg, options.top_k)
    probs = torch.softmax(lg, dim=-1)
    if T == 0:
        return probs.amax(dim=-1).to(torch.float64)
    drawn = (lg + gumbel_draws(state, positions, "klass.fallback", lg.shape[-1])).argmax(dim=-1)
    return probs.gather(-1, drawn[..., None]).squeeze(-1)


@hookimpl
def score(state, logits, positions, options, scratch):
    p, x0 = _distribution(state, logits, positions, options.variant)        # (B, q, V), (B, q)
    kl, kl_max = _track(state, scratch, p, positions, options.history_length)
    conf = p.gather(-1, x0[..., None]).squeeze(-1)                          # (B, q) float64
    extra = {KL: kl, KL_MAX: kl_max}
    if options.variant == "dream":
        extra[FALLBACK] = _fallback_rank(state, logits, positions, options)
    return Candidates(tokens=x0, confidence=conf, extra=extra)


def _block_step(state, scratch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) forwards so far in each row's span (0 at its first; a new span start restarts it) and
    the masks the span held at its first forward."""
    start = state.span[:, 0]                                                # (B,)
    n = (state.masked & state.in_span()).sum(dim=1)
    if "start" not in scratch:
        scratch.update(start=torch.full_like(start, -1), n0=n, k=torch.zeros_like(start))
    new = start != scratch["start"]
    n0, k = torch.where(new, n, scratch["n0"]), torch.where(new, 0, scratch["k"])
    scratch.update(start=start, n0=n0, k=k + 1)
    return k, n0


def _pick_one(state, ready: torch.Tensor, candidates, strategy: str) -> torch.Tensor:
    """One ready position per row (lowest column on ties, as the code's argmax / argmin)."""
    if strategy == "max_conf":
        key = candidates.confidence
    elif strategy == "min_kl":
        key = -candidates.extra[KL]
    else:
        key = draws(state, None, "klass.unmask")                            # (B, L) uniforms
    key = torch.where(ready, key.to(torch.float64), float("-inf"))
    return topk_mask(key, ready.any(dim=1).long())


@hookimpl
def select_tokens(state, candidates, options, scratch):
    conf, eligible = candidates.confidence, candidates.eligible             # (B, L)
    k_step, n0 = _block_step(state, scratch)                                # (B,) each
    stable = candidates.extra[KL_MAX] < options.kl_threshold
    if options.variant == "llada":
        stable = stable & (k_step >= options.history_length - 1)[:, None]
        sure = conf > options.conf_threshold
    else:
        sure = conf >= options.conf_threshold
    ready = stable & sure & eligible                                        # (B, L)
    if options.unmask_strategy != "all":
        ready = _pick_one(state, ready, candidates, options.unmask_strategy)
    if options.variant == "llada":
        gen = state.config
        spb = gen.total_steps // gen.blocks
        k = torch.where(k_step < spb, count_at_step(n0, spb, k_step), 1).clamp(min=1)
        fallback = topk_mask(conf, k)
    else:
        rank = torch.where(eligible, candidates.extra[FALLBACK], float("-inf"))
        # eos.deprioritize lowered the confidence of EOS candidates: rank them last here too
        rank = torch.where(conf == torch.finfo(conf.dtype).min, rank - 2.0, rank)
        fallback = topk_mask(rank, torch.ones_like(k_step))
    return torch.where(ready.any(dim=1, keepdim=True), ready, fallback)
