"""DAEDAL's ``generate`` (``Li-Jinsong/DAEDAL/models/LLaDA_DAEDAL.py``) re-derived plainly for one
prompt at a time (the code's loop at batch size 1), at T = 0, sharing no code with the plugin.

Stage 1 grows the canvas by ``expansion_factor`` masks while the EOS confidence (the EOS
probability at the last ``eos_check_tokens`` positions predicted EOS, summed and divided by
``eos_check_tokens``) is below ``eos_confidence_threshold``, then appends ``eos_check_tokens / 2``
EOS tokens. Stage 2 walks blocks of ``block_length`` from the prompt end: it writes every mask of
the block above ``high_conf_threshold`` (or the most confident one), and while the EOS confidence
is below ``expand_eos_confidence_threshold`` turns the least confident remaining mask below
``low_conf_threshold`` into ``expansion_factor`` masks.

Mirrored engine rule: the mask token is never a candidate (its logit is -inf). Mirrored
deviation of the plugin (documented there): near the maximum length the insertion is shortened
to fit, where the code inserts in full and truncates the row's tail; and the maximum is capped by
the model's ``max_length`` when given.
"""

import torch


def daedal_generate(model, prompt, *, mask_id, eos_id, initial_gen_length, block_length, max_gen_length=2048,
                    high_conf_threshold=0.9, low_conf_threshold=0.1, expansion_factor=8,
                    eos_confidence_threshold=0.5, expand_eos_confidence_threshold=0.9, eos_check_tokens=32,
                    max_length=None):
    """-> (generated ids, forwards)."""
    P = len(prompt)
    cap = max_gen_length if max_length is None else min(max_gen_length, max_length - P)
    x = list(prompt) + [mask_id] * initial_gen_length
    g = initial_gen_length
    nfe = 0

    def forward():
        nonlocal nfe
        nfe += 1
        logits = model(torch.tensor([x]))[0].clone()
        logits[:, mask_id] = float("-inf")
        return logits

    def eos_confidence(logits):
        probs = torch.softmax(logits, dim=-1)
        found = []
        for pos in range(P + g - 1, P - 1, -1):
            if len(found) >= eos_check_tokens:
                break
            if int(logits[pos].argmax()) == eos_id:
                found.append(float(probs[pos, eos_id]))
        return sum(found) / eos_check_tokens

    while True:                                             # stage 1
        if eos_confidence(forward()) < eos_confidence_threshold and g < cap:
            new = min(g + expansion_factor, cap)
            x += [mask_id] * (new - g)
            g = new
        else:
            break
    new = min(g + eos_check_tokens // 2, cap)
    x += [eos_id] * (new - g)
    g = new

    start = P                                               # stage 2
    while start < P + g:
        logits = forward()
        pred = logits.argmax(dim=-1)
        probs = torch.softmax(logits, dim=-1)
        conf = [float(probs[i, pred[i]]) for i in range(len(x))]
        eos = eos_confidence(logits)
        masked = [i for i in range(start, min(start + block_length, P + g)) if x[i] == mask_id]
        fill = [i for i in masked if conf[i] > high_conf_threshold]
        if not fill:
            fill = [min(masked, key=lambda i: (-conf[i], i))]
        point = None
        if eos < expand_eos_confidence_threshold and g < cap:
            low = [i for i in masked if conf[i] < low_conf_threshold and i not in fill]
            if low:
                point = min(low, key=lambda i: (conf[i], i))
        for i in fill:
            x[i] = int(pred[i])
        if point is not None:
            extra = min(expansion_factor - 1, cap - g)      # the plugin's shortened insertion
            x = x[:point] + [mask_id] * extra + x[point:]
            g += extra
        while start < P + g and mask_id not in x[start:min(start + block_length, P + g)]:
            start += block_length
    return x[P:P + g], nfe
