"""SDAR's block-diffusion decoder (JetAstra/SDAR ``generate.py``, ``block_diffusion_generate``)
re-derived plainly for one prompt, sharing no code with the engine, ``dllm_decode.block_mode`` or
the ``block_kv`` cache it checks.

As the original: the canvas is ``ceil((P + gen_length) / block) * block`` positions counted from
the prompt's first token; the blocks the prompt fills are the prefill; every later block (the
first one holding the prompt's tail) is denoised with ``steps`` forwards at most, ``block //
steps`` tokens per step (the remainder on the first steps); ``low_confidence_static`` commits that
many most confident masks, ``low_confidence_dynamic`` every mask above ``threshold`` when there are
at least that many, else that many most confident; after each block, decoding stops if a stop id
is anywhere in the generated region. The model's view is what the original's KV cache gives it:
the block's logits given every earlier position (a plain forward of the canvas up to the block's
end; the model's own block-causal mask hides nothing that forward includes).

Deliberate differences, all at temperature 0 (the original always samples): tokens are the
argmax and confidence their softmax probability (the original's ``top_k=1`` would give every
token probability 1); the mask id is never a candidate (its logit is -inf), as the engine rules.
The original's ``topk`` over ``-inf`` confidences when a step's count exceeds the block's masks
(it then writes predictions over committed tokens) is refused here: callers pick schedules that
never reach it.
"""

import torch


def denoise_step(model, x, lo, hi, masked, mask_id, k, threshold=None):
    """One greedy step on the block x[0, lo:hi] given everything before it (a plain forward of the
    canvas up to the block's end): every mask above ``threshold`` when at least ``k`` are (dynamic
    rule; None: never), else the ``k`` most confident masks. Writes x in place."""
    logits = model(x[:, :hi]).double()[0, lo:hi]                            # (block, V)
    logits[:, mask_id] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    x0 = probs.argmax(dim=-1)
    conf = torch.where(masked, probs.gather(1, x0[:, None])[:, 0], torch.tensor(float("-inf")))
    if threshold is not None and int((conf > threshold).sum()) >= k:
        take = conf > threshold
    else:
        take = torch.zeros_like(masked)
        take[torch.topk(conf, k).indices] = True
    x[0, lo:hi] = torch.where(take, x0, x[0, lo:hi])


def sdar_generate(model, prompt, *, mask_id, gen_length, block, steps, strategy="low_confidence_static",
                  threshold=0.85, stop_ids=()):
    """-> (generated ids up to the last decoded position, forwards that committed something)."""
    P = len(prompt)
    n_blocks = (P + gen_length + block - 1) // block
    x = torch.full((1, n_blocks * block), mask_id, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt)
    base, rem = block // steps, block % steps
    schedule = [base + (1 if s < rem else 0) for s in range(steps)]
    decoded_to, forwards = P, 0
    for nb in range(P // block, n_blocks):
        lo, hi = nb * block, (nb + 1) * block
        for s in range(steps + 1):
            masked = x[0, lo:hi] == mask_id
            if not masked.any():
                break
            k = schedule[s]
            assert k <= int(masked.sum()), "schedule step larger than the block's masks (original's quirk)"
            denoise_step(model, x, lo, hi, masked, mask_id, k,
                         threshold if strategy == "low_confidence_dynamic" else None)
            forwards += 1
        decoded_to = hi
        if any(int(t) in stop_ids for t in x[0, P:hi]):
            break
    return x[0, P:decoded_to].tolist(), forwards


def llada2_generate(model, prompt, *, mask_id, eos_id, gen_length, block=32, steps=32, threshold=0.95,
                    minimal_topk=1):
    """LLaDA2.0's ``generate()`` (the checkpoints' ``modeling_llada2_moe.py``, the greedy branch
    of the copies that have one: argmax, softmax probability) re-derived for one prompt: blocks
    from position 0 of a canvas rounded up to whole blocks; each step feeds the prefix up to the
    current block's end (no cache); ``steps = min(steps, gen_length // minimal_topk)`` and a
    step's count splits the block length, clamped to the masks left; every mask above
    ``threshold`` when at least that many, else that many most confident; stop after a block
    holding ``eos_id``; the answer is cut at ``gen_length`` and after its first EOS (kept).
    -> (generated ids, forwards)."""
    P = len(prompt)
    steps = min(steps, gen_length // minimal_topk)
    n_blocks = (P + gen_length + block - 1) // block
    x = torch.full((1, n_blocks * block), mask_id, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt)
    schedule = [block // steps + (1 if s < block % steps else 0) for s in range(steps)]
    forwards = 0
    for nb in range(P // block, n_blocks):
        lo, hi = nb * block, (nb + 1) * block
        for s in range(steps):
            masked = x[0, lo:hi] == mask_id
            if not masked.any():
                break
            denoise_step(model, x, lo, hi, masked, mask_id, min(schedule[s], int(masked.sum())), threshold)
            forwards += 1
        if (x[0, P:hi] == eos_id).any():
            break
    out = x[0, P:P + gen_length].tolist()
    return (out[:out.index(eos_id) + 1] if eos_id in out else out), forwards
