"""WINO's decoding loop (arXiv 2507.18578, Feng-Hong/WINO-DLLM ``decoding_wino``) re-derived for
one row at a time, with its own forward: the canvas is extended by a block of MASK queries at the
block's positions and an explicit per-query attention matrix is built here (real queries see
every real key and no shadow; a shadow sees every real key except its own column, and every
shadow). It reuses only the float64 weight reader and the RMSNorm / linear / RoPE formulas of
reference_forward.py, never dllm_decode's executor or plugins.

Mirrored engine rule: the mask token is never a candidate (its logit is -inf before every
softmax, canvas and shadow alike).
"""

import math

import torch

from reference_forward import _lin, _rms, _rope


def shadow_forward(W, ids, shadow, mask_id):
    """Raw logits of one unpadded row with a shadow block: ids (L,) long, shadow: list of S canvas
    columns -> (L + S, V) float64; rows L.. are the shadow queries, in the order given."""
    L, S = len(ids), len(shadow)
    tokens = torch.cat([ids, torch.full((S,), mask_id, dtype=torch.long)])
    pos = torch.cat([torch.arange(L), torch.tensor(shadow, dtype=torch.long)])
    allowed = torch.zeros(L + S, L + S, dtype=torch.bool)
    allowed[:L, :L] = True
    allowed[L:, L:] = True
    for k, col in enumerate(shadow):
        allowed[L + k, :L] = True
        allowed[L + k, col] = False
    x = W.emb[tokens]
    rep = W.H // W.Hkv
    for lw in W.layers:
        h = _rms(x, lw["n1"], W.eps)
        q = _rope(_lin(h, lw["wq"], lw["bq"]).view(L + S, W.H, W.D), pos, W)
        k = _rope(_lin(h, lw["wk"], lw["bk"]).view(L + S, W.Hkv, W.D), pos, W)
        v = _lin(h, lw["wv"], lw["bv"]).view(L + S, W.Hkv, W.D)
        out = torch.empty(L + S, W.H, W.D, dtype=torch.float64)
        for hh in range(W.H):
            sc = (q[:, hh] @ k[:, hh // rep].T) / math.sqrt(W.D)
            sc = sc.masked_fill(~allowed, float("-inf"))
            out[:, hh] = torch.softmax(sc, dim=-1) @ v[:, hh // rep]
        x = x + out.reshape(L + S, W.H * W.D) @ lw["wo"].T
        h2 = _rms(x, lw["n2"], W.eps)
        x = x + (torch.nn.functional.silu(h2 @ lw["wg"].T) * (h2 @ lw["wu"].T)) @ lw["wd"].T
    return _rms(x, W.nf, W.eps) @ W.head.T


def wino_generate(W, prompt, *, mask_id, gen_length, block_length, tau_in=0.7, tau_out=0.9,
                  cap_ratio=0.7, cap_min=5, cap_max=20):
    """One row, T = 0. Returns (generated ids, forwards, number of re-masks)."""
    P, G = len(prompt), gen_length
    x = torch.tensor(list(prompt) + [mask_id] * G, dtype=torch.long)
    forwards = remasks = 0
    for b in range(G // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        last = 30
        while any(int(x[p]) == mask_id for p in range(lo, hi)):
            logits = shadow_forward(W, x, list(range(lo, hi)), mask_id)
            logits[:, mask_id] = float("-inf")
            probs = torch.softmax(logits, dim=-1)
            forwards += 1
            masked = [p for p in range(lo, hi) if int(x[p]) == mask_id]
            cand = {p: int(probs[p].argmax()) for p in masked}
            conf = {p: float(probs[p, cand[p]]) for p in masked}
            cap = min(max(int(len(masked) * cap_ratio), cap_min), cap_max)
            above = [p for p in masked if conf[p] > tau_in]
            if len(above) > cap:
                accept = sorted(above, key=lambda p: -conf[p])[:cap]
            elif above:
                accept = above
            else:
                accept = [max(masked, key=lambda p: conf[p])]
            # narrow out: block tokens decoded before this forward, read at their shadow query
            shadow_p = {p: float(probs[P + G + (p - lo), int(x[p])])
                        for p in range(lo, hi) if int(x[p]) != mask_id}
            out = []
            if len(accept) > 1:
                low = [p for p, v in shadow_p.items() if v < tau_out]
                out = sorted(low, key=lambda p: shadow_p[p])[:last - 1] if len(low) >= last else low
            for p in accept:
                x[p] = cand[p]
            for p in out:
                x[p] = mask_id
            remasks += len(out)
            last = len(accept)
    return x[P:].tolist(), forwards, remasks
