"""SlowFast sampling (arXiv 2506.10848; LiangrunFlora/Slow-Fast-Sampling) as a
span / phase / selection plugin.

Decoding runs in cycles inside each block. A cycle starts at ``s`` (block start + the previous
cycle's length) with an **exploratory** stage of ``explore_steps`` forwards over ``[s, block
end)``: each forward commits the masked tokens at or above ``explore_threshold`` when at least
``min_parallel`` qualify, else the single best one, and (until the length is settled) records a
candidate cycle length: the last masked position whose confidence reaches ``tau_min``, counted
from the block start. Once ``window`` candidates are recorded and their spread is below
``stability``, the length is settled (code: the latest candidate; else the floored mean of the
window). The **accelerated** stage then decodes the span ``[s, block start + length)`` until it
has no mask: every token at or above ``tau_high`` when ``min_parallel`` qualify, else the best.

``variant: code`` (default) is ``generate_slow_fast_sampling`` as released: K = 6,
tau_min = 0.3, tau_high = 0.9, comparisons with >=, a population std below ``stability``,
exploration always runs all K forwards. ``variant: paper`` is §3.3 of the paper: K = 8,
tau_min = 0.1, tau_high = 0.85, strict comparisons, a population variance below ``stability``,
exploration stops at the first stable window and the span ends at the window's floored mean,
exploration commits one token per forward. With W = 2 both stability tests accept exactly the
pairs of lengths that differ by at most 1. The Dream port uses tau_min 0.1 and
explore_threshold 0.8; set them to reproduce it.

Deviations: the reference's fast stage after its first forward runs the model on the canvas
cut at the span end and reuses the first forward's logits for the rest ("out-of-span cache");
here every forward sees the whole canvas, and that cache is a cache plugin's job. When a block
runs out of masks during exploration the reference spends the remaining exploration forwards
committing nothing; here the next block starts at once (same tokens, fewer forwards).

The state machine advances in ``after_step`` from the step record, not in ``select_tokens``, so a
recipe may swap ``select_tokens`` (e.g. for ``threshold``) and keep SlowFast's spans and phases.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from dllm_decode import Phase, PluginMeta, PluginOptions, hookimpl
from dllm_decode.blocks import current_block
from dllm_decode.sampling import topk_mask

EXPLORE, ACCELERATE = 0, 1
PHASES = ("explore", "accelerate")        # indexed by the stage codes above
VARIANT_DEFAULTS = {"code": dict(explore_steps=6, tau_min=0.3, tau_high=0.9, min_parallel=2),
                    "paper": dict(explore_steps=8, tau_min=0.1, tau_high=0.85, min_parallel=1)}


class Options(PluginOptions):
    variant: Literal["code", "paper"] = Field("code", description="code: the released LLaDA sampler's "
                                              "rules and defaults; paper: §3.3 of the paper (see module doc).")
    explore_steps: int = Field(6, ge=1, le=1024, description="K: forwards of the exploratory stage "
                               "(the paper's K_max). Default by variant: 6 (code), 8 (paper).")
    tau_min: float = Field(0.3, ge=0.0, le=1.0, description="Confidence that marks a position as "
                           "converging (candidate cycle end). Default 0.3 (code), 0.1 (paper).")
    tau_high: float = Field(0.9, ge=0.0, le=1.0, description="Confidence at which the accelerated "
                            "stage commits in parallel. Default 0.9 (code), 0.85 (paper).")
    explore_threshold: float | None = Field(None, ge=0.0, le=1.0, description="Parallel-commit "
                                            "threshold of the exploratory stage (default tau_high; "
                                            "0.8 in the Dream port).")
    min_parallel: int = Field(2, ge=1, description="Fewest tokens over the threshold for a parallel "
                              "commit; fewer means commit the single best. 2 (code), 1 (paper).")
    window: int = Field(2, ge=1, le=64, description="W: candidate lengths compared for stability.")
    stability: float = Field(1.0, gt=0.0, description="Spread below which the cycle length is "
                             "settled: population std (code) or variance (paper) of the window.")

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            defaults = VARIANT_DEFAULTS.get(data.get("variant", "code"), {})
            data = {**defaults, **data}
        return data


dllm_meta = PluginMeta(summary="SlowFast sampling: exploratory / accelerated cycles with "
                       "convergence-based spans (code and paper variants)", options=Options)


def _start_cycle(scratch: dict, rows: torch.Tensor, last_len: torch.Tensor | int) -> None:
    """Begin a new exploratory stage for ``rows`` (B,) bool, from ``last_len`` columns after the
    block start (0 in a new block, else the decoded span's end)."""
    scratch["last_len"] = torch.where(rows, last_len, scratch["last_len"])
    for key, value in (("stage", EXPLORE), ("k", 0), ("hist_n", 0)):
        scratch[key] = torch.where(rows, value, scratch[key])
    scratch["determined"] = scratch["determined"] & ~rows


@hookimpl
def on_request_start(state, scratch):
    B, dev = state.batch_size, state.device
    zeros = torch.zeros(B, dtype=torch.long, device=dev)
    scratch.update(block=torch.full_like(zeros, -1), last_len=zeros, stage=zeros, k=zeros, hist_n=zeros,
                   cycle_len=zeros, determined=torch.zeros(B, dtype=torch.bool, device=dev), hist=None)


@hookimpl
def choose_span(state, options, scratch):
    if scratch["hist"] is None:
        scratch["hist"] = torch.zeros(state.batch_size, options.window, dtype=torch.float64, device=state.device)
    block = current_block(state)                                            # (B, 2)
    b0 = block[:, 0]
    _start_cycle(scratch, b0 != scratch["block"], 0)
    scratch["block"] = b0
    # an accelerated span without masks (decoded, or already filled while exploring) ends the cycle
    cols = state.columns[None, :]
    span_end = b0 + scratch["cycle_len"]
    lo = b0 + scratch["last_len"]
    in_span = (cols >= lo[:, None]) & (cols < span_end[:, None])
    empty = (scratch["stage"] == ACCELERATE) & ~(state.masked & in_span).any(dim=1)
    _start_cycle(scratch, empty, scratch["cycle_len"])
    lo = b0 + scratch["last_len"]
    hi = torch.where(scratch["stage"] == EXPLORE, block[:, 1], b0 + scratch["cycle_len"])
    return torch.stack([lo, hi], dim=1)


@hookimpl
def decide_phase(state, scratch):
    # one small host read per step: the label is a string for traces and metrics; the per-row
    # stages go along as a tensor (the out-of-span cache acts on them)
    explore = ((scratch["stage"] == EXPLORE) & ~state.done).any()
    accelerate = ((scratch["stage"] == ACCELERATE) & ~state.done).any()
    e, a = torch.stack([explore, accelerate]).tolist()
    label = "explore+accelerate" if e and a else ("explore" if e else "accelerate")
    return Phase(names=PHASES, rows=scratch["stage"].clone(), label=label)


@hookimpl
def select_tokens(state, candidates, options, scratch):
    conf = candidates.confidence                                            # (B, L), -inf if not eligible
    explore = (scratch["stage"] == EXPLORE)[:, None]                        # (B, 1)
    thr_explore = options.tau_high if options.explore_threshold is None else options.explore_threshold
    thr = torch.where(explore, thr_explore, options.tau_high)               # (B, 1)
    hi = conf > thr if options.variant == "paper" else conf >= thr
    if options.variant == "paper":
        hi = hi & ~explore                                                  # cautious: one per forward
    use_hi = hi.sum(dim=1, keepdim=True) >= options.min_parallel
    best = topk_mask(conf, torch.ones(conf.shape[0], dtype=torch.long, device=conf.device))
    return torch.where(use_hi, hi, best)


@hookimpl
def after_step(state, options, scratch):
    """Record this forward's candidate cycle length and move rows from exploration to the
    accelerated stage. Reads only the step record, so it runs whatever fills select_tokens."""
    if scratch["hist"] is None:           # another plugin chooses the spans: no cycles to track
        return
    rec = state.last
    bl, W, K = state.config.block, options.window, options.explore_steps
    paper = options.variant == "paper"
    exploring = (scratch["stage"] == EXPLORE) & rec.active                  # (B,)
    b0 = scratch["block"]
    s = b0 + scratch["last_len"]                                            # (B,) cycle start
    # candidate end: the last eligible position (masked, in [s, block end)) over tau_min
    conf = rec.confidence                                                   # (B, L) float32
    over = conf > options.tau_min if paper else conf >= options.tau_min
    far = torch.where(over, state.columns[None, :], -1).amax(dim=1)         # (B,)
    inc = torch.where(far >= 0, far - s + 1, 1)
    est = (scratch["last_len"] + inc).clamp(1, bl)                          # (B,) length from b0

    upd = exploring & ~scratch["determined"]
    rolled = torch.cat([scratch["hist"][:, 1:], est[:, None].to(torch.float64)], dim=1)
    hist = torch.where(upd[:, None], rolled, scratch["hist"])               # (B, W), newest last
    hist_n = torch.where(upd, (scratch["hist_n"] + 1).clamp(max=W), scratch["hist_n"])
    valid = torch.arange(W, device=hist.device)[None, :] >= (W - hist_n)[:, None]
    mean = (hist * valid).sum(1) / hist_n.clamp(min=1)                      # (B,)
    var = (((hist - mean[:, None]) ** 2) * valid).sum(1) / hist_n.clamp(min=1)
    full = hist_n >= W
    stable = full & ((var < options.stability) if paper else (var.sqrt() < options.stability))
    mean_len = mean.floor().long().clamp(1, bl)
    k = torch.where(exploring, scratch["k"] + 1, scratch["k"])
    if paper:
        # stop at the first stable window (or at K); the span ends at the window's mean
        done_exploring = exploring & ((upd & stable) | (k >= K))
        length_now = torch.where(done_exploring, mean_len, scratch["cycle_len"])
        determined = scratch["determined"] | done_exploring
    else:
        settle = upd & full
        length_now = torch.where(settle, torch.where(stable, est, mean_len), scratch["cycle_len"])
        determined = scratch["determined"] | (settle & (stable | (k >= K)))
        done_exploring = exploring & (k >= K)
        # never settled (K < W): the mean of what was recorded, or half a block without any
        fallback = torch.where(hist_n > 0, mean_len, bl // 2)
        length_now = torch.where(done_exploring & ~determined, fallback, length_now)
    scratch.update(hist=hist, hist_n=hist_n, k=k, cycle_len=length_now, determined=determined,
                   stage=torch.where(done_exploring, ACCELERATE, scratch["stage"]))
