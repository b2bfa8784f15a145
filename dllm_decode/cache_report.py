"""Every policy alone and with every cache, side by side on the reference models, at two
generation lengths: accuracy, forwards, FLOPs actually computed, seconds, speedups.

    python -m dllm_decode.cache_report                  # print the tables
    python -m dllm_decode.cache_report --write          # and replace them in docs/caches.md

Speedups are ratios against the first row of the same model and length (the LLaDA baseline,
one token per forward, no cache), measured in the same run after a warm-up. FLOPs are the
executor's count of the matmuls each forward really ran (``CacheStore.flops``): a cached step
shows what it saved even where this machine's wall clock does not.

The reference models were trained on canvases of at most 256 generated positions. The
``--long`` length (default 1024) lies past that, so its accuracy says nothing about the
policies; those rows measure cost only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dllm_decode.model_card import machine
from dllm_decode.policy_report import Entry, measure, write_between_markers
from dllm_decode.tasks import REFERENCE_MIX

START, END = "<!-- cache-report:start -->", "<!-- cache-report:end -->"

DUAL = "cache_policy={plugin: kv_block, mode: dual}"
PREFIX = "cache_policy={plugin: kv_block, mode: prefix}"
DLLM = "cache_policy={plugin: dllm_cache, prompt_interval: 100, response_interval: 7, rho: 0.25}"
TAIL = "cache_policy=slowfast_tail"


def entries(gen: int, dream: bool = True) -> tuple[Entry, ...]:
    """The rows for generation length ``gen``: (label, shipped recipe, extra overrides)."""
    one_block = (f"generation.gen_length={gen}", f"generation.block_length={gen}")
    blocks = (f"generation.gen_length={gen}", "generation.block_length=32", f"generation.steps={gen}")
    llada = one_block + (f"generation.steps={gen}",)
    rows = [
        ("llada, 1 token / forward (baseline)", "llada", llada),
        ("llada + kv_block dual", "llada", llada + (DUAL,)),
        ("llada + kv_block prefix", "llada", llada + (PREFIX,)),
        ("llada + dllm_cache (100, 7, 0.25)", "llada-dllm-cache", llada),
        ("threshold 0.9, blocks of 32", "threshold", blocks),
        ("threshold + kv_block dual (Fast-dLLM)", "fast-dllm", blocks),
        ("threshold + kv_block prefix", "fast-dllm-prefix", blocks),
        ("threshold + dllm_cache (100, 7, 0.25)", "threshold", blocks + (DLLM,)),
        ("slowfast (code)", "slowfast", one_block),
        ("slowfast + kv_block dual", "slowfast", one_block + (DUAL,)),
        ("slowfast + dllm_cache (100, 7, 0.25)", "slowfast", one_block + (DLLM,)),
        ("slowfast + slowfast_tail", "slowfast", one_block + (TAIL,)),
        ("slowfast + slowfast_tail + dllm_cache (15, 5, 0.25)", "slowfast-dllm-cache", one_block),
    ]
    out = [Entry("llada-reference", label, recipe, over) for label, recipe, over in rows]
    if dream:
        # dream-reference was trained on whole-canvas masks only: it cannot decode in blocks
        # (accuracy 0 with blocks of 32), so its rows use one block over the canvas
        one = one_block + (f"generation.steps={gen}",)
        out += [Entry("dream-reference", "llada, 1 token / forward (baseline)", "llada", llada),
                Entry("dream-reference", "dream-block, threshold 0.9, one block", "dream-block", one),
                Entry("dream-reference", "dream-block + kv_block dual, one block", "dream-fast-dllm", one),
                Entry("dream-reference", "dream-block + dllm_cache (100, 7, 0.25), one block", "dream-block",
                      one + (DLLM,))]
    return tuple(out)


def render(rows: list[dict], tasks) -> str:
    head = ("| model | recipe | " + " | ".join(tasks) + " | mean acc | NFE / problem | "
            "GFLOP / problem | MFLOP / forward | s / problem | FLOP ratio | wall speedup |")
    lines = [head, "|---|---|" + "---:|" * (len(tasks) + 7)]
    base: dict[str, dict] = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        cells = [f"{r['tasks'][t]['accuracy']:.2f}" for t in tasks]
        lines.append(f"| {r['model']} | {r['label']} | " + " | ".join(cells) +
                     f" | {r['accuracy']:.3f} | {r['nfe']:.1f} | {r['flops_per_problem'] / 1e9:.2f} | "
                     f"{r['flops_per_forward'] / 1e6:.1f} | {r['seconds_per_problem']:.3f} | "
                     f"{b['flops_per_problem'] / r['flops_per_problem']:.1f}x | "
                     f"{b['seconds_per_problem'] / r['seconds_per_problem']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure every policy with every cache against the baseline.")
    ap.add_argument("--models", default="models", help="directory holding the reference models")
    ap.add_argument("--gen", type=int, default=256, help="generation length of the main table")
    ap.add_argument("--n", type=int, default=8, help="held-out problems per task at --gen")
    ap.add_argument("--long", type=int, default=1024, help="second generation length (0: skip)")
    ap.add_argument("--long-tasks", default="copy", help="tasks at the long length")
    ap.add_argument("--long-n", type=int, default=2, help="problems per task at the long length")
    ap.add_argument("--tasks", default=",".join(REFERENCE_MIX))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", nargs="?", const="docs/caches.md", default=None,
                    help="replace the tables between the report markers of this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = Path(a.models)
    tasks = a.tasks.split(",")
    rows = measure(models, tasks, a.n, a.seed, entries=entries(a.gen))
    parts = [f"### Generation length {a.gen}\n\n{a.n} held-out problems per task (seed {a.seed}), T = 0, "
             f"batches of 4.\n\n{render(rows, tasks)}"]
    record = {"machine": machine(), str(a.gen): rows}
    if a.long:
        long_tasks = a.long_tasks.split(",")
        long_rows = measure(models, long_tasks, a.long_n, a.seed, entries=entries(a.long, dream=False),
                            max_length=a.long + 256)
        record[str(a.long)] = long_rows
        parts.append(f"### Generation length {a.long} (cost only)\n\n{a.long_n} held-out problem(s) of "
                     f"{', '.join(long_tasks)}, one batch. Past the models' training length: the accuracy "
                     f"columns are not a measurement of the policies.\n\n{render(long_rows, long_tasks)}")
    cmd = "python -m dllm_decode.cache_report --write"
    text = f"Machine: {machine()}.\n\n" + "\n\n".join(parts) + f"\n\nReproduce: `{cmd}`"
    print(text)
    if a.write:
        write_between_markers(Path(a.write), text, START, END)
        Path(a.write).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
