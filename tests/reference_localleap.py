"""LocalLeap's LLaDA loop (friedrichor/LocalLeap ``llada/generate.py``: ``generate`` with
``threshold`` and ``relaxed_threshold`` set, and ``get_transfer_index``) re-derived plainly, one
prompt at a time, at T = 0, sharing no code with the plugin.

Blocks of ``block_length`` from the prompt end are decoded in order, each until it holds no
mask (``steps`` plays no part once a threshold is given). Every forward: the candidate is the
argmax, its confidence the float64 softmax probability; the masked positions up to the block end
are ranked; the best is always written; the others need ``threshold``, or ``relaxed_threshold``
when some masked position reaches ``threshold`` (an anchor) within ``radius`` columns of them.

``shift``: the model's own logits are next-token ones (Dream checkpoints) and are shifted right
by one before use, as Dream's samplers do. Mirrored engine rule: the mask token is never a
candidate (its logit is -inf).
"""

import torch


def localleap_generate(raw_logits, prompt, *, mask_id, gen_length, block_length, threshold=0.9,
                       relaxed_threshold=0.75, radius=4, shift=False):
    """-> (generated ids, forwards). ``raw_logits(x)`` returns the model's logits (1, L, V)."""
    P = len(prompt)
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    L = x.shape[1]
    nfe = 0
    for lo in range(P, P + gen_length, block_length):
        hi = lo + block_length
        while (x[0, lo:hi] == mask_id).any():
            logits = raw_logits(x)[0].clone()                    # (L, V)
            nfe += 1
            if shift:
                logits = torch.cat([logits[:1], logits[:-1]], dim=0)
            logits[:, mask_id] = float("-inf")
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            masked = [i for i in range(hi) if x[0, i] == mask_id]
            conf = {i: float(p[i, x0[i]]) for i in masked}
            ranked = sorted(masked, key=lambda i: (-conf[i], i))
            neighbours = set()
            if relaxed_threshold is not None:
                for a in masked:
                    if conf[a] >= threshold:
                        neighbours.update(range(max(0, a - radius), min(L, a + radius + 1)))
            chosen = [ranked[0]]
            for i in ranked[1:]:
                need = relaxed_threshold if i in neighbours else threshold
                if conf[i] >= need:
                    chosen.append(i)
            for i in chosen:
                x[0, i] = x0[i]
    return x[0, P:].tolist(), nfe
