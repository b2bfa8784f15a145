"""KLASS (shkim0116/KLASS, ``src/model/llada_klass.py`` ``stable_confident_decode`` and
``src/model/dream_klass.py`` ``_sample`` with ``alg="klass"``) re-derived plainly, one prompt at a
time (batch 1, as the released evaluations run), at T = 0, sharing no code with the plugin.

Mirrored rules of the engine: the mask token is never a candidate (its logit is -inf). One
documented deviation: the released loops stop after ``steps`` forwards (LLaDA: per block) even
with masks left, which the official setting ``steps == gen_length`` never reaches; here a block
(LLaDA) or the canvas (Dream) is decoded to the end, the LLaDA fallback committing one token per
forward once its schedule is used up.
"""

import torch

EPS = 1e-12


def _track(p, p_prev, history):
    """KL of every position against its previous distribution, appended to its history."""
    kl = (p * (torch.log(p + EPS) - torch.log(p_prev + EPS))).sum(dim=-1)     # (L,)
    history = [h[1:] + [float(k)] for h, k in zip(history, kl)]
    return kl, history


def _pick(ready, conf, kl, strategy):
    """The positions the ready set commits under ``unmask_strategy`` (not ``random``)."""
    if len(ready) <= 1 or strategy == "all":
        return ready
    if strategy == "max_conf":
        values = [float(conf[i]) for i in ready]
        return [ready[values.index(max(values))]]          # first maximum
    values = [float(kl[i]) for i in ready]
    return [ready[values.index(min(values))]]              # first minimum


def klass_llada_generate(model, prompt, *, mask_id, gen_length, block_length, steps, conf_threshold=0.9,
                         kl_threshold=0.01, history_length=2, unmask_strategy="all"):
    """LLaDA's KLASS loop -> (generated ids, forwards)."""
    P = len(prompt)
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    L = x.shape[1]
    per_block = steps // (gen_length // block_length)
    p_prev, history, nfe = None, [[0.0] * history_length for _ in range(L)], 0
    for lo in range(P, P + gen_length, block_length):
        hi = lo + block_length
        n = int((x[0, lo:hi] == mask_id).sum())
        schedule = [n // per_block + (1 if s < n % per_block else 0) for s in range(per_block)]
        step = 0
        while (x[0, lo:hi] == mask_id).any():
            logits = model(x)[0].clone()
            nfe += 1
            logits[:, mask_id] = float("-inf")
            p = torch.softmax(logits.to(torch.float64), dim=-1)          # (L, V)
            p_prev = torch.zeros_like(p) if p_prev is None else p_prev
            x0 = p.argmax(dim=-1)
            conf = p.gather(-1, x0[:, None])[:, 0]
            kl, history = _track(p, p_prev, history)
            p_prev = p
            masked = [i for i in range(lo, hi) if x[0, i] == mask_id]
            ready = []
            if step >= history_length - 1:
                ready = [i for i in masked if all(h < kl_threshold for h in history[i])
                         and conf[i] > conf_threshold]
            chosen = _pick(ready, conf, kl, unmask_strategy)
            if not chosen:
                k = max(schedule[step] if step < per_block else 1, 1)
                chosen = sorted(masked, key=lambda i: (-float(conf[i]), i))[:k]
            for i in chosen:
                x[0, i] = x0[i]
            step += 1
    return x[0, P:].tolist(), nfe


def klass_dream_generate(raw_logits, prompt, *, mask_id, gen_length, conf_threshold=0.9, kl_threshold=0.01,
                         history_length=2, unmask_strategy="all", top_p=None, top_k=None, shift=True):
    """Dream's KLASS loop -> (generated ids, forwards). ``raw_logits(x)`` returns the model's own
    logits; with ``shift`` (Dream checkpoints) they are next-token logits, shifted here."""
    P = len(prompt)
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    L = x.shape[1]
    p_prev, history, nfe = None, [[0.0] * history_length for _ in range(L)], 0
    while (x == mask_id).any():
        logits = raw_logits(x)[0].clone()
        nfe += 1
        if shift:
            logits = torch.cat([logits[:1], logits[:-1]], dim=0)
        logits[:, mask_id] = float("-inf")
        x0 = torch.softmax(logits, dim=-1).argmax(dim=-1)               # the model-dtype argmax
        p = torch.softmax(logits.to(torch.float64), dim=-1)
        p_prev = torch.zeros_like(p) if p_prev is None else p_prev
        conf = p.gather(-1, x0[:, None])[:, 0]
        kl, history = _track(p, p_prev, history)
        p_prev = p
        masked = [i for i in range(P, L) if x[0, i] == mask_id]
        ready = [i for i in masked if max(history[i]) < kl_threshold and conf[i] >= conf_threshold]
        chosen = _pick(ready, conf, kl, unmask_strategy)
        if not chosen:
            rank = {i: _sample_confidence(logits[i], top_p, top_k) for i in masked}
            best = max(rank.values())
            chosen = [min(i for i in masked if rank[i] == best)]
        for i in chosen:
            x[0, i] = x0[i]
    return x[0, P:].tolist(), nfe


def _sample_confidence(logits, top_p, top_k):
    """Dream's ``sample_tokens`` at T = 0 for one position: the top probability after the filters."""
    logits = logits.clone()
    if top_p is not None and top_p < 1:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], dim=-1)
        total = 0.0
        for rank, idx in enumerate(order.tolist()):
            if rank > 0 and total > top_p:                  # the token crossing top_p stays
                logits[idx] = torch.finfo(logits.dtype).min
            total += float(probs[rank])
    if top_k is not None:
        kth = sorted(logits.tolist(), reverse=True)[min(top_k, len(logits)) - 1]
        logits[logits < kth] = torch.finfo(logits.dtype).min
    return float(torch.softmax(logits, dim=-1).max())

