"""Accuracy, forwards and seconds of every shipped policy against the baseline, measured side by
side on the reference models.

    python -m dllm_decode.tools.policy_report                 # print the table
    python -m dllm_decode.tools.policy_report --write         # and replace the table in docs/policies.md

Every entry decodes the same held-out problems; speedups are ratios against the first entry of
the same model (the LLaDA baseline at one token per forward) in the same run, after a warm-up
decode of a few problems with each model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dllm_decode.measure.tasks import REFERENCE_MIX, task_names
from dllm_decode.tools.reporting import Column, held_out, machine, ratio_table, write_between_markers

START, END = "<!-- policy-report:start -->", "<!-- policy-report:end -->"


@dataclass(frozen=True)
class Entry:
    model: str                   # directory under models/
    label: str
    recipe: str                  # shipped recipe name
    overrides: tuple[str, ...] = field(default=())


ENTRIES = (
    Entry("llada-reference", "baseline: llada, 1 token / forward", "llada"),
    Entry("llada-reference", "llada, 4 tokens / forward", "llada", ("generation.steps=24",)),
    Entry("llada-reference", "llada, random remasking", "llada-random",
          ("generation.gen_length=96", "generation.block_length=96", "generation.steps=96")),
    Entry("llada-reference", "threshold 0.9", "threshold", ("generation.block_length=96",)),
    Entry("llada-reference", "factor 1.0", "factor", ("generation.block_length=96",)),
    Entry("llada-reference", "slowfast (code)", "slowfast"),
    Entry("llada-reference", "slowfast (paper)", "slowfast", ("policy.variant=paper",)),
    Entry("llada-reference", "slowfast spans + threshold 0.7 (slot swap)", "slowfast-threshold"),
    Entry("llada-reference", "apd, R 0.7, verifier ar-reference", "apd"),
    Entry("llada-reference", "apd, R 0.7, lookahead M 32", "apd", ("policy.max_lookahead=32",)),
    Entry("llada-reference", "apd, R 0.7, KV window W 16", "apd", ("policy.kv_window=16",)),
    Entry("llada-reference", "dream sampler, entropy, 96 steps", "dream"),
    Entry("llada-reference", "wino, tau_in 0.7 / tau_out 0.9, blocks of 32", "wino"),
    Entry("llada-reference", "prophet, gap 7.5 / 5.0 / 2.5, blocks of 32", "prophet"),
    Entry("llada-reference", "klass, conf 0.9 / KL 0.01 over 2 forwards, blocks of 32", "klass"),
    Entry("llada-reference", "credit (dInfer), threshold 0.9, blocks of 32", "credit"),
    Entry("llada-reference", "localleap, anchor 0.9 / relaxed 0.75 within 4, blocks of 32", "localleap"),
    Entry("llada-reference", "daedal, initial 64 / up to 2048, blocks of 32", "daedal"),
    Entry("dream-reference", "baseline: llada, 1 token / forward", "llada"),
    Entry("dream-reference", "dream sampler, entropy, 96 steps", "dream"),
    Entry("dream-reference", "dream sampler, entropy, 24 steps", "dream", ("generation.steps=24",)),
    Entry("dream-reference", "dream sampler, topk_margin, 24 steps", "dream",
          ("generation.steps=24", "policy.alg=topk_margin")),
    Entry("dream-reference", "dream-block (Fast-dLLM), threshold 0.9", "dream-block", ("generation.block_length=96",)),
    Entry("dream-reference", "slowfast (code)", "slowfast"),
    Entry("dream-reference", "klass (Dream variant), conf 0.9 / KL 0.01, one block", "klass",
          ("policy.variant=dream", "generation.block_length=96")),
    Entry("dream-reference", "credit (dInfer), threshold 0.9, blocks of 32", "credit"),
    Entry("dream-reference", "localleap, anchor 0.9 / relaxed 0.75 within 4, blocks of 32", "localleap"),
)


def measure(models_dir: Path, tasks, n: int, seed: int, entries=ENTRIES, progress: bool = True) -> list[dict]:
    """Decode the held-out problems under every entry, one model load and warm-up per model."""
    from dllm_decode.config import load_recipe
    from dllm_decode.measure.evaluate import evaluate
    from dllm_decode.models import load_model
    from dllm_decode.recipes import find_recipe

    problems = held_out(tasks, n, seed)
    loaded: dict[str, tuple] = {}
    rows = []
    for e in entries:
        recipe = load_recipe(find_recipe(e.recipe), overrides=list(e.overrides))
        if e.model not in loaded:
            loaded[e.model] = load_model(models_dir / e.model)
            # warm-up (allocator, kernels) so that the first entry's timing is not penalised;
            # short, so that long-canvas runs do not pay for it twice
            warm = load_recipe(find_recipe("llada"), overrides=["generation.gen_length=64",
                                                                "generation.block_length=64", "generation.steps=64"])
            evaluate(*loaded[e.model], warm, problems[:: max(1, len(problems) // 4)])
        model, tok = loaded[e.model]
        res = evaluate(model, tok, recipe, problems)
        rows.append({"model": e.model, "label": e.label, "recipe": e.recipe, "overrides": list(e.overrides),
                     "tasks": res.per_task, "accuracy": res.accuracy, "nfe": res.nfe,
                     "seconds_per_problem": res.seconds_per_problem,
                     "flops_per_problem": res.flops_per_problem, "flops_per_forward": res.flops_per_forward})
        if progress:
            print(f"{e.model:16s} {e.label:45s} acc {res.accuracy:.3f} nfe {res.nfe:6.1f} "
                  f"s/prob {res.seconds_per_problem:.4f}", flush=True)
    return rows


def render(rows: list[dict], tasks) -> str:
    lead: list[Column] = [("model", lambda r, b: r["model"]), ("policy", lambda r, b: r["label"]),
                          ("recipe", lambda r, b: f"`{r['recipe']}`" + "".join(f" `{o}`" for o in r["overrides"]))]
    tail: list[Column] = [("mean acc", lambda r, b: f"{r['accuracy']:.3f}"),
                          ("NFE / problem", lambda r, b: f"{r['nfe']:.1f}"),
                          ("s / problem", lambda r, b: f"{r['seconds_per_problem']:.4f}"),
                          ("NFE ratio", lambda r, b: f"{b['nfe'] / r['nfe']:.1f}x"),
                          ("wall speedup", lambda r, b: f"{b['seconds_per_problem'] / r['seconds_per_problem']:.1f}x")]
    return ratio_table(rows, tasks, lead, tail)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure every shipped policy against the baseline.")
    ap.add_argument("--models", default="models", help="directory holding the reference models")
    ap.add_argument("--tasks", default=",".join(REFERENCE_MIX), help="task names, comma-separated, or a named mix")
    ap.add_argument("--n", type=int, default=50, help="held-out problems per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", nargs="?", const="docs/policies.md", default=None,
                    help="replace the table between the report markers of this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tasks = list(task_names(a.tasks))
    rows = measure(Path(a.models), tasks, a.n, a.seed)
    cmd = "python -m dllm_decode.tools.policy_report" + (f" --n {a.n}" if a.n != 50 else "") + " --write"
    table = (f"{a.n} held-out problems per task (seed {a.seed}), generation length 96, T = 0. "
             f"Machine: {machine()}.\n\n{render(rows, tasks)}\n\nReproduce: `{cmd}`")
    print(table)
    if a.write:
        write_between_markers(Path(a.write), table, START, END)
        Path(a.write).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
