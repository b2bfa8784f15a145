"""Fast-dLLM's confidence-aware parallel decoding (NVlabs/Fast-dLLM ``llada/generate.py``) as a
``select_tokens`` plugin.

- ``mode: threshold`` (``get_transfer_index``): commit every eligible (masked, in-span) token
  whose confidence is at or above ``threshold``; when none is, the single most confident one,
  so every step makes progress.
- ``mode: factor`` (``get_transfer_index_dynamic``): with c_1 >= c_2 >= ... >= c_N the sorted
  eligible confidences, commit the top n while c_i >= 1 - factor / (i + 1) for i = 2..n (the
  test for i = 1 is skipped). Reference quirk, kept: when the first failing index is the last
  one (i = N), all N tokens are still committed.

``block_first_token`` (Fast-dLLM v2, NVlabs/Fast-dLLM ``v2/``, the checkpoints' ``generate``):
on a block-causal model, a step in which a row may commit the first position of one of the
model's blocks commits that position alone. Rows gain a block only after finishing the one
before (``dllm_decode.block_mode``), so this is the new block's first step; with the token shift
the position's logit is the finished block's last output, and its argmax is the token Fast-dLLM
v2 appends after each block (from the forward that stores the block's K/V) before it decodes
the next block's sub-blocks. A recipe with the option is refused at load on a model without
blocks.

The span and the scores come from other slots (``llada`` by default), so ``steps`` only sets the
engine's step cap here: decoding of a block runs until it has no mask left.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dllm_decode import PluginMeta, PluginOptions, hookimpl
from dllm_decode.block_mode import block_starts
from dllm_decode.sampling import threshold_commit, topk_mask


class Options(PluginOptions):
    mode: Literal["threshold", "factor"] = Field(
        "threshold", description="threshold: commit every token with confidence >= threshold; "
        "factor: commit the longest prefix of the sorted confidences with (i+1)(1-c_i) < factor.")
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="Confidence at or above which a token "
                             "is committed (mode threshold).")
    factor: float = Field(1.0, gt=0.0, description="The factor f of the rule c_i >= 1 - f/(i+1) "
                          "(mode factor).")
    block_first_token: bool = Field(False, description="Block-causal models (Fast-dLLM v2): when a "
                                    "row may commit the first position of one of the model's blocks, "
                                    "commit it alone (with the token shift: the argmax of the previous "
                                    "block's last output).")

    def requires(self) -> tuple[str, ...]:
        return ("block_causal",) if self.block_first_token else ()


dllm_meta = PluginMeta(summary="Fast-dLLM parallel decoding: commit above a confidence threshold "
                       "(or by the factor rule), always at least the best token", options=Options,
                       resizable=True)


def factor_count(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, L) confidences -> (B,) number of tokens the factor rule commits (>= 1 where any is
    eligible)."""
    c = torch.sort(confidence, dim=-1, descending=True).values             # (B, L)
    n = (confidence > float("-inf")).sum(-1)                               # (B,)
    i = torch.arange(c.shape[-1], device=c.device)                         # 0-based rank
    thr = 1.0 - factor / (i + 2).to(c.dtype)                               # rank i is the (i+1)-th
    thr[0] = -1.0                                                           # the best always passes
    fails = (c < thr) & (i[None, :] < n[:, None])                          # (B, L)
    first = torch.where(fails.any(-1), fails.long().argmax(-1), n - 1)     # (B,)
    # the reference adds one when the stop index is the first or the last rank
    return torch.where((first == 0) | (first == n - 1), first + 1, first).clamp(max=n)


@hookimpl
def select_tokens(state, candidates, options):
    conf = candidates.confidence
    if options.mode == "threshold":
        commit = threshold_commit(conf, options.threshold)
    else:
        commit = topk_mask(conf, factor_count(conf, options.factor))
    if options.block_first_token:
        first = block_starts(state) & (conf > float("-inf"))      # (B, L), one per row at most
        commit = torch.where(first.any(dim=1, keepdim=True), first, commit)
    return commit
