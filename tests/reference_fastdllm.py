"""Fast-dLLM's threshold and factor decoding (NVlabs/Fast-dLLM ``llada/generate.py``,
``get_transfer_index`` / ``get_transfer_index_dynamic``) re-derived plainly, per
row and per rank, sharing no code with the plugin it checks. Same engine rule mirrored as in
reference_llada: the mask token is never a candidate."""

import torch
import torch.nn.functional as F

from reference_llada import prompt_canvas


def _commit_count_factor(sorted_conf, factor):
    """The reference's loop: first failing rank, +1 when it is the first or the last."""
    n = len(sorted_conf)
    threshs = [1 - factor / (r + 1) for r in range(1, n + 1)]
    threshs[0] = -1
    top = 0
    for top in range(n):
        if sorted_conf[top] < threshs[top]:
            break
    if top == 0 or top == n - 1:
        top += 1
    return top


def fastdllm_generate(model, prompts, *, mask_id, pad_id, gen_length, block_length, threshold=None,
                      factor=None):
    B, G = len(prompts), gen_length
    x, attn, P = prompt_canvas(prompts, mask_id, pad_id, G)
    nfe = 0
    for b in range(G // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        while (x[:, lo:hi] == mask_id).any():
            logits = model(x, attention_mask=attn).clone()
            nfe += 1
            logits[..., mask_id] = float("-inf")
            x0 = logits.argmax(dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
            mask_index = x == mask_id
            mask_index[:, hi:] = False
            conf = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            for j in range(B):
                n = int(mask_index[j].sum())
                if n == 0:
                    continue
                if factor is not None:
                    c = sorted(conf[j][mask_index[j]].tolist(), reverse=True)
                    _, sel = torch.topk(conf[j], k=_commit_count_factor(c, factor))
                    x[j, sel] = x0[j, sel]
                    continue
                _, sel = torch.topk(conf[j], k=n)
                keep = [int(sel[0])] + [int(s) for s in sel[1:] if conf[j, s] >= threshold]
                x[j, keep] = x0[j, keep]
    return x[:, P:], nfe
