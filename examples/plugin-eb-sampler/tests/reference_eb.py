"""EB-Sampler re-derived from its description (arXiv 2505.24857; the dllm-decode spec), one
prompt at a time with plain Python loops, sharing no code with the plugin it checks.

Mirrors the engine's one documented rule: the mask token's logit is -inf (never a candidate).
Covers T = 0 without classifier-free guidance, which is what parity is checked at.
"""

import math

import torch

from dllm_decode.testing import ReferenceOutput


def _entropy(probs):
    """Shannon entropy (nats) of one distribution, summed term by term in Python."""
    return -sum(p * math.log(p) for p in probs.tolist() if p > 0.0)


def eb_reference(gamma, order="entropy"):
    """A reference function for ``dllm_decode.testing.check_parity``: (model, prompt, recipe)."""

    def generate(model, prompt, recipe):
        gen = recipe.generation
        assert gen.temperature == 0 and gen.cfg_scale == 0, "the reference is greedy, without CFG"
        mask_id = model.spec.mask_token_id
        G, block = gen.gen_length, gen.block_length or gen.gen_length
        P = len(prompt)
        x = torch.tensor([list(prompt) + [mask_id] * G])
        nfe = 0
        for b in range(G // block):
            lo, hi = P + b * block, P + (b + 1) * block
            while any(int(t) == mask_id for t in x[0, lo:hi]):
                logits = model(x, attention_mask=torch.ones_like(x, dtype=torch.bool))[0].to(torch.float64).clone()
                nfe += 1
                logits[:, mask_id] = float("-inf")
                ranked = []                       # (sort key, column, token, entropy)
                for col in range(lo, hi):
                    if int(x[0, col]) != mask_id:
                        continue
                    probs = torch.softmax(logits[col], dim=-1)
                    token = int(torch.argmax(logits[col]))
                    h = _entropy(probs)
                    key = h if order == "entropy" else -float(probs[token])
                    ranked.append((key, col, token, h))
                ranked.sort(key=lambda r: (r[0], r[1]))   # ties: the leftmost column first
                chosen, total, largest = [], 0.0, 0.0
                for _, col, token, h in ranked:
                    total, largest = total + h, max(largest, h)
                    if chosen and total - largest > gamma:
                        break
                    chosen.append((col, token))
                for col, token in chosen:
                    x[0, col] = token
        return ReferenceOutput(tokens=x[0, P:].tolist(), nfe=nfe)

    return generate
