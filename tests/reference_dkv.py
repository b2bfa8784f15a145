"""dKV-Cache-Decode (horseee/dKV-Cache) re-derived plainly, one prompt at a time as its loops run:
LLaDA's ``generate`` (``generation_utils/llada_dkv_cache_decode.py`` with the
``preprocess_cache`` / ``use_cache`` branches of its model file
``modeling_llada_dkv_cache_decode.py``) and
Dream's ``_sample`` with ``cache_type="decoded"`` (``generation_utils/dream_generation_utils.py``,
``DynamicCache`` in ``generation_utils/cache_utils.py``), at T = 0.

The cache is kept as the code keeps it: the K/V of an explicit set of positions (the decoded
positions of the previous step for LLaDA; for Dream the positions whose successor was decoded,
with the code's wrap-around at the last column), rebuilt after every forward from the fresh K/V
of the queried positions and the cached K/V of the others. The forward itself is the naive
per-row forward of reference_forward.py; no code is shared with the plugin or the executor.
Mirrored engine rule: the mask token is never a candidate.
"""

import torch
import torch.nn.functional as F

from reference_dream import _sample_tokens
from reference_forward import naive_row, new_bank


def _forward(W, x, cached, queries):
    """One forward of the dKV model code. ``cached``: None (nothing cached: a full forward) or
    (positions, bank) of the cached K/V; ``queries``: the fed positions when something is cached.
    -> (raw logits of the fed positions, fed positions, bank of this forward's K/V: fresh for the
    fed positions, the cached ones elsewhere)."""
    L = x.shape[0]
    mask = torch.ones(L, dtype=torch.bool)
    bank = new_bank(W, L)
    if cached is None:
        fed = list(range(L))
        return naive_row(W, x, mask, fed, bank=bank), fed, bank
    positions, old = cached
    for layer, o in zip(bank, old):
        for p in positions:
            layer["k"][p], layer["v"][p] = o["k"][p], o["v"][p]
            layer["valid"][p] = True
    # keys: the fresh K/V of the queries and the cached K/V of every other position
    return naive_row(W, x, mask, queries, bank=bank, keys="bank"), queries, bank


def dkv_llada_generate(W, prompt, *, mask_id, gen_length, block_length, steps, cache_reloading_step):
    """LLaDA dKV-Cache-Decode, low-confidence remasking, T = 0 -> (generated ids, forwards)."""
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    P = len(prompt)
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    nfe = 0
    for b in range(num_blocks):
        cache = None                   # past_qkv: reset at every block
        prv = cur = None               # decoded positions after the step before last / last step
        hi = P + (b + 1) * block_length
        n = int((x[P + b * block_length: hi] == mask_id).sum())
        schedule = [n // per_block + (1 if s < n % per_block else 0) for s in range(per_block)]
        for i in range(per_block):
            mask_index = x == mask_id
            if i % cache_reloading_step != 0 and i > 1:
                # queries: every position not decoded when the previous step began
                queries = [p for p in range(len(x)) if not prv[p]]
                raw, fed, bank = _forward(W, x, cache, queries)
            else:
                raw, fed, bank = _forward(W, x, None, None)
            nfe += 1
            if i > 0:
                # the forward caches the K/V of the positions decoded before this step began
                cache = ([p for p in range(len(x)) if cur[p]], bank)
            logits = torch.full((len(x), raw.shape[-1]), float("-inf"), dtype=torch.float64)
            logits[fed] = raw
            logits[:, mask_id] = float("-inf")
            x0 = logits.argmax(dim=-1)
            p0 = F.softmax(logits, dim=-1).gather(-1, x0[:, None])[:, 0]
            p0[hi:] = float("-inf")
            unfed = torch.ones(len(x), dtype=torch.bool)
            unfed[fed] = False
            p0[unfed] = float("-inf")
            confidence = torch.where(mask_index, p0, torch.tensor(float("-inf"), dtype=torch.float64))
            _, sel = torch.topk(confidence, k=schedule[i])
            x[sel] = x0[sel]
            prv, cur = cur, x != mask_id
    return x[P:].tolist(), nfe


def _shift_un(nonmask, wrap):
    """Dream's 'un' cache positions: p is cached when p + 1 is decoded; the last column looks at
    column ``wrap`` (the code uses the last column for the first set, column 0 afterwards)."""
    return torch.cat([nonmask[1:], nonmask[wrap:wrap + 1]])


def dkv_dream_generate(W, prompt, *, mask_id, gen_length, steps, cache_steps, alg="entropy", eps=1e-3,
                       top_p=None, top_k=None):
    """Dream dKV-Cache-Decode (cache_type 'decoded', shift_type 'un'), T = 0
    -> (generated ids, forwards)."""
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    L = len(x)
    cache_position = _shift_un(x != mask_id, L - 1)
    prv_cache_position = None
    cache = None
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        if i % cache_steps == 0:
            prv_cache_position, cache = None, None          # refresh_cache
        if prv_cache_position is None:
            raw, fed, bank = _forward(W, x, None, None)
        else:
            queries = [p for p in range(L) if not prv_cache_position[p]]
            raw, fed, bank = _forward(W, x, cache, queries)
        # the cache now holds the K/V of cache_position, fresh or carried over
        cache = ([p for p in range(L) if cache_position[p]], bank)
        all_logits = torch.full((L, raw.shape[-1]), float("-inf"), dtype=torch.float64)
        all_logits[fed] = raw
        logits = torch.cat([all_logits[:1], all_logits[:-1]])       # the output at p predicts p + 1
        logits[:, mask_id] = float("-inf")
        mask_logits = logits[mask_index]
        assert torch.isfinite(mask_logits.amax(dim=-1)).all(), "a masked position lost its logits"
        confidence, x0 = _sample_tokens(mask_logits, 0.0, top_p, top_k, alg)
        t, s = timesteps[i], timesteps[i + 1]
        num_mask_token = mask_index.sum()
        n = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full = torch.full((L,), float("-inf"), dtype=torch.float64)
        full[mask_index] = confidence
        if n > 0:
            _, sel = torch.topk(full, n)
            cand = torch.full_like(x, mask_id)
            cand[mask_index] = x0
            x[sel] = cand[sel]
        prv_cache_position = cache_position
        cache_position = _shift_un(x != mask_id, 0)
    return x[len(prompt):].tolist(), steps
