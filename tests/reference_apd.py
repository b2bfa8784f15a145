"""APD's ``apd_sample`` re-derived from ALGORITHMS.md §6.3 at T = 0 without any cache, one prompt
at a time: the dLLM runs on the canvas cut at t + M, the verifier recomputes the whole prefix
every step. Shares no code with the plugin. Mirrored engine rule: the mask token is never a
candidate."""

import torch


def apd_generate(raw_logits, verifier, prompt, *, mask_id, eos_ids, gen_length, R, M=None, shift=False):
    """-> (generated ids up to and including the first EOS, dLLM forwards, accepted per step)."""
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    P, L = len(prompt), len(prompt) + gen_length
    t, nfe, accepted = P, 0, []
    while t < L:
        right = min(t + M, L) if M else L
        logits = raw_logits(x[:, :right]).clone()
        if shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., mask_id] = float("-inf")
        nfe += 1
        d_logits = logits[0, t:right].to(torch.float64)
        draft = d_logits.argmax(-1)
        ar_in = x[:, :right].clone()
        ar_in[0, t:right] = draft
        ar = verifier(input_ids=ar_in).logits[0, t - 1:right - 1].to(torch.float64)
        V = min(d_logits.shape[-1], ar.shape[-1])
        target = (R * d_logits[:, :V] + (1 - R) * ar[:, :V]).argmax(-1)
        n = 1
        while n < len(draft) and int(draft[n]) == int(target[n]):
            n += 1
        x[0, t:t + n] = draft[:n]
        t += n
        accepted.append(n)
        if any(int(v) in eos_ids for v in x[0, P:]):
            break
    out = x[0, P:].tolist()
    cut = next((i for i, v in enumerate(out) if v in eos_ids), len(out) - 1)
    return out[:cut + 1], nfe, accepted
