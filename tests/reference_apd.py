"""APD's ``apd_sample`` (danielmisrael/apd ``dream/generation_utils.py``) re-derived at T = 0, one prompt at a time: the
dLLM runs on the canvas cut at t + M; with a KV window W it recomputes [t - W - n + 1, t + M)
against the K/V earlier forwards left in its store (the model's own range-feed plan, playing
the role of the reference's ``past_key_values`` crop); the verifier recomputes the whole prefix
every step. Shares no code with the plugin. Mirrored engine rule: the mask token is never a
candidate."""

import torch

from dllm_decode.models import ComputePlan


def apd_generate(model, verifier, prompt, *, mask_id, eos_ids, gen_length, R, M=None, W=None):
    """-> (generated ids up to and including the first EOS, dLLM forwards, accepted per step)."""
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    P, L = len(prompt), len(prompt) + gen_length
    t, nfe, accepted = P, 0, []
    store, num_accept = None, 0
    while t < L:
        right = min(t + M, L) if M else L
        if W is None:
            left = 0
            logits = model(x[:, :right], plan=ComputePlan(shift=False)).clone()     # (1, right, V)
        else:
            if store is None:
                store, left = model.new_store(), 0
                plan = ComputePlan(end=right, write_kv=True, shift=False)
            else:
                left = max(t - W - num_accept + 1, 0)
                plan = ComputePlan(start=left, end=right, keys="store", key_end=right, shift=False)
            logits = model(x, plan=plan, store=store).clone()                        # (1, right - left, V)
        if model.spec.shift_logits:         # the reference shifts inside the window it fed
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., mask_id] = float("-inf")
        nfe += 1
        d_logits = logits[0, t - left:right - left].to(torch.float64)
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
        num_accept = n
        accepted.append(n)
        if any(int(v) in eos_ids for v in x[0, P:]):
            break
    out = x[0, P:].tolist()
    cut = next((i for i, v in enumerate(out) if v in eos_ids), len(out) - 1)
    return out[:cut + 1], nfe, accepted
