"""LLaDA's ``generate`` (ML-GSAI/LLaDA ``generate.py``) re-derived, written plainly (per-row loops and
all) so that it shares no code with the plugins it checks.

One documented rule of the engine is mirrored: the mask token is never a candidate (its logit
is set to -inf), which the original only gets implicitly from a trained model.
"""

import torch
import torch.nn.functional as F


def prompt_canvas(prompts, mask_id, pad_id, gen_length):
    """Left-padded prompts followed by gen_length masks -> x (B, P+G), attention (B, P+G), P."""
    B, P, G = len(prompts), max(len(p) for p in prompts), gen_length
    x = torch.full((B, P + G), mask_id, dtype=torch.long)
    attn = torch.zeros((B, P + G), dtype=torch.bool)
    for i, p in enumerate(prompts):
        x[i, : P - len(p)] = pad_id
        x[i, P - len(p): P] = torch.tensor(p)
        attn[i, P - len(p):] = True
    return x, attn, P


def llada_generate(model, prompts, *, mask_id, pad_id, steps, gen_length, block_length,
                   cfg_scale=0.0, remasking="low_confidence", generator=None):
    B, G = len(prompts), gen_length
    x, attn, P = prompt_canvas(prompts, mask_id, pad_id, G)
    prompt_index = x != mask_id
    assert G % block_length == 0
    num_blocks = G // block_length
    assert steps % num_blocks == 0
    per_block = steps // num_blocks
    for b in range(num_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n = (x[:, lo:hi] == mask_id).sum(dim=1)
        schedule = []
        for j in range(B):
            base, rem = int(n[j]) // per_block, int(n[j]) % per_block
            schedule.append([base + (1 if s < rem else 0) for s in range(per_block)])
        for s in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = model(torch.cat([x, un_x]), attention_mask=torch.cat([attn, attn]))
                cond, uncond = both[:B], both[B:]
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, attention_mask=attn)
            logits = logits.clone()
            logits[..., mask_id] = float("-inf")
            x0 = logits.argmax(dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
            else:
                x0_p = torch.rand(x0.shape, dtype=torch.float64, generator=generator)
            x0_p[:, hi:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            for j in range(B):
                _, sel = torch.topk(confidence[j], k=schedule[j][s])
                x[j, sel] = x0[j, sel]
    return x[:, P:]
