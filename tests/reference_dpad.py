"""DPad's suffix dropout (Crys-Chen/DPad ``llada/generate_dropout.py``: ``suffix_dropout``,
``generate``, ``generate_with_prefix_cache``, ``generate_with_dual_cache``; ``llada/sampler.py``;
the Dream port ``dream/model/generation_utils_block.py``: ``_sample``, ``_sample_cache``),
re-derived as a plain batch-1 loop over the naive per-row forward of reference_forward.py. It
shares no code with the dpad plugin or with dllm_decode's plan executor.

Per block: draw the kept suffix once, feed ``[0, block_end)`` plus the kept suffix with their own
positions (attention among them), and decode the block with LLaDA's schedule or the threshold
rule (``get_transfer_index``), or Dream's ``confidence_threshold``. With ``kv_cache`` the
block's first forward fills a fresh K/V bank over the kept positions and the later ones feed the
block (+ kept suffix for ``prefix``) against it; Dream's cached sampler commits only the
block's first position at that forward.

Randomness: the code samples with torch's global RNG; the engine gives every row its own keyed
uniforms (``dllm_decode.noise``). The reference takes the uniform of canvas position p from
that same documented source, ``RowNoise.for_rows([prompt], [seed]).uniform(step, p - P,
"dpad.keep")`` at the forward index ``step`` where the block starts, and applies the code's
samplers to them (``uniform``: the ``preserved`` smallest among the first ``window``, i.e. a
uniform subset as the code's ``randperm``). The mask token's logit is ``-inf`` (the engine's
rule), and every forward is counted (the Dream code does not count its refresh forwards).
"""

import math

import torch
import torch.nn.functional as F

from dllm_decode.noise import RowNoise
from reference_forward import align, naive_row, new_bank, weights


def _pdf(window, sigma, scale):
    """The code's GaussianSampler.pdf over the window, float32."""
    x = torch.linspace(0.0, sigma, window)
    return scale * torch.exp(-0.5 * ((x - 0.0) / 1) ** 2) / (1 * torch.sqrt(torch.tensor(2 * math.pi)))


def _kept_suffix(u, block_end, L, sampler, window, sigma, scale, preserved):
    """Suffix positions kept for the block ending at block_end; u: uniforms by canvas position."""
    src = list(range(block_end, L))
    if sampler == "gaussian":
        pdf = _pdf(window, sigma, scale).tolist() + [0.0] * max(0, len(src) - window)
        return [p for d, p in enumerate(src) if float(u[p]) < pdf[d]]
    if preserved >= len(src):
        return src
    first = src[:min(len(src), window)]
    return sorted(sorted(first, key=lambda p: float(u[p]))[:preserved])


def _commit_llada(x, logits, fed, lo, hi, mask_id, n_transfer, threshold):
    logits = logits.clone()
    logits[:, mask_id] = float("-inf")
    x0 = logits.argmax(dim=-1)
    conf = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[:, None])[:, 0]
    slot = {p: j for j, p in enumerate(fed)}
    cand = [p for p in range(lo, hi) if int(x[p]) == mask_id]
    ranked = sorted(cand, key=lambda p: (-float(conf[slot[p]]), p))
    if threshold is None:
        chosen = ranked[:n_transfer]
    else:
        chosen = ranked[:1] + [p for p in ranked[1:] if float(conf[slot[p]]) >= threshold]
    for p in chosen:
        x[p] = x0[slot[p]]


def _commit_dream(x, logits, fed, lo, hi, mask_id, threshold, only_first=False):
    logits = logits.clone()
    logits[:, mask_id] = float("-inf")
    conf, x0 = torch.softmax(logits, dim=-1).max(dim=-1)
    slot = {p: j for j, p in enumerate(fed)}
    if only_first:
        x[lo] = x0[slot[lo]]
        return
    cand = [p for p in range(lo, hi) if int(x[p]) == mask_id]
    ranked = sorted(cand, key=lambda p: (-float(conf[slot[p]]), p))
    for p in ranked[:1] + [p for p in ranked[1:] if float(conf[slot[p]]) >= threshold]:
        x[p] = x0[slot[p]]


def dpad_generate(model, prompt, *, gen_length, block_length, steps=None, threshold=None, sampler="gaussian",
                  window=256, sigma=4.0, scale=2.0, preserved=0, kv_cache="none", seed=0, sampler_family=None):
    """One prompt -> (generated ids, forwards). ``sampler_family`` 'llada' (the LLaDA loop:
    schedule when threshold is None, else the threshold rule) or 'dream' (confidence_threshold
    with the Dream loop; its cached variant commits the block's first position at refresh)."""
    W = weights(model)
    mask_id = model.spec.mask_token_id
    shift = model.spec.shift_logits
    family = sampler_family or model.spec.family
    noise = RowNoise.for_rows([prompt], [seed])
    P, G = len(prompt), gen_length
    x = torch.tensor(list(prompt) + [mask_id] * G)
    L = x.shape[0]
    cols = torch.arange(L)[None, :]
    ones = torch.ones(L, dtype=torch.bool)
    n_blocks = G // block_length
    per_block = None if steps is None else steps // n_blocks
    nfe = 0

    def decode(raw, fed, lo, hi, i, only_first=False):
        logits = align(raw, fed, shift)
        if family == "dream":
            _commit_dream(x, logits, fed, lo, hi, mask_id, threshold, only_first)
        else:
            n = None
            if threshold is None:
                n0 = schedule_masks
                n = n0 // per_block + (1 if i < n0 % per_block else 0)
            _commit_llada(x, logits, fed, lo, hi, mask_id, n, threshold)

    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        schedule_masks = int((x[lo:hi] == mask_id).sum())
        u = noise.uniform(nfe, cols - P, "dpad.keep")[0]                   # (L,) by canvas position
        kept = _kept_suffix(u, hi, L, sampler, window, sigma, scale, preserved)
        pruned = list(range(hi)) + kept
        i = 0
        if kv_cache == "none":
            while True:
                decode(naive_row(W, x, ones, pruned), pruned, lo, hi, i)
                nfe += 1
                i += 1
                if not (x[lo:hi] == mask_id).any():
                    break
            continue
        bank = new_bank(W, L)
        decode(naive_row(W, x, ones, pruned, bank=bank), pruned, lo, hi, i, only_first=family == "dream")
        nfe += 1
        i += 1
        while (x[lo:hi] == mask_id).any():
            fed = list(range(lo, hi)) + (kept if kv_cache == "prefix" else [])
            decode(naive_row(W, x, ones, fed, bank=bank, keys="bank"), fed, lo, hi, i)
            nfe += 1
            i += 1
    return x[P:].tolist(), nfe
