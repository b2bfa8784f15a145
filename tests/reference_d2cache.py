"""d2Cache (Kamichanw/d2Cache) re-derived plainly, one prompt at a time: ``vanilla_generate`` /
``generate_step`` of ``src/generation/vanilla.py`` (``num_transfer_tokens`` per step, certainty
prior ``sigma``) with the ``d2Cache`` cache of ``src/cache/d2cache.py`` (its ``on_step_end``
selection, attention rollout and K/V cache) and the helpers of ``src/utils/common.py``
(``certainty_density`` by FFT, as the code computes it, here in float64; ``nucleus_select``), at
T = 0.

The forward is the naive per-row forward of reference_forward.py over a full-length K/V bank,
which also hands back every layer's head-mean attention; the rollout is the code's full
(T, T) matrix product. No code is shared with the plugin or the executor.

Mirrored engine rule: the mask token is never a candidate. Mirrored documented choices of the
plugin (docs/caches.md): a masked position is a candidate only when the output predicting it was
recomputed (the code's restriction is lost to a write into a copy); the first forward's
confidence is the one the selection uses throughout (the code's update is lost likewise).
"""

import torch
import torch.nn.functional as F

from reference_dream import _sample_tokens
from reference_forward import naive_row, new_bank


def certainty_density(mask, sigma):
    """d2Cache's ``certainty_density`` for one row: mask (G,) bool -> (G,) float64."""
    L = mask.shape[0]
    padded = F.pad(mask.double()[None], (L, L), "constant", 1.0)[0]
    if not bool(mask[-1]):
        padded[2 * L:] = 0.0
    ext, n = 3 * L, 6 * L
    dist = torch.cat((torch.arange(ext), torch.arange(-ext, 0))).double()
    kernel = torch.fft.fft(torch.exp(-dist ** 2 / (2 * sigma ** 2)), n=n)
    weighted = torch.fft.ifft(torch.fft.fft(F.pad(padded, (0, ext)), n=n) * kernel, n=n).real
    total = torch.fft.ifft(torch.fft.fft(torch.ones(n, dtype=torch.float64), n=n) * kernel, n=n).real
    return weighted[L:2 * L] / total[L:2 * L].clamp_min(1e-8)


def nucleus_select(scores, top_p, mask):
    """d2Cache's ``nucleus_select`` for one row (min_k 1); ties go to the lower position."""
    scores = torch.where(mask, scores, torch.zeros_like(scores))
    probs = scores / (scores.sum() + 1e-9)
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
    out = torch.zeros_like(mask)
    cum = 0.0
    for rank, i in enumerate(order):
        cum += float(probs[i])
        if (cum <= top_p or rank == 0) and bool(mask[i]):
            out[i] = True
    return out


def _topk(values, k):
    """Indices of the k largest values (ties to the lower index), for a 1-D tensor."""
    return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))[:k]


def d2cache_generate(W, prompt, *, mask_id, gen_length, block_length, shift, rollout_p=0.1, current_k=32,
                     sigma=10.0, inflate_w=0, decode_sigma=10.0, alg="maskgit_plus", top_p=None, top_k=None,
                     num_transfer_tokens=1):
    """d2Cache over vanilla decoding, T = 0 -> (generated ids, forwards)."""
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    P, G = len(prompt), gen_length
    T = P + G
    attn_mask = torch.ones(T, dtype=torch.bool)
    bank = new_bank(W, T)
    q_mask = None            # _full_q_mask: None until the first step has ended
    conf_cache = None
    nfe = 0
    for b in range(G // block_length):
        block = torch.zeros(G, dtype=torch.bool)
        block[b * block_length:(b + 1) * block_length] = True
        while bool((x[P:][block] == mask_id).any()):
            remaining = x[P:] == mask_id
            # ---- the forward: everything the first time, then the chosen queries
            layers = []
            fed = list(range(T)) if q_mask is None else [p for p in range(T) if q_mask[p]]
            if q_mask is None:
                raw = naive_row(W, x, attn_mask, fed, bank=bank, attention=layers)
            else:
                raw = naive_row(W, x, attn_mask, fed, bank=bank, keys="bank", attention=layers)
            nfe += 1
            logits = torch.zeros(T, raw.shape[-1], dtype=torch.float64)
            logits[fed] = raw
            active = torch.zeros(T, dtype=torch.bool)
            active[fed] = True
            if shift:
                logits = torch.cat([logits[:1], logits[:-1]])
                valid = active[P - 1:-1]
            else:
                valid = active[P:]
            logits[:, mask_id] = float("-inf")
            logits = logits[P:]
            # ---- generate_step: candidates, certainty prior, top num_transfer_tokens in the block
            transfer = remaining & valid
            conf, x0 = _sample_tokens(logits, 0.0, top_p, top_k, alg)
            confidence = torch.where(transfer, conf, torch.tensor(float("-inf"), dtype=torch.float64))
            scores = confidence
            if decode_sigma:
                scores = confidence * certainty_density(~remaining, decode_sigma)
            eligible = transfer & block
            ranked = torch.where(eligible, scores, torch.tensor(float("-inf"), dtype=torch.float64))
            n = min(int(eligible.sum()), num_transfer_tokens)
            committed = _topk(ranked, n)
            for g in committed:
                x[P + g] = x0[g]
            # ---- d2Cache.on_step_end: the next forward's queries
            if conf_cache is None:
                conf_cache = confidence
            remaining = x[P:] == mask_id
            cols = torch.arange(G)
            meets = torch.cumsum(remaining.long(), 0) >= current_k
            min_end = int(torch.argmax(meets.long())) if bool(meets.any()) else G - 1
            size = int(block.sum())
            search_end = (min_end // size + 1) * size - 1
            start = int(torch.argmax(block.long()))
            search = (cols >= start) & (cols <= search_end)
            scores = conf_cache * certainty_density(~remaining, sigma)
            scores = scores.clone()
            scores[block] += scores.max()
            ranked = torch.where(search & remaining, scores, torch.tensor(float("-inf"), dtype=torch.float64))
            chosen = torch.zeros(G, dtype=torch.bool)
            for g in _topk(ranked, min(current_k, G)):
                if float(ranked[g]) > float("-inf"):
                    chosen[g] = True
            chosen &= remaining
            response = torch.cat([chosen[1:], torch.zeros(1, dtype=torch.bool)]) if shift else chosen.clone()
            for g in committed:
                response[g] = True
            q = torch.cat([torch.zeros(P, dtype=torch.bool), response])
            # attention rollout of this forward: query rows attention, others identity
            rollout = torch.eye(T, dtype=torch.float64)
            for a in layers:
                effective = torch.eye(T, dtype=torch.float64)
                effective[fed] = a
                residual = effective + torch.eye(T, dtype=torch.float64)
                residual = residual / residual.sum(dim=-1, keepdim=True)
                rollout = residual @ rollout
            importance = rollout.sum(dim=0)
            q |= nucleus_select(importance, rollout_p, ~q)
            if shift:
                q[P - 1] = chosen[0]
            if inflate_w > 0:
                sel = [p for p in range(T) if q[p]]
                for a, c in zip(sel, sel[1:]):
                    if c - a <= inflate_w:
                        q[a:c] = True
            q_mask = q
    return x[P:].tolist(), nfe
