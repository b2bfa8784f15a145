"""The exact KV cache of block-causal models (SDAR, Fast-dLLM v2, LLaDA2), as a ``cache_policy``.

A block-causal model's finished blocks never attend to later positions, and the engine decodes
it one block at a time (``dllm_decode.block_mode``), so the keys and values of a finished block
are final once they are computed from its final tokens: they are written to the request's store
and never recomputed. The official loops (JetAstra/SDAR ``generate.py``) prefill the prompt's
whole blocks, feed the current block against the cache at every step, and after the block's
last commit run one more forward to store its final K/V. Here that last forward is folded into
the next block's first: a step feeds, against the store, the range from the earliest block
whose stored K/V are not yet final to the canvas end (``ComputePlan.block_step``); the first
step feeds the whole canvas and writes its K/V (the prefill).

Exact: every fed block is computed in canvas chunks of the block size, so the logits are the
same bits as a plain block-causal forward of the whole canvas (``cache_policy: none``) as long
as the fed range starts on a multiple of the block size, which is where it starts. With the
token shift the feed also holds the position before a block's first one while that is masked.
Rows of a padded batch have their blocks at their own columns; the feed starts at the batch's
earliest non-final block (rounded down to a canvas multiple of the block size), so a row may
recompute up to one block it has already finished, from the same tokens. A finished row does
not count. When rows are blocks apart (an adaptive commit rule runs some rows ahead, and the
gap grows with the answer: at generation length 1024, four rows of a 12.9M-parameter model were
fed 216 columns a forward on average where each needed 8), each row feeds its own blocks
(``ComputePlan.block_rows``), with the same bits.
"""

from __future__ import annotations

import torch

from dllm_decode.block_mode import block_start
from dllm_decode.hookspecs import hookimpl
from dllm_decode.models.plan import ComputePlan
from dllm_decode.plugins import PluginMeta

dllm_meta = PluginMeta(summary="Exact KV cache of block-causal models: finished blocks' K/V are stored once "
                       "and never recomputed; each step feeds the current block",
                       exact=True, requires=("compute_plans", "block_causal"), resizable=True, drops_rows=True)


@hookimpl
def cache_policy(state, scratch):
    size = state.blocks.size
    masked = state.masked                                                   # (B, L)
    # each row's current block (the model's, holding its first mask), or its end when it has none
    first = torch.where(masked.any(1), masked.long().argmax(1), state.ends)           # (B,)
    current = block_start(state, first, size)                                        # (B,)
    final = scratch.get("final")               # (B,) columns before which the stored K/V are final
    # this forward feeds every block before `current` with its final tokens: final afterwards
    scratch["final"] = current if final is None else torch.maximum(final, current)
    if final is None:
        return ComputePlan.refresh(name="block_kv:prefill")           # the whole canvas, K/V kept
    # A finished row (state.done: no mask left; one that goes on got its next block at the end of
    # the last step): nothing of it is read again, so it must not hold the feed back while the batch's
    # longer rows go on (it did: every step fed from the first finished row's end, a range that
    # grew with every block the others decoded).
    pending = torch.where(state.done, final.max(), final)                          # (B,)
    if getattr(state.store, "shift", 0):
        # With the token shift (Fast-dLLM v2) a block's first position is predicted by the
        # previous block's last output: while it is masked that position is fed too (its block
        # is final, so it is recomputed to the same bits), or the feed's first position would
        # take its own logit where the uncached forward gives it its predecessor's. (Column 0,
        # an empty prompt's first position, has none: its own logit, as uncached.)
        opens = masked.gather(1, current.clamp(max=state.length - 1)[:, None])[:, 0] & ~state.done
        pending = torch.where(opens, torch.minimum(pending, (current - 1).clamp(min=0)), pending)
    lo = pending.div(size, rounding_mode="floor") * size          # (B,) each row's feed, from a chunk edge
    L = state.length
    full = L // size * size                                     # the canvas's whole chunks end here
    hi = torch.where(state.done, lo, (-(-state.ends // size) * size).clamp(max=full))   # (B,)
    # one host read: where the batch's feed starts, and the most whole chunks one row needs
    start, width = torch.stack([lo.min(), (hi - lo).max().clamp(min=0)]).tolist()
    tail = L - full
    if L - start <= width + tail + size:
        # rows decode side by side: one range from the earliest row's block to the canvas end
        return ComputePlan.block_step(start, L, name="block_kv")
    # Rows apart (an adaptive rule let some run blocks ahead, or a server joined a new request):
    # the range would feed every row every column between the last row's block and the first
    # one's. Each row feeds its own `width` columns instead, shifted left onto finished blocks
    # (recomputed from the same tokens: the same bits) where the canvas's whole chunks end,
    # plus the canvas's last, partial chunk.
    rows = torch.where(state.done, full - width, lo.clamp(max=full - width))
    return ComputePlan.block_rows(rows, width, full, L, name="block_kv:rows")
