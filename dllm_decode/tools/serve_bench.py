"""Throughput of continuous batching against static batches and one request at a time.

The same requests (held-out problems of the reference tasks, all waiting at the start) are
decoded three ways, side by side in one process and in alternating rounds so that a slow
moment of the machine hits every mode alike:

- ``sequential``: one request at a time (batch size 1);
- ``static``: fixed batches of ``--max-batch`` in arrival order (``Decoder.generate``), each
  batch running until its slowest row is done;
- ``continuous``: ``dllm_decode.serve.scheduler.Scheduler`` with ``--max-batch`` rows, a
  finished row replaced by the next waiting request between two steps.

Every mode must give every request the same tokens (checked); the table reports generated
tokens (up to the first stop id) per second, forwards, and the ratios.

    python -m dllm_decode.tools.serve_bench --recipe threshold --n 16 --max-batch 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from dllm_decode.config import load_recipe
from dllm_decode.engine import Decoder
from dllm_decode.eos import first_stop
from dllm_decode.measure.tasks import get_task
from dllm_decode.models import load_model
from dllm_decode.serve.scheduler import Scheduler
from dllm_decode.tools.reporting import machine

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "llada-reference"


def requests(tokenizer: Any, tasks: list[str], n: int) -> list[list[int]]:
    """``n`` held-out problems of each task, interleaved so that answer lengths vary in a batch."""
    per_task = [get_task(t).problems("test", n) for t in tasks]
    return [tokenizer.encode(p.prompt, add_special_tokens=False) for group in zip(*per_task) for p in group]


def sequential(dec: Decoder, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    rows = [dec.generate([p]).rows[0] for p in prompts]
    return [r.tokens for r in rows], sum(r.steps for r in rows)


def static(dec: Decoder, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    result = dec.generate(prompts, keep_states=True)
    return result.tokens, sum(s.nfe for s in result.states)


def continuous(dec: Decoder, prompts: list[list[int]], max_batch: int) -> tuple[list[list[int]], int]:
    sched = Scheduler(dec.model, max_batch=max_batch)
    jobs = [sched.submit(dec, p) for p in prompts]
    sched.run()
    failed = [j.error for j in jobs if j.error is not None]
    if failed:
        raise RuntimeError(f"a scheduled request failed: {failed[0]}")
    return [j.tokens for j in jobs], sched.forwards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--recipe", default="threshold")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--tasks", default="copy,repeat,case")
    ap.add_argument("--n", type=int, default=16, help="problems per task")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    overrides = ["generation.eos.stop=true", *args.set]          # rows end at their stop id
    one = Decoder(model, load_recipe(args.recipe, overrides=[*overrides, "generation.batch_size=1"]))
    many = Decoder(model, load_recipe(args.recipe, overrides=[*overrides, f"generation.batch_size={args.max_batch}"]))
    prompts = requests(tok, args.tasks.split(","), args.n)
    modes = {"sequential": lambda: sequential(one, prompts), "static": lambda: static(many, prompts),
             "continuous": lambda: continuous(one, prompts, args.max_batch)}
    seconds = {m: 0.0 for m in modes}
    outputs: dict[str, tuple[list[list[int]], int]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for mode, run in modes.items():
                t0 = time.perf_counter()
                outputs[mode] = run()
                seconds[mode] += time.perf_counter() - t0
    reference = outputs["sequential"][0]
    for mode, (tokens, _) in outputs.items():
        if tokens != reference:
            raise SystemExit(f"{mode} decoded other tokens than one request at a time")
    generated = sum(first_stop(t, one.eos_ids) for t in reference) * args.rounds
    print(f"{len(prompts)} requests ({args.tasks}, {args.n} each), recipe `{args.recipe}` "
          f"{' '.join(f'`{o}`' for o in overrides)}, max batch {args.max_batch}, {args.rounds} rounds. "
          f"Machine: {machine()}.\n")
    print("| mode | tokens / s | forwards | vs sequential | vs static |")
    print("|---|---:|---:|---:|---:|")
    rate = {m: generated / seconds[m] for m in modes}
    for mode in modes:
        print(f"| {mode} | {rate[mode]:.1f} | {outputs[mode][1]} | {rate[mode] / rate['sequential']:.2f}x | "
              f"{rate[mode] / rate['static']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
