"""The caches of Fast-dLLM (prefix / dual KV cache, NVlabs/Fast-dLLM ``llada/generate.py``),
dLLM-Cache (maomaocun/dLLM-cache) and SlowFast's cut fast phase over its dLLM-Cache fork
(LiangrunFlora/Slow-Fast-Sampling), re-derived one prompt at a time
over the naive per-row forward of reference_forward.py. They share no code with the cache
plugins or with dllm_decode's plan executor.

``DllmCacheRow`` is a batch-1 stand-in model: called like a model on a (1, L') canvas (L' may be
shorter than the canvas it first saw: SlowFast's cut forwards), it runs dLLM-Cache's per-forward
logic and returns aligned logits, so the policy reference loops (reference_llada,
reference_slowfast) decode through it unchanged.
"""

import torch
import torch.nn.functional as F

from reference_forward import align, naive_row, new_bank


class DllmCacheRow:
    def __init__(self, W, *, shift, prompt_len, prompt_interval, response_interval, rho,
                 full_first_layer=True):
        self.W, self.shift, self.P = W, shift, prompt_len
        self.Kp, self.Kr, self.rho = prompt_interval, response_interval, rho
        self.full_layers = (0,) if full_first_layer else ()
        self.bank, self.n = None, 0

    def __call__(self, x, attention_mask=None):
        ids = x[0]
        n = ids.shape[0]
        if self.bank is None:
            self.bank = new_bank(self.W, n)
        fed = list(range(n))
        refresh_prompt = self.n % self.Kp == 0            # upstream: (step - 1) % K_p == 0, step from 1
        refresh_response = self.n % self.Kr == 0
        self.n += 1
        kw = {}
        if refresh_prompt and refresh_response:
            recompute = fed
        else:
            recompute = (list(range(self.P)) if refresh_prompt else []) + \
                        (list(range(self.P, n)) if refresh_response else [])
            if not refresh_response and self.rho > 0:
                kw = dict(verify=(self.P, n), rho=self.rho)
        raw = naive_row(self.W, ids, torch.ones(n, dtype=torch.bool), fed, bank=self.bank, keys="bank",
                        key_end=n, recompute=recompute, full_layers=self.full_layers, **kw)
        return align(raw, fed, self.shift)[None]


class GuidedCacheRow:
    """dLLM-Cache's cached guidance residual (maomaocun/dLLM-cache's CFG cache), batch 1: returns
    guided logits ``cond + w * (cond - uncond)`` for the generated region's decisions. The
    conditional and unconditional canvases each have their own dLLM-Cache (own forward
    counter); the unconditional one runs, and the residual is refreshed, in the first 5
    forwards and every ``cfg_interval``-th, otherwise the last residual is reused."""

    def __init__(self, W, *, shift, prompt_len, mask_id, cfg_scale, cfg_interval, **cache):
        self.cond = DllmCacheRow(W, shift=shift, prompt_len=prompt_len, **cache)
        self.uncond = DllmCacheRow(W, shift=shift, prompt_len=prompt_len, **cache)
        self.P, self.mask_id, self.w, self.every = prompt_len, mask_id, cfg_scale, cfg_interval
        self.step, self.residual, self.uncond_forwards = 0, None, 0

    def __call__(self, x, attention_mask=None):
        cond = self.cond(x)
        if self.step < 5 or self.step % self.every == 0:
            blind = x.clone()
            blind[:, :self.P] = self.mask_id
            self.residual = cond - self.uncond(blind)
            self.uncond_forwards += 1
        self.step += 1
        return cond + self.w * self.residual


def fastdllm_cached_generate(W, prompt, *, mask_id, gen_length, block_length, threshold, mode,
                             shift=False, first_token=False):
    """Fast-dLLM's cached threshold decoding, batch 1: per block one full forward that rebuilds
    the K/V bank, then cached forwards of the block + suffix (prefix) or the block (dual) while
    the block has masks. ``first_token``: the Dream block sampler's forced greedy token at the
    block start (the full forward commits only it)."""
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    L, P = x.shape[0], len(prompt)
    mask = torch.ones(L, dtype=torch.bool)
    nfe = 0

    def decide(raw, fed, lo, hi, only_first):
        logits = align(raw, fed, shift).clone()
        logits[:, mask_id] = float("-inf")
        x0 = logits.argmax(dim=-1)
        conf = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[:, None])[:, 0]
        slot = {p: j for j, p in enumerate(fed)}
        if only_first:
            x[lo] = x0[slot[lo]]
            return
        cand = [p for p in range(lo, hi) if int(x[p]) == mask_id]
        best = max(cand, key=lambda p: (float(conf[slot[p]]), -p))
        for p in {best} | {p for p in cand if float(conf[slot[p]]) >= threshold}:
            x[p] = x0[slot[p]]

    for b in range(gen_length // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        bank = new_bank(W, L)
        fed = list(range(L))
        decide(naive_row(W, x, mask, fed, bank=bank), fed, lo, hi, first_token)
        nfe += 1
        while (x[lo:hi] == mask_id).any():
            fed = list(range(lo, L)) if mode == "prefix" else list(range(lo, hi))
            decide(naive_row(W, x, mask, fed, bank=bank, keys="bank"), fed, lo, hi, False)
            nfe += 1
    return x[P:].tolist(), nfe
