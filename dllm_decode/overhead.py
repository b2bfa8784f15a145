"""Framework overhead: the engine against a hand-written loop of the same algorithm, on the same
model and prompts, alternating run by run in one process.

    python -m dllm_decode.overhead                    # llada-reference, gen 96, batch 4
    python -m dllm_decode.overhead --gen 256 --repeats 5

The algorithm is the LLaDA baseline at one token per forward over one block, T = 0: the
commonest policy, and the one whose per-step model work is smallest relative to the engine's
bookkeeping (hooks, contract checks, the step record). Both produce the same tokens (checked
on every run). The overhead is the engine's time per step over the loop's, minus one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


@torch.inference_mode()
def handwritten_llada(model, prompts: list[list[int]], gen_length: int, pad_id: int) -> torch.Tensor:
    """LLaDA low-confidence remasking, one token per forward, one block, greedy: the plainest
    batched loop. -> (B, gen_length) generated ids."""
    mask_id = model.spec.mask_token_id
    P = max(len(p) for p in prompts)
    B, L = len(prompts), P + gen_length
    x = torch.full((B, L), mask_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        x[i, P - len(p):P] = torch.tensor(p)
        x[i, :P - len(p)] = pad_id
        attn[i, P - len(p):] = True
    for _ in range(gen_length):
        logits = model(x, attention_mask=attn)                              # (B, L, V)
        logits[..., mask_id] = float("-inf")
        x0 = logits.argmax(dim=-1)                                          # (B, L)
        p = torch.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None])[..., 0]
        conf = torch.where(x == mask_id, p, float("-inf"))
        pick = conf.argmax(dim=1, keepdim=True)                             # (B, 1)
        x = x.scatter(1, pick, x0.gather(1, pick))
    return x[:, P:]


def measure(model, tokenizer, problems, gen_length: int, batch_size: int, repeats: int) -> dict:
    from dllm_decode.config import load_recipe
    from dllm_decode.engine import Decoder
    from dllm_decode.recipes import find_recipe

    recipe = load_recipe(find_recipe("llada"), overrides=[
        f"generation.gen_length={gen_length}", f"generation.block_length={gen_length}",
        f"generation.steps={gen_length}", f"generation.batch_size={batch_size}"])
    decoder = Decoder(model, recipe)
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems][:batch_size]
    pad = decoder.pad_id
    hand_tokens = handwritten_llada(model, prompts, gen_length, pad)        # warm-up of both paths
    engine_tokens = decoder.generate(prompts).tokens
    if engine_tokens != hand_tokens.tolist():
        raise SystemExit("the engine and the hand-written loop decoded different tokens")
    hand, engine = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        handwritten_llada(model, prompts, gen_length, pad)
        hand.append((time.perf_counter() - t0) / gen_length)
        t0 = time.perf_counter()
        decoder.generate(prompts)
        engine.append((time.perf_counter() - t0) / gen_length)
    h, e = statistics.median(hand), statistics.median(engine)
    return {"gen_length": gen_length, "batch_size": len(prompts), "repeats": repeats,
            "handwritten_ms_per_step": h * 1e3, "engine_ms_per_step": e * 1e3, "overhead": e / h - 1.0,
            "handwritten_all_ms": [t * 1e3 for t in hand], "engine_all_ms": [t * 1e3 for t in engine]}


def main(argv: list[str] | None = None) -> None:
    from dllm_decode.model_card import held_out, machine
    from dllm_decode.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/llada-reference")
    ap.add_argument("--gen", type=int, nargs="+", default=[96, 256])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model(Path(a.model))
    problems = held_out(["copy", "repeat", "case"], 2, 0)
    print(f"model {a.model} | {machine()}")
    print("| gen | batch | hand-written loop (ms / step) | engine (ms / step) | engine overhead |")
    print("|---:|---:|---:|---:|---:|")
    for g in a.gen:
        r = measure(model, tok, problems, g, a.batch_size, a.repeats)
        print(f"| {g} | {r['batch_size']} | {r['handwritten_ms_per_step']:.2f} | {r['engine_ms_per_step']:.2f} | "
              f"{100 * r['overhead']:+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
