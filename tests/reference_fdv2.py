"""Fast-dLLM v2's generation (NVlabs/Fast-dLLM ``v2/``; the checkpoints' ``modeling.py``,
``Fast_dLLM_QwenForCausalLM.generate`` with ``sample_with_top_p`` at temperature 0, no block
cache) re-derived plainly for one prompt, sharing no code with the engine,
``dllm_decode.block_mode``, the ``block_kv`` cache or the ``threshold`` plugin it checks.

As the original, for a prompt of P tokens and blocks of ``block`` positions counted from its
first token:

- P > block: one forward prefills the prompt's whole blocks; when P is a multiple of the block,
  the argmax of that forward's last raw output is appended (the next block's first token);
- then ``max_new_tokens // block`` times: stop if a stop id is anywhere in the generated part;
  append masks to complete the current block (``block - len % block``) and decode its
  sub-blocks of ``small_block`` positions left to right, each until it holds no mask. A step:
  stop the block if the block's new positions hold a stop id with no mask before it; else one
  forward of the whole block given everything before it, the block's raw outputs shifted right
  by one (block position i takes the output at i - 1, position 0 keeps its own), softmax; on
  the sub-block's masks the argmax and its probability, -inf elsewhere; commit every mask above
  ``threshold`` (strictly) and the most probable one;
- a block without a mask (and no stop as above): one more forward (the original stores the
  block's K/V with it) whose last raw output's argmax is appended;
- the result is the generated part cut after the first stop id (kept).

The model's view is what the original's KV cache gives it. The model re-aligns this family's
shifted logits (its logit at p is the raw output at p - 1), so the raw output at p is read as
the logit at p + 1 of a forward that feeds one more position (a mask in the next block, which no
earlier position sees under the block-causal mask).

Deliberate differences: the mask id is never a candidate (its logit is -inf before the softmax
and every argmax), as the engine rules; the original would commit it. A prompt of exactly one
block is refused: the original then prefills nothing (the prompt is not longer than a block)
and feeds the first block of masks alone, without the prompt.
"""

import torch


def fdv2_generate(model, prompt, *, mask_id, stop_id, max_new_tokens, block=32, small_block=8, threshold=0.9):
    """-> (generated ids cut after the first ``stop_id``, forwards)."""
    P = len(prompt)
    assert P != block, "the original never sees a prompt of exactly one block"
    assert block % small_block == 0
    x = list(prompt)
    forwards = 0

    def raw(upto):
        """(upto, V) float64 raw outputs at positions 0..upto-1, the mask id banned."""
        ids = torch.tensor([x[:upto] + [mask_id]])
        out = model(ids).double()[0, 1:upto + 1]
        out[:, mask_id] = float("-inf")
        return out

    def stopped(region_start):
        """The original's in-block test: a stop id among the block's new positions, no mask before it."""
        region = x[region_start:]
        return stop_id in region and mask_id not in region[:region.index(stop_id)]

    if P > block:
        forwards += 1
        if P % block == 0:
            x.append(int(raw(P)[-1].argmax()))
    for _ in range(max_new_tokens // block):
        if stop_id in x[P:]:
            break
        region_start = len(x)
        x += [mask_id] * (block - len(x) % block)
        hi = len(x)
        lo = hi - block
        done = False
        for sb in range(block // small_block):
            a, b = lo + sb * small_block, lo + (sb + 1) * small_block
            while mask_id in x[a:b] and not done:
                if stopped(region_start):
                    done = True
                    break
                out = raw(hi)[lo:hi]                                       # (block, V)
                aligned = torch.cat([out[:1], out[:-1]])[a - lo:b - lo]    # (small_block, V)
                probs = torch.softmax(aligned, dim=-1)
                conf, tok = probs.max(dim=-1)
                masked = torch.tensor([t == mask_id for t in x[a:b]])
                conf = torch.where(masked, conf, torch.tensor(float("-inf"), dtype=conf.dtype))
                take = conf > threshold
                take[int(conf.argmax())] = True
                take &= masked
                for i in torch.nonzero(take).flatten().tolist():
                    x[a + i] = int(tok[i])
                forwards += 1
        if done or stopped(region_start):
            break
        forwards += 1                                                       # the K/V store forward
        x.append(int(raw(hi)[-1].argmax()))
    out = x[P:]
    return (out[:out.index(stop_id) + 1] if stop_id in out else out), forwards
