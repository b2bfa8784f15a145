"""Elastic-Cache (VILA-Lab/Elastic-Cache ``llada/generate.py`` ``generate_with_elastic_cache`` and
the attention of ``llada/model/modeling_llada.py``; the Dream port ``dream/model/
generation_utils_elastic.py`` ``_sample`` with ``dream/model/modeling_dream.py``), re-derived as a
plain batch-1 loop with an explicit per-layer forward over the model's float64 weights. It shares
no code with the elastic_cache plugin or with dllm_decode's executors.

Per layer the loop keeps every position's input hidden state, query, key and value (the code's
``x_cache`` / ``q_cache`` / ``k_cache`` / ``v_cache``) and the layer's most-attended tokens
(``track_token``). The first forward runs the whole canvas. Each later one feeds the tracked
tokens, the positions decoded by the previous step and the window's queries (the first
``window_length`` masks, or every mask without block caching; on Dream the positions before
them, whose logits predict them), writes their hidden states, queries and K/V in place, and
attends over the caches; at each layer until one triggers, the tracked tokens' attention from
their cached queries over the keys before the layer's writes is compared with their attention
now (``F.cosine_similarity(..., dim=1)`` across heads, averaged), and below ``gamma`` every
layer after it runs the whole canvas from the cached inputs. The threshold rule decodes the
window; after the first EOS only masks at or before it are decoded.

Mirrored engine rules: the mask token's logit is ``-inf``; ``eos_ids`` are the recipe's EOS ids.
The code stops when no mask is left before its EOS and leaves the later masks in place; the
engine's ``eos.stop`` fills them with that EOS, which ``fill_after_eos`` does to the result.
"""

import math

import torch
import torch.nn.functional as F

from reference_forward import _lin, _rms, _rope, weights


class _Caches:
    def __init__(self, W, N):
        n = len(W.layers)
        self.h = [torch.zeros(N, W.d, dtype=torch.float64) for _ in range(n)]
        self.q = [torch.zeros(N, W.H, W.D, dtype=torch.float64) for _ in range(n)]
        self.k = [torch.zeros(N, W.Hkv, W.D, dtype=torch.float64) for _ in range(n)]
        self.v = [torch.zeros(N, W.Hkv, W.D, dtype=torch.float64) for _ in range(n)]
        self.track = [[] for _ in range(n)]


def _probs(q, K, W):
    """Attention probabilities (H, n, N) of queries q (n, H, D) over keys K (N, Hkv, D)."""
    rep = W.H // W.Hkv
    out = []
    for h in range(W.H):
        out.append(torch.softmax((q[:, h] @ K[:, h // rep].T) / math.sqrt(W.D), dim=-1))
    return torch.stack(out)


def _forward(W, ids, C, query, rows, masked, start, gamma, track_num):
    """One forward. query: canvas positions fed (ordered: tracked, decoded, window rows);
    rows: the window's query rows; masked: the masks of this forward. Returns raw logits at
    `rows` and the layer from which everything was recomputed."""
    N = ids.shape[0]
    pos = torch.arange(N)
    x = W.emb[ids[query]]
    cur = list(query)                                   # positions x holds
    track = _track_positions(C)                         # the previous forward's tracked tokens
    for li, lw in enumerate(W.layers):
        if li > start:
            C.h[li] = x.clone()
        else:
            C.h[li][query] = x
            if li == start:
                x, cur = C.h[li].clone(), list(range(N))
        hN = _rms(x, lw["n1"], W.eps)
        q = _rope(_lin(hN, lw["wq"], lw["bq"]).view(len(cur), W.H, W.D), pos[cur], W)
        k = _rope(_lin(hN, lw["wk"], lw["bk"]).view(len(cur), W.Hkv, W.D), pos[cur], W)
        v = _lin(hN, lw["wv"], lw["bv"]).view(len(cur), W.Hkv, W.D)
        testing = li < start
        if li >= start:
            C.q[li], C.k[li], C.v[li] = q.clone(), k.clone(), v.clone()
        else:
            past_k = C.k[li].clone()
            past_q = C.q[li][track].clone()
            C.k[li][query], C.v[li][query], C.q[li][query] = k, v, q
        P = _probs(q, C.k[li], W)                                          # (H, n, N)
        rep = W.H // W.Hkv
        out = torch.stack([P[h] @ C.v[li][:, h // rep] for h in range(W.H)], dim=1)   # (n, H, D)
        att = out.reshape(len(cur), W.H * W.D) @ lw["wo"].T
        slot = {p: j for j, p in enumerate(cur)}
        mw = P[:, [slot[r] for r in rows]]                                 # (H, w, N)
        if testing and track:
            before = _probs(past_q, past_k, W)                             # (H, t, N)
            after = P[:, [slot[t] for t in track]]
            sim = F.cosine_similarity(before[None], after[None], dim=1).mean()
            if sim < gamma:
                start = li + 1
        mass = mw.sum(dim=(0, 1))
        mass[masked] = 0.0
        # the code's topk; its ties (the zeroed masks, tracked when fewer than track_num others
        # are left) in column order, as the plugin breaks them
        C.track[li] = sorted(range(N), key=lambda j: -float(mass[j]))[:track_num]
        x = x + att
        h2 = _rms(x, lw["n2"], W.eps)
        x = x + (F.silu(h2 @ lw["wg"].T) * (h2 @ lw["wu"].T)) @ lw["wd"].T
    slot = {p: j for j, p in enumerate(cur)}
    return _rms(x[[slot[r] for r in rows]], W.nf, W.eps) @ W.head.T, start


def _track_positions(C):
    seen = []
    for layer in C.track:
        for t in layer:
            if t not in seen:
                seen.append(t)
    return seen


def elastic_generate(model, prompt, *, gen_length, window_length=16, threshold=0.9, gamma=0.9, track_num=1,
                     block_caching=True, eos_ids=(), banned=()):
    """One prompt -> (generated ids, forwards, layers recomputed in full). ``banned``: ids whose
    logits are -inf besides the mask's (the engine's eos.ban)."""
    W = weights(model)
    mask_id, shift = model.spec.mask_token_id, model.spec.shift_logits
    P = len(prompt)
    x = torch.tensor(list(prompt) + [mask_id] * gen_length)
    N, n_layers = x.shape[0], len(W.layers)
    C = _Caches(W, N)
    masked = list(range(P, N))
    new = list(range(P))
    eos_seen, nfe, recomputed = False, 0, 0
    while True:
        qm = masked[:window_length] if block_caching else list(masked)
        rows = [p - 1 for p in qm] if shift else qm
        if nfe == 0:
            query, start = list(range(N)), -1
        else:
            query = list(dict.fromkeys(_track_positions(C) + new + rows))    # the code's cat, deduplicated
            start = n_layers
        raw, start = _forward(W, x, C, query, rows, masked, start, gamma, track_num)
        recomputed += n_layers - max(start, 0)
        if not block_caching:
            qm, raw = qm[:window_length], raw[:window_length]
        logits = raw.clone()
        logits[:, [mask_id, *banned]] = float("-inf")
        p, x0 = F.softmax(logits.to(torch.float64), dim=-1).max(dim=-1)
        keep = p >= min(threshold, float(p.max()))
        new = [qm[j] for j in range(len(qm)) if keep[j]]
        for j in range(len(qm)):
            if keep[j]:
                x[qm[j]] = x0[j]
        masked = [m for m in masked if m not in new]
        nfe += 1
        eos = [q for q in new if int(x[q]) in eos_ids]
        if not eos_seen and eos:
            eos_seen = True
            masked = [m for m in masked if m <= min(eos)]
        if not masked:
            break
    return fill_after_eos(x[P:].tolist(), mask_id, eos_ids), nfe, recomputed


def fill_after_eos(tokens, mask_id, eos_ids):
    """The engine's eos.stop: the masks after the first EOS take that EOS."""
    first = next((j for j, t in enumerate(tokens) if t in eos_ids), None)
    if first is None:
        return tokens
    return [tokens[first] if (j > first and t == mask_id) else t for j, t in enumerate(tokens)]
