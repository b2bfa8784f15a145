"""Greedy decoding of an autoregressive baseline (``AutoModelForCausalLM``) with its KV cache,
whose finished rows leave the batch as the engine's do.

``transformers`` ``generate`` feeds every row of a batch until the last has stopped, writing
padding after a row's EOS. The diffusion engine runs only the unfinished rows of a batch, so a
baseline that fed its finished rows would be measured against an engine that does not: here a
row that has written its EOS leaves the batch and its part of the KV cache. The tokens are
``generate``'s greedy ones (argmax of the last position's logits, left-padded prompts, position
ids counted over the real tokens); ``tests/test_ar_decode.py`` compares them.
"""

from __future__ import annotations

import inspect

import torch


@torch.inference_mode()
def greedy_decode(model, ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  eos_id: int, pad_id: int) -> torch.Tensor:
    """Generated tokens (B, max_new_tokens) of left-padded prompts ``ids`` (B, P) under
    ``attention_mask`` (B, P): each row up to and including its EOS, ``pad_id`` after it."""
    B = ids.shape[0]
    out = ids.new_full((B, max_new_tokens), pad_id)
    if max_new_tokens <= 0:
        return out
    att = attention_mask.long()
    pos = (att.cumsum(dim=1) - 1).clamp(min=0)                         # (B, P) as generate counts them
    # transformers renamed the cache argument and output (past_key_values -> cache) and added
    # logits_to_keep (the prompt's last position only) along the way
    params = inspect.signature(model.forward).parameters
    arg = "cache" if "cache" in params else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    res = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, **last_only)
    cache, live = getattr(res, arg), torch.arange(B, device=ids.device)
    last = pos[:, -1:]                                                 # (b, 1) the position just read
    nxt = res.logits[:, -1].argmax(dim=-1)                             # (b,)
    for t in range(max_new_tokens):
        out[live, t] = nxt
        going = nxt != eos_id
        # one host read a token, as generate's stopping check; rows leave only when one finished
        if not bool(going.all()):
            if not bool(going.any()):
                break
            keep = going.nonzero().flatten()
            cache.batch_select_indices(keep)
            live, att, last, nxt = live[keep], att[keep], last[keep], nxt[keep]
        if t + 1 == max_new_tokens:
            break
        att = torch.cat([att, att.new_ones(att.shape[0], 1)], dim=1)
        last = last + 1
        res = model(input_ids=nxt[:, None], attention_mask=att, position_ids=last, use_cache=True, **{arg: cache})
        cache, nxt = getattr(res, arg), res.logits[:, -1].argmax(dim=-1)
    return out
