"""LocalLeap, local anchor-guided parallel decoding (arXiv 2510.07081; friedrichor/LocalLeap
``llada/generate.py``, ``get_transfer_index`` with ``threshold`` and ``relaxed_threshold``), as a
``select_tokens`` plugin.

Every step, among the eligible positions (masked, in the span, row unfinished):

- the most confident one is always committed;
- an *anchor* is a position whose confidence reaches ``threshold`` (kappa);
- when the row has at least one anchor, every position within ``radius`` columns of an anchor
  (the anchor included) is committed when its confidence reaches ``relaxed_threshold`` (tau);
  every other position needs ``threshold``;
- without an anchor the rule is Fast-dLLM's threshold rule (``relaxed_threshold: null`` turns
  the relaxation off altogether, as the code's ``relaxed_threshold=None`` does).

Neighbourhoods are columns of the canvas, as in the code (``range(pos - radius, pos + radius +
1)`` clipped to the canvas), so a neighbourhood may reach committed positions or the next block,
where nothing is eligible. The span and the confidences come from other slots: the code decodes
LLaDA's semi-autoregressive blocks until each has no mask (``choose_span: llada``) and ranks by
the float64 softmax probability of the greedy (Gumbel-max at T > 0) token (``score: llada``).

Defaults are the code's LLaDA setting (``main`` of ``llada/generate.py``: threshold 0.9,
relaxed_threshold 0.75, radius 4). Differences: the code loops over rows and sets; here the rule
is a batched column dilation, identical in effect. Exact ties at the top are broken by the
lowest column (the code's ``torch.topk`` may return any of the tied positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from dllm_decode import PluginMeta, PluginOptions, hookimpl
from dllm_decode.sampling import topk_mask


class Options(PluginOptions):
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="kappa: confidence at or above which a "
                             "position is an anchor and is committed anywhere (the code's LLaDA setting).")
    relaxed_threshold: float | None = Field(0.75, ge=0.0, le=1.0, description="tau: confidence enough "
                                            "within radius of an anchor (null: Fast-dLLM's threshold rule).")
    radius: int = Field(4, ge=0, le=1 << 16, description="W: columns on each side of an anchor where "
                        "relaxed_threshold applies.")


dllm_meta = PluginMeta(summary="LocalLeap: commit above a threshold, and above a relaxed one within a "
                       "radius of a confident anchor; always at least the best token", options=Options,
                       resizable=True)


def near_anchors(anchor: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, L) bool: columns within ``radius`` of a True column of ``anchor`` (B, L), as a sliding
    window count over a cumulative sum (exact integers, one pass, every row at once)."""
    B, L = anchor.shape
    counts = F.pad(anchor.long().cumsum(dim=1), (1, 0))                    # (B, L + 1): anchors before each column
    cols = torch.arange(L, device=anchor.device)
    hi = (cols + radius + 1).clamp(max=L)
    lo = (cols - radius).clamp(min=0)
    return (counts[:, hi] - counts[:, lo]) > 0


@hookimpl
def select_tokens(candidates, options):
    conf = candidates.confidence                                            # (B, L), -inf if not eligible
    best = topk_mask(conf, torch.ones(conf.shape[0], dtype=torch.long, device=conf.device))
    if options.relaxed_threshold is None:
        return best | (conf >= options.threshold)
    # an anchor is an eligible position at kappa; -inf never reaches a threshold in [0, 1]
    near = near_anchors(conf >= options.threshold, options.radius)        # (B, L)
    # in the confidence's own dtype: a float32 0.9 would let a float64 0.89999999 through
    cut = torch.full_like(conf, options.threshold).masked_fill_(near, options.relaxed_threshold)
    return best | (conf >= cut)
