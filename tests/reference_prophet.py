"""Prophet's early commit-all (arXiv 2508.19982, pixeli99/Prophet ``generate_earlyexit.py``)
over LLaDA's block decoding, re-derived for one row at a time with plain loops; it shares no
code with the plugins. The answer window is given as an offset from the start of the generated
region (the reference's forced-token offset).

Mirrored engine rule: the mask token is never a candidate (its logit is -inf), also in the gap.
"""

import torch


def prophet_generate(model, prompt, *, mask_id, steps, gen_length, block_length, answer_start=0,
                     answer_length=5, thresholds=(7.5, 5.0, 2.5), bounds=(0.33, 0.67)):
    """One row, T = 0, low-confidence order. Returns (generated ids, forwards, exit step or None)."""
    P, G = len(prompt), gen_length
    x = torch.tensor([list(prompt) + [mask_id] * G], dtype=torch.long)
    per_block = steps // (G // block_length)
    step = 0
    for b in range(G // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n = int((x[0, lo:hi] == mask_id).sum())
        counts = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        for i in range(per_block):
            step += 1
            logits = model(x, attention_mask=torch.ones_like(x, dtype=torch.bool))[0].clone()
            logits[:, mask_id] = float("-inf")
            x0 = logits.argmax(-1)
            window = range(P + answer_start, min(P + G, P + answer_start + answer_length))
            gaps = []
            for pos in window:
                top = torch.topk(logits[pos].to(torch.float64), 2).values
                gaps.append(float(top[0] - top[1]))
            if gaps:
                progress = step / steps
                thr = thresholds[0] if progress < bounds[0] else thresholds[1] if progress < bounds[1] else thresholds[2]
                if sum(gaps) / len(gaps) >= thr:
                    left = x[0] == mask_id
                    x[0, left] = x0[left]
                    return x[0, P:].tolist(), step, step
            conf = torch.softmax(logits.to(torch.float64), -1).gather(-1, x0[:, None])[:, 0]
            conf[hi:] = float("-inf")
            conf = torch.where(x[0] == mask_id, conf, torch.tensor(float("-inf"), dtype=torch.float64))
            for j in torch.topk(conf, counts[i]).indices.tolist():
                x[0, j] = x0[j]
    return x[0, P:].tolist(), step, None
