"""Framework overhead: the engine against a hand-written loop of the same algorithm, on the same
model and prompts, alternating step by step in one process.

    python -m dllm_decode.tools.overhead                    # llada-reference, gen 96, batch 4
    python -m dllm_decode.tools.overhead --gen 256 --repeats 5

The algorithm is the LLaDA baseline at one token per forward over one block, T = 0: the
commonest policy, and the one whose per-step model work is smallest relative to the engine's
bookkeeping (hooks, contract checks, the step record). Both produce the same tokens (checked
on every run). The two advance in lockstep, one step of each in turn, every step timed on
its own, so a slow spell of the shared machine lands on both alike. The overhead is the
engine's total time per step over the loop's, minus one, in the process's CPU time (what the
code costs) and in wall time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def handwritten_steps(model, prompts: list[list[int]], gen_length: int, pad_id: int):
    """LLaDA low-confidence remasking, one token per forward, one block, greedy: the plainest
    batched loop, as a generator that yields after each step and returns the (B, gen_length)
    generated ids."""
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
        yield
    return x[:, P:]


@torch.inference_mode()
def handwritten_llada(model, prompts: list[list[int]], gen_length: int, pad_id: int) -> torch.Tensor:
    steps = handwritten_steps(model, prompts, gen_length, pad_id)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def engine_steps(decoder, prompts: list[list[int]]):
    """The engine's request loop through its public step iterator (``Decoder.steps``): start,
    observers, steps, end. Yields once per step; returns the generated rows."""
    state = None
    for state in decoder.steps(prompts):
        yield
    return state.generated().tolist()


@torch.inference_mode()
def measure(model, tokenizer, problems, gen_length: int, batch_size: int, repeats: int) -> dict:
    """Both loops advance in lockstep, one step of each in turn, each step timed on its own: a
    slow spell of the machine lands on both alike."""
    from dllm_decode.config import load_recipe
    from dllm_decode.engine import Decoder

    recipe = load_recipe("llada", overrides=[
        f"generation.gen_length={gen_length}", f"generation.block_length={gen_length}",
        f"generation.steps={gen_length}", f"generation.batch_size={batch_size}"])
    decoder = Decoder(model, recipe)
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems][:batch_size]
    pad = decoder.pad_id
    totals = {k: {"wall": 0.0, "cpu": 0.0} for k in ("hand", "engine")}
    for rep in range(repeats + 1):                       # the first round is the warm-up
        gens = {"hand": handwritten_steps(model, prompts, gen_length, pad), "engine": engine_steps(decoder, prompts)}
        results: dict[str, list] = {}
        while len(results) < 2:
            for key, gen in gens.items():
                if key in results:
                    continue
                w, c = time.perf_counter(), time.process_time()
                try:
                    next(gen)
                except StopIteration as done:
                    results[key] = done.value if key == "engine" else done.value.tolist()
                if rep:
                    totals[key]["wall"] += time.perf_counter() - w
                    totals[key]["cpu"] += time.process_time() - c
        if results["hand"] != results["engine"]:
            raise SystemExit("the engine and the hand-written loop decoded different tokens")
    steps = repeats * gen_length
    out = {"gen_length": gen_length, "batch_size": len(prompts), "repeats": repeats}
    for clock in ("cpu", "wall"):
        h, e = totals["hand"][clock] / steps, totals["engine"][clock] / steps
        out[clock] = {"handwritten_ms_per_step": h * 1e3, "engine_ms_per_step": e * 1e3, "overhead": e / h - 1.0}
    return out


def main(argv: list[str] | None = None) -> None:
    from dllm_decode.tools.reporting import held_out, machine
    from dllm_decode.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/llada-reference")
    ap.add_argument("--gen", type=int, nargs="+", default=[96, 256])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model(Path(a.model))
    problems = held_out(["copy", "repeat", "case"], 2, 0)
    print(f"model {a.model} | {machine()}")
    print("| gen | batch | clock | hand-written loop (ms / step) | engine (ms / step) | engine overhead |")
    print("|---:|---:|---|---:|---:|---:|")
    for g in a.gen:
        r = measure(model, tok, problems, g, a.batch_size, a.repeats)
        for clock, label in (("cpu", "CPU time"), ("wall", "wall")):
            c = r[clock]
            print(f"| {g} | {r['batch_size']} | {label} | {c['handwritten_ms_per_step']:.2f} | "
                  f"{c['engine_ms_per_step']:.2f} | {100 * c['overhead']:+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
