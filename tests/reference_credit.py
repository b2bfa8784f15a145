"""dInfer's credit decoding (inclusionAI/dInfer ``python/dinfer/decoding/parallel_strategy.py``,
``CreditThresholdParallelDecoder`` with ``get_transfer_index_threshold``, driven block by block as
``generate_uniform.py``'s ``BlockWiseDiffusionLLM`` does without a cache) re-derived plainly, one
prompt at a time, at T = 0, sharing no code with the plugin.

Blocks start at the prompt end (dInfer's benchmarks align them to multiples of the block length,
``start_block_align``; that is a choice of span, not of the rule). Forwards are counted while the
block has a mask: dInfer's runner may unroll a few forwards past the block's last commit, which
change nothing. Mirrored engine rule: the mask token is never a candidate (its logit is -inf).
"""

import torch


def credit_generate(model, prompt, *, mask_id, gen_length, block_length, threshold=0.9, credit_alpha=0.7,
                    boost_gamma=0.2, decay_beta=0.8, use_float64=False):
    """-> (generated ids, forwards)."""
    P = len(prompt)
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    nfe = 0
    for lo in range(P, P + gen_length, block_length):
        hi = lo + block_length
        credit = None                                   # a fresh matrix for every block
        while (x[0, lo:hi] == mask_id).any():
            logits = model(x)[0, lo:hi].clone()         # (block, V)
            nfe += 1
            logits[:, mask_id] = float("-inf")
            masked = [bool(t == mask_id) for t in x[0, lo:hi]]
            if credit is None:
                credit = torch.zeros(logits.shape, dtype=torch.float32)
            else:
                credit = credit * decay_beta
            probs = torch.softmax(logits.to(torch.float32), dim=-1)
            for j in range(hi - lo):
                if masked[j]:
                    top = int(probs[j].argmax())
                    # the power and the log in float64, rounded to float32 (the plugin's choice,
                    # documented: float32 kernels round differently at different tensor offsets)
                    credit[j, top] += torch.tensor(float(probs[j, top]) ** boost_gamma, dtype=torch.float32)
            fused = logits + credit_alpha * torch.log((credit + 1).to(torch.float64)).to(torch.float32)
            x0 = fused.argmax(dim=-1)
            p = torch.softmax(fused.to(torch.float64 if use_float64 else torch.float32), dim=-1)
            conf = torch.stack([p[j, x0[j]] for j in range(hi - lo)])
            best = max(conf[j] for j in range(hi - lo) if masked[j])
            cut = torch.clamp(best - 1e-5, min=-1000, max=threshold)
            for j in range(hi - lo):
                if masked[j] and conf[j] >= cut:
                    x[0, lo + j] = x0[j]
    return x[0, P:].tolist(), nfe
