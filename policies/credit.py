"""Credit decoding, dInfer's threshold parallel decoding with credit accumulated over steps
(inclusionAI/dInfer ``python/dinfer/decoding/parallel_strategy.py``,
``CreditThresholdParallelDecoder`` and ``get_transfer_index_threshold``), as ``score`` /
``select_tokens`` plugins.

- ``score``: each row keeps a credit matrix ``C`` (block_length x V, float32) for the block that
  holds its span. Every forward, ``C`` is multiplied by ``decay_beta`` (not at the block's first
  forward, where it is still zero), then every masked position of the block adds
  ``top1_prob ** boost_gamma`` (float32 softmax of the raw logits) at its top-1 token. The
  logits become ``logits + credit_alpha * log(C + 1)`` inside the block; the candidate is their
  argmax (Gumbel-max at T > 0) and the confidence its softmax probability (float32, or float64
  with ``use_float64``) under them. A new block starts from zero credit.
- ``select_tokens``: dInfer's threshold rule: commit every eligible position whose confidence is
  at least ``min(threshold, best - 1e-5)`` (clamped below at -1000), so when nothing reaches the
  threshold, the best and everything within 1e-5 of it. The best is always committed, which the
  rule implies for confidences in [0, 1] and keeps progress for any other score.

The select rule reads only the confidence, so either hook also works with other plugins
(``credit`` select over ``llada`` scores is dInfer's plain ``ThresholdParallelDecoder`` with
float64 confidences). Differences from the code: rows move through blocks on their own, each
with its own credit (dInfer holds the batch at one block), and the credit belongs to the request
(dInfer keeps its matrices in the decoder until a canvas has no mask left); the block is the one
of ``generation.block_length`` holding the row's span start, so with span plugins narrower than
a block (SlowFast) positions of the block outside the span still gain credit, and with wider
ones (APD) positions past the block get none; the mask token is never a candidate (its logit is
``-inf``, where dInfer drops a position whose argmax is the mask); the credit's power and
logarithm are taken in float64 and rounded to float32 (see ``_f32``); at T > 0 the Gumbel noise
is the row's own keyed noise.
"""

from __future__ import annotations

import torch
from pydantic import Field

from dllm_decode import Candidates, PluginMeta, PluginOptions, hookimpl
from dllm_decode.noise import draws
from dllm_decode.sampling import gumbel_perturb, topk_mask

TOLERANCE = 1e-5   # below the threshold, everything this close to the best is committed with it
FLOOR = -1000.0    # the code's lower clamp of the effective threshold


class Options(PluginOptions):
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="Confidence at or above which a "
                             "position is committed (dInfer's benchmark and evaluation default).")
    credit_alpha: float = Field(0.7, ge=0.0, description="Weight of log(1 + credit) added to the "
                                "logits.")
    boost_gamma: float = Field(0.2, ge=0.0, description="Credit gained per forward: top-1 "
                               "probability ** boost_gamma, at the top-1 token of each masked position.")
    decay_beta: float = Field(0.8, ge=0.0, le=1.0, description="Factor applied to the credit at every "
                              "forward of the block after its first.")
    use_float64: bool = Field(False, description="Confidence from a float64 softmax of the fused "
                              "logits (dInfer's use_float64) instead of float32.")


dllm_meta = PluginMeta(summary="Credit decoding (dInfer): logits boosted by credit accumulated over "
                       "a block's forwards, then dInfer's threshold rule", options=Options)


def _credit(state, scratch: dict, start: torch.Tensor, V: int, beta: float) -> torch.Tensor:
    """The rows' credit matrices (B, block + 1, V) float32, decayed for this forward and zeroed
    for rows that entered a new block; row ``block`` is a sink that always stays zero."""
    B, bl = state.batch_size, state.config.block
    credit = scratch.get("credit")
    if credit is None or credit.shape[-1] != V:
        credit = torch.zeros((B, bl + 1, V), dtype=torch.float32, device=state.device)
        scratch["start"] = torch.full_like(start, -1)
    new = start != scratch["start"]                                         # (B,)
    credit.mul_(beta).masked_fill_(new[:, None, None], 0.0)
    scratch.update(credit=credit, start=start)
    return credit


def _f32(x: torch.Tensor) -> torch.Tensor:
    """A float64 result rounded to float32. The code evaluates pow and log in float32; vectorised
    float32 kernels round the last bit differently at different offsets of a tensor, which would
    make a row's credit depend on its place in the batch; from float64 the rounding is the same."""
    return x.to(torch.float32)


@hookimpl
def score(state, logits, positions, options, scratch):
    B, q, V = logits.shape
    bl = state.config.block
    # the credit block: the block of generation.block_length holding the span start
    start = state.gen_start + (state.span[:, 0] - state.gen_start).div(bl, rounding_mode="floor") * bl  # (B,)
    cols = state.columns[None, :].expand(B, -1) if positions is None else positions          # (B, q)
    rel = cols - start[:, None]
    inside = (rel >= 0) & (rel < bl)
    row = torch.where(inside, rel, bl)                                      # (B, q), bl: the sink
    credit = _credit(state, scratch, start, V, options.decay_beta)          # (B, bl + 1, V)
    top1, top_id = torch.softmax(logits.to(torch.float32), dim=-1).max(dim=-1)   # (B, q)
    boost = _f32(top1.to(torch.float64).pow(options.boost_gamma))          # (B, q)
    gain = boost * (inside & state.masked.gather(1, cols)).to(torch.float32)  # masked block positions only
    credit.view(B, -1).scatter_add_(1, row * V + top_id, gain)
    held = credit.gather(1, row[..., None].expand(B, q, V))                 # (B, q, V) float32
    fused = logits + options.credit_alpha * _f32(torch.log((held + 1).to(torch.float64)))   # zero credit: as is
    T = state.config.temperature
    u = draws(state, positions, "credit.sample", V) if T > 0 else None
    x0 = gumbel_perturb(fused, T, u).argmax(dim=-1)                         # (B, q)
    p = torch.softmax(fused.to(torch.float64 if options.use_float64 else torch.float32), dim=-1)
    return Candidates(tokens=x0, confidence=p.gather(-1, x0[..., None]).squeeze(-1))


@hookimpl
def select_tokens(candidates, options):
    conf = candidates.confidence                                            # (B, L), -inf if not eligible
    cut = (conf.max(dim=1).values - TOLERANCE).clamp(FLOOR, options.threshold)   # (B,)
    best = topk_mask(conf, torch.ones(conf.shape[0], dtype=torch.long, device=conf.device))
    return best | (conf >= cut[:, None])
