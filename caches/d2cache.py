"""d2Cache, dual adaptive caching (arXiv 2509.23094; Kamichanw/d2Cache ``src/cache/d2cache.py``,
run by ``src/generation/vanilla.py``), as a plugin that fills ``cache_policy``, ``score`` and
``select_tokens``.

``cache_policy``: the request's first forward is full and stores every position's K/V. Every later
forward recomputes only a subset of positions as queries (``ComputePlan.subset``), writes their
fresh K/V to the store and attends to the stored K/V of all others; nothing is refreshed in full
again. The subset, chosen after each step from what that step left:

1. up to ``current_k`` masked positions with the highest ``confidence * certainty density``,
   searched from the block start to the end of the block that holds the ``current_k``-th
   remaining mask, the block's own masks first (so that at least one of them is chosen). The density is a Gaussian (``sigma``) average of the decoded mask over
   the generated region (left of it counts as decoded, right of it as the last position);
2. the positions whose outputs predict those (LLaDA: themselves; Dream, whose output at ``p``
   predicts ``p + 1``: the positions before them, the last prompt token for the first one);
3. every position decoded by the step (as a decoded token now);
4. positions chosen by a nucleus (``rollout_p``, at least one) over the attention rollout of the
   step's forward: every layer's head-mean attention rows of the queried positions, plus the
   residual identity, renormalised and multiplied up the layers (``ComputePlan.attention``);
   a position's importance is the total attention it receives;
5. with ``inflate_w > 0``, every gap of at most ``inflate_w`` positions between chosen ones.

Only masked positions whose predicting output was recomputed can be committed: they are the
logits the forward returns.

``score``: d2Cache's ``sample_tokens`` (confidence = top-1 probability ``maskgit_plus``, top-1
minus top-2, or negative entropy, after ``top_p`` / ``top_k``); the cache reads the confidence
of the request's first forward from it (``pairs``: a recipe with ``cache_policy: d2cache`` needs
``score: d2cache``). ``select_tokens``: the vanilla rule, ``num_transfer_tokens`` per step by
confidence, times the certainty density (``decode_sigma``, "certainty prior" decoding, which
d2Cache's evaluation turns on with the cache; null or 0 turns it off), inside the span.

Approximate: reused K/V were computed against an older canvas.

Code-faithful: the confidence the selection multiplies is always the first forward's (the
code's per-step update writes into a temporary copy and compares ``a & b == c`` with ``&``
binding first, so it never changes anything); the Dream rule for the last prompt token assigns
(it can drop a position the nucleus chose); no full refresh after the first forward.
Deviations:

- Eligibility: the code also means to restrict commits to masked positions whose predicting
  output was recomputed, but that restriction too writes into a temporary copy, so in the code
  every masked position of the block stays eligible and the others take all-zero logits
  (uniform, confidence 1/V, token id 0): with a real vocabulary they never outrank a recomputed
  one. Here they are not candidates.
- The block of the search window and the bias is the step's current span. The code still uses
  the finished block at the first step of a new one: the same choice whenever
  ``block_length >= current_k`` (the code's settings: one block, or blocks of 32 with
  ``current_k`` 32); with smaller blocks the code can choose nothing in the new block and then
  commits from all-zero logits.
- The block's masks are ranked first; the code adds the score maximum to their scores, which
  does that for non-negative confidences (``maskgit_plus``, ``topk_margin``) but not for the
  negative entropy, where it could leave the block without a recomputed mask.
- Positions outside the search window are never chosen (the code's ``topk`` can return them as
  ``-inf`` filler only when fewer than ``current_k`` candidates remain in the window, which its
  block-wise settings never give); exact score ties go to the lower position.
- Batches (the code's own loop supports them): each row is ranked on its own (the code's bias
  is the batch's score maximum), its rollout and nucleus leave out left padding, and rows
  topped up to a common width get query-only positions that write nothing and stay out of the
  rollout (the code recomputes and writes extra masked or high-rollout tokens), so a row decodes
  what it decodes alone; a finished row recomputes nothing.
- The certainty density is computed as a direct Gaussian sum in float64 (the code uses an FFT
  in float32), and the rollout in at least float32 (the code: the model dtype).
- Classifier-free guidance is refused (the code has none).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dllm_decode import Candidates, PluginMeta, PluginOptions, hookimpl
from dllm_decode.models.plan import ComputePlan
from dllm_decode.noise import gumbel_draws
from dllm_decode.sampling import dream_sample_tokens, topk_mask


class Options(PluginOptions):
    rollout_p: float = Field(0.1, ge=0.0, le=1.0, description="Nucleus over the attention-rollout importance: "
                             "positions are added until their share passes rollout_p (at least one).")
    current_k: int = Field(32, ge=1, le=1 << 20, description="Masked positions recomputed per step, the "
                           "most certain by confidence x certainty density.")
    sigma: float = Field(10.0, gt=0.0, description="Width of the Gaussian of the cache's certainty density.")
    inflate_w: int = Field(0, ge=0, le=1 << 20, description="Also recompute every gap of at most inflate_w "
                           "positions between recomputed ones (0: off, as d2Cache's configuration; its class "
                           "default and its semi-autoregressive example use 4).")
    alg: Literal["maskgit_plus", "topk_margin", "entropy"] = Field(
        "maskgit_plus", description="Confidence: top-1 probability, top-1 minus top-2, or negative entropy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus filter before the confidence "
                                "(d2Cache's Dream settings use 0.9).")
    top_k: int | None = Field(None, ge=1, description="Top-k filter before the confidence.")
    num_transfer_tokens: int = Field(1, ge=1, le=1 << 20, description="Tokens committed per step.")
    decode_sigma: float | None = Field(10.0, ge=0.0, description="Certainty-prior decoding: commit by "
                                       "confidence x certainty density of this width (d2Cache's evaluation "
                                       "sets it with the cache); null or 0: by confidence.")


dllm_meta = PluginMeta(summary="d2Cache: a per-step query subset (certain masked tokens, the last step's "
                       "tokens, an attention-rollout nucleus) against cached K/V; its sampler and "
                       "certainty-prior selection", options=Options, exact=False,
                       requires=("compute_plans", "bidirectional"),   # the rollout reads attention weights
                       drops_rows=True,                 # read through CacheStore.batch_rows
                       pairs=(("cache_policy", "score"),))


@hookimpl
def check_recipe(recipe, slots):
    if "cache_policy" in slots and recipe.generation.cfg_scale > 0:
        return ["generation.cfg_scale: d2cache's rollout reads one forward's attention and has no "
                "classifier-free guidance (as d2Cache); set it to 0"]
    return []


@hookimpl
def on_request_start(scratch):
    scratch.update(conf0=None, fed=None, pad=None)


# ----------------------------------------------------------------------------- score and selection

@hookimpl
def score(state, logits, positions, options, scratch):
    T = state.config.temperature
    gumbel = gumbel_draws(state, positions, "d2cache.sample", logits.shape[-1]) if T > 0 else None
    x0, conf = dream_sample_tokens(logits, T, options.top_p, options.top_k, options.alg, gumbel)
    if scratch.get("conf0") is None:
        # the first forward's confidence over the canvas (it is a full forward): the cache ranks
        # masked positions by it for the rest of the request, as d2Cache's code does
        B, L = state.x.shape
        cols = state.columns.expand(B, L) if positions is None else positions
        scratch["conf0"] = torch.full((B, L), float("-inf"), dtype=conf.dtype, device=conf.device).scatter_(1, cols, conf)
    return Candidates(tokens=x0, confidence=conf)


def density_kernel(G: int, sigma: float, device) -> torch.Tensor:
    """(3G, G) float64: the Gaussian weights of the extended region's 3G positions for each of
    the G generated ones, divided by the kernel's sum over distances [-3G, 3G)."""
    dist = torch.arange(3 * G, device=device)[:, None] - (torch.arange(G, device=device) + G)[None, :]
    kernel = torch.exp(-dist.to(torch.float64) ** 2 / (2 * sigma ** 2))           # (3G, G)
    d = torch.arange(-3 * G, 3 * G, device=device, dtype=torch.float64)
    return kernel / torch.exp(-d ** 2 / (2 * sigma ** 2)).sum().clamp_min(1e-8)


def certainty_density(state, decoded: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, G) bool decoded mask of the generated region -> (B, G) float64 density: the Gaussian
    (sigma) weighted share of decoded neighbours, the region extended by G decoded positions on
    the left and G copies of its last position on the right (d2Cache's ``certainty_density``,
    computed directly; the kernel once per request)."""
    B, G = decoded.shape
    kernel = state.constant(f"d2cache.density.{sigma!r}", lambda: density_kernel(G, sigma, decoded.device))
    ext = torch.cat([torch.ones(B, G, dtype=torch.float64, device=decoded.device), decoded.to(torch.float64),
                     decoded[:, -1:].to(torch.float64).expand(B, G)], dim=1)      # (B, 3G)
    return ext @ kernel


@hookimpl
def select_tokens(state, candidates, options):
    conf = candidates.confidence                                            # (B, L), -inf if not eligible
    if options.decode_sigma:
        P = state.gen_start
        density = certainty_density(state, ~state.masked[:, P:], options.decode_sigma)     # (B, G)
        prior = torch.cat([torch.ones_like(density[:, :1]).expand(-1, P), density], dim=1)
        conf = torch.where(candidates.eligible, conf * prior, float("-inf"))
    k = torch.full((conf.shape[0],), options.num_transfer_tokens, dtype=torch.long, device=conf.device)
    return topk_mask(conf, k)


# ----------------------------------------------------------------------------- the cache

def rollout_importance(attention, fed: torch.Tensor, real: torch.Tensor, L: int) -> torch.Tensor:
    """Attention rollout of one forward -> (B, L) importance (column sums). ``attention``: per
    layer (B, f, L) head-mean attention of the fed positions ``fed`` (B, f); ``real`` (B, f):
    the rows that count as queries (others, like every position not fed, are identity rows).
    A query row q becomes normalise(a_q + e_q) @ rollout; the rollout starts as the identity."""
    B, f = fed.shape
    dtype = torch.promote_types(attention[0].dtype, torch.float32)
    eye = torch.eye(L, dtype=dtype, device=fed.device)
    rollout = eye.expand(B, L, L).clone()
    own = eye[fed]                                                          # (B, f, L) e_q rows
    index = fed[:, :, None].expand(B, f, L)
    for a in attention:
        rows = a.to(dtype) + own
        rows = rows / rows.sum(dim=-1, keepdim=True)
        new = rows @ rollout                                                # (B, f, L)
        rollout = rollout.scatter(1, index, torch.where(real[:, :, None], new, rollout.gather(1, index)))
    return rollout.sum(dim=1)


def nucleus(scores: torch.Tensor, top_p: float, allowed: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the allowed positions of largest share whose cumulative share stays within
    top_p, and always the largest (d2Cache's ``nucleus_select``, min_k 1)."""
    scores = torch.where(allowed, scores, 0.0)
    probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-9)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = sorted_probs.cumsum(dim=-1) <= top_p
    keep[:, 0] = True
    keep &= allowed.gather(1, order)
    return torch.zeros_like(allowed).scatter(1, order, keep)


def inflate(q: torch.Tensor, w: int) -> torch.Tensor:
    """Also select every position whose gap between the selected ones around it is <= w."""
    B, L = q.shape
    cols = torch.arange(L, device=q.device).expand(B, L)
    nxt = torch.where(q, cols, L).flip(1).cummin(dim=1).values.flip(1)     # next selected at or after
    prv = torch.where(q, cols, -1).cummax(dim=1).values                    # previous at or before
    return q | (((nxt - cols) + (cols - prv) <= w) & (prv >= 0) & (nxt < L))


def certain_masks(state, conf0: torch.Tensor, options) -> torch.Tensor:
    """(B, G) bool: up to current_k remaining masks by confidence x certainty density, searched
    from the span start to the end of the block holding the current_k-th remaining mask."""
    P = state.gen_start
    remaining = state.masked[:, P:]                                         # (B, G)
    B, G = remaining.shape
    cols = torch.arange(G, device=remaining.device)[None, :]
    start, end = state.span[:, :1] - P, state.span[:, 1:] - P               # (B, 1) the block
    size = (end - start).clamp(min=1)
    meets = remaining.long().cumsum(dim=1) >= options.current_k
    k_th = torch.where(meets.any(dim=1, keepdim=True), meets.long().argmax(dim=1, keepdim=True), G - 1)
    search_end = (k_th // size + 1) * size - 1
    scores = conf0[:, P:] * certainty_density(state, ~remaining, options.sigma)
    window = (cols >= start) & (cols <= search_end) & remaining
    ranked = torch.where(window, scores, float("-inf"))
    # the block's masks first, then the others, each by score (the code adds the score maximum
    # to the block's scores, which orders them so for non-negative confidences); ties to the
    # lower position
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    in_block = (window & (cols >= start) & (cols < end)).gather(1, order)
    order = order.gather(1, torch.sort((~in_block).to(torch.int8), dim=1, stable=True).indices)
    first = torch.arange(G, device=remaining.device)[None, :] < min(options.current_k, G)
    picked = torch.zeros_like(remaining).scatter(1, order, first.expand(B, G))
    return picked & window


@hookimpl
def cache_policy(state, options, scratch):
    B, L = state.x.shape
    if scratch["conf0"] is None:                                            # the first forward: full
        scratch.update(fed=None, pad=None)
        return ComputePlan.refresh(name="d2cache:full").with_(attention=True)
    P, shift = state.gen_start, getattr(state.store, "shift", 0)
    chosen = certain_masks(state, scratch["conf0"], options)                # (B, G)
    # the positions whose outputs predict the chosen masks (Dream: the one before; for the first
    # generated position the last prompt token, assigned below as the code does)
    wanted = chosen if shift == 0 else torch.cat([chosen[:, 1:], torch.zeros_like(chosen[:, :1])], dim=1)
    wanted = wanted | state.last.committed[:, P:]                           # the step's new tokens
    q = torch.cat([torch.zeros(B, P, dtype=torch.bool, device=chosen.device), wanted], dim=1)   # (B, L)
    fed = scratch["fed"]
    if fed is None:                                                         # the first forward fed all
        fed = state.columns.expand(B, L)
    real = state.attention_mask.gather(1, fed)
    if scratch["pad"] is not None:
        real = real & ~scratch["pad"]
    attention = [state.store.batch_rows(a, B) for a in state.store.attention]   # per layer (B, f, L)
    importance = rollout_importance(attention, fed, real, L)                # (B, L)
    q = q | nucleus(importance, options.rollout_p, ~q & state.attention_mask)
    if shift:
        q[:, P - 1] = chosen[:, 0]
    if options.inflate_w > 0:
        q = inflate(q, options.inflate_w)
    # a finished row (the engine's record: no mask left, or stopped at EOS) has nothing to
    # predict; its nucleus and last tokens would widen every later step of the rows left
    q &= ~state.done[:, None]
    plan = ComputePlan.subset(q, shift=shift, attention=True, name="d2cache")
    scratch.update(fed=plan.index, pad=plan.index_pad)
    return plan
