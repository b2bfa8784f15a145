"""Dream's sampler (HKUNLP/Dream ``generation_utils.py``) and Fast-dLLM's Dream block sampler
(NVlabs/Fast-dLLM ``dream/model/generation_utils_block.py``) re-derived plainly, one prompt at a time (batch 1, as both references run), sharing no code with the plugin.

``raw_logits(x)`` returns the model's own logits; with ``shift=True`` (Dream checkpoints) they are
next-token logits and the loop right-shifts them itself, as the reference does. Mirrored engine
rule: the mask token is never a candidate.
"""

import torch
import torch.nn.functional as F


def _sample_tokens(logits, temperature, top_p, top_k, alg):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        s, idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(s, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, idx, remove), torch.finfo(logits.dtype).min)
    if top_k is not None:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k)[0][..., -1, None], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)          # T = 0 only: the parity tests are greedy
    if alg == "topk_margin":
        sp = torch.sort(probs, dim=-1, descending=True).values
        confidence = sp[:, 0] - sp[:, 1]
    if alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def _logits(raw_logits, x, mask_id, shift):
    logits = raw_logits(x).clone()
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    logits[..., mask_id] = float("-inf")
    return logits.to(torch.float64)


def dream_generate(raw_logits, prompt, *, mask_id, gen_length, steps, alg="entropy", eps=1e-3,
                   top_p=None, top_k=None, shift=False):
    """Dream ``_sample`` at T = 0 for one prompt -> (generated ids, forwards, tokens per step)."""
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    timesteps = torch.linspace(1, eps, steps + 1)
    per_step = []
    for i in range(steps):
        mask_index = x == mask_id
        logits = _logits(raw_logits, x, mask_id, shift)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        confidence, x0 = _sample_tokens(mask_logits, 0.0, top_p, top_k, alg)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        n = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full = torch.full(x.shape, float("-inf"), dtype=torch.float64)
        full[mask_index] = confidence
        if n > 0:
            _, sel = torch.topk(full, n)
            cand = torch.full_like(x, mask_id)
            cand[mask_index] = x0
            x[0, sel[0]] = cand[0, sel[0]]
        per_step.append(n)
    return x[0, len(prompt):].tolist(), steps, per_step


def dream_block_generate(raw_logits, prompt, *, mask_id, gen_length, steps, block_length, alg="entropy",
                         eps=1e-3, threshold=None, shift=False):
    """Fast-dLLM's Dream block sampler at T = 0, every forward over the whole canvas (no cache):
    forced first token per block, then the block schedule from index 1 (or the threshold rule)."""
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    P = len(prompt)
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    timesteps = torch.linspace(1, eps, spb + 1)
    nfe = 0
    for b in range(num_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        logits = _logits(raw_logits, x, mask_id, shift)
        nfe += 1
        _, x0 = _sample_tokens(logits[0], 0.0, None, None, "maskgit_plus")
        x[0, lo] = x0[lo]
        i = 1
        while True:
            if threshold is None and i == spb:
                break
            logits = _logits(raw_logits, x, mask_id, shift)
            nfe += 1
            mask_index = x == mask_id
            mask_index[:, hi:] = False
            mask_index[:, :lo] = False
            confidence, x0 = _sample_tokens(logits[mask_index], 0.0, None, None,
                                            "maskgit_plus" if threshold is not None else alg)
            full = torch.full(x.shape, float("-inf"), dtype=torch.float64)
            full[mask_index] = confidence
            cand = torch.full_like(x, mask_id)
            cand[mask_index] = x0
            n_block = int(mask_index.sum())
            if threshold is not None:
                vals, sel = torch.topk(full, n_block)
                keep = [int(sel[0, 0])] + [int(sel[0, k]) for k in range(1, n_block) if vals[0, k] >= threshold]
                x[0, keep] = cand[0, keep]
            else:
                t, s = timesteps[i], timesteps[i + 1]
                num_mask_token = mask_index.sum() / mask_index.shape[0]
                n = int(num_mask_token * (1 - s / t)) if i < spb - 1 else int(num_mask_token)
                if n > 0:
                    _, sel = torch.topk(full, n)
                    x[0, sel[0]] = cand[0, sel[0]]
                i += 1
            if not (x[:, lo:hi] == mask_id).any():
                break
    return x[0, P:].tolist(), nfe
