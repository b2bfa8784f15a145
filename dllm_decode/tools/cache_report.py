"""Every policy alone and with every cache, side by side on the reference models, at two
generation lengths: accuracy, forwards, FLOPs actually computed, seconds, speedups.

    python -m dllm_decode.tools.cache_report                  # print the tables
    python -m dllm_decode.tools.cache_report --write          # and replace them in docs/caches.md

Speedups are ratios against the first row of the same model and length (the LLaDA baseline,
one token per forward, no cache), measured in the same run after a warm-up, every row of a
model interleaved batch by batch with the others (``dllm_decode.measure.bench.run_bench``). FLOPs are the
executor's count of the matmuls each forward really ran (``CacheStore.flops``): a cached step
shows what it saved even where this machine's wall clock does not.

The reference models were trained on canvases of at most 256 generated positions. The
``--long`` length (default 1024) lies past that: the answers there are wrong and the
policies' own step counts would mean nothing, so that table runs the baseline (a fixed number
of forwards) with each cache and compares the cost of a forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dllm_decode.tools.policy_report import Entry
from dllm_decode.tools.reporting import Column, held_out, machine, ratio_table, write_between_markers
from dllm_decode.measure.tasks import REFERENCE_MIX, task_names

START, END = "<!-- cache-report:start -->", "<!-- cache-report:end -->"

DUAL = "cache_policy={plugin: kv_block, mode: dual}"
PREFIX = "cache_policy={plugin: kv_block, mode: prefix}"
DLLM = "cache_policy={plugin: dllm_cache, prompt_interval: 100, response_interval: 7, rho: 0.25}"
TAIL = "cache_policy=slowfast_tail"
DKV = "cache_policy={plugin: dkv_cache, refresh_interval: 8}"
NONE = "cache_policy=none"
LEAP = "select_tokens={plugin: localleap, threshold: 0.9, relaxed_threshold: 0.75, radius: 4}"


# approximate rows -> the row of the same model that decodes with the same policy and no cache:
# the "agree" column is the share of problems whose completion equals that row's
_LLADA, _THRESHOLD = "llada, 1 token / forward (baseline)", "threshold 0.9, blocks of 32"
NO_CACHE: dict[str, str] = {
    **{label: _LLADA for label in ("llada + kv_block dual", "llada + kv_block prefix",
                                   "llada + dllm_cache (100, 7, 0.25)", "llada + dkv_cache (refresh 8)")},
    **{label: _THRESHOLD for label in (
        "threshold + kv_block dual (Fast-dLLM)", "threshold + kv_block prefix",
        "threshold + dllm_cache (100, 7, 0.25)", "threshold + dkv_cache (refresh 8)",
        "threshold + dpad (Gaussian, window 64)", "threshold + dpad + prefix KV cache",
        "threshold + dpad + dual KV cache")},
    **{label: "slowfast (code)" for label in (
        "slowfast + kv_block dual", "slowfast + dllm_cache (100, 7, 0.25)", "slowfast + slowfast_tail",
        "slowfast + slowfast_tail + dllm_cache (15, 5, 0.25)")},
    "d2cache sampler + d2cache (k 32, p 0.1)": "d2cache sampler (certainty prior), no cache",
    "threshold + elastic_cache (window 16, gamma 0.9)": "threshold in a window of 16 masks, no cache",
    "localleap + elastic_cache (window 16, gamma 0.9)": "localleap in a window of 16 masks, no cache",
    "sdar, threshold 0.85 + block_kv": "sdar, threshold 0.85, no cache",
    "dream-block + kv_block dual, one block": "dream-block, threshold 0.9, one block",
    "dream-block + dllm_cache (100, 7, 0.25), one block": "dream-block, threshold 0.9, one block",
    "dream sampler (entropy) + dkv_cache (refresh 16)": "dream sampler (entropy), no cache",
    "d2cache sampler + d2cache (k 32, p 0.1, top-p 0.9)": "d2cache sampler (certainty prior, top-p 0.9), no cache",
}


def agreement(rows: list[dict]) -> list[float | None]:
    """Per row: the share of its problems whose completion equals its NO_CACHE row's (None: no
    such row in `rows`)."""
    by_label = {(r["model"], r["label"]): r for r in rows}
    out = []
    for r in rows:
        base = by_label.get((r["model"], NO_CACHE.get(r["label"], "")))
        if base is None:
            out.append(None)
            continue
        want = {(p["task"], p["index"]): p["completion"] for p in base["problems"]}
        same = [want.get((p["task"], p["index"])) == p["completion"] for p in r["problems"]]
        out.append(sum(same) / max(1, len(same)))
    return out


def entries(gen: int, dream: bool = True, policies: bool = True) -> tuple[Entry, ...]:
    """The rows for generation length ``gen``: (label, shipped recipe, extra overrides).
    ``policies=False``: only the baseline with each cache (a fixed number of forwards, so the
    rows compare the cost of a forward)."""
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
        ("llada + dkv_cache (refresh 8)", "dkv-cache", llada),
        ("threshold + dkv_cache (refresh 8)", "threshold", blocks + (DKV,)),
        ("d2cache sampler (certainty prior), no cache", "d2cache", llada + (NONE,)),
        ("d2cache sampler + d2cache (k 32, p 0.1)", "d2cache", llada),
        ("threshold + dpad (Gaussian, window 64)", "dpad", blocks),
        ("threshold + dpad + prefix KV cache", "dpad", blocks + ("cache_policy.kv_cache=prefix",)),
        ("threshold + dpad + dual KV cache", "dpad", blocks + ("cache_policy.kv_cache=dual",)),
        ("threshold in a window of 16 masks, no cache", "elastic-cache", (f"generation.gen_length={gen}", NONE)),
        ("threshold + elastic_cache (window 16, gamma 0.9)", "elastic-cache", (f"generation.gen_length={gen}",)),
        ("localleap, blocks of 32", "localleap", blocks),
        ("localleap in a window of 16 masks, no cache", "elastic-cache",
         (f"generation.gen_length={gen}", LEAP, NONE)),
        ("localleap + elastic_cache (window 16, gamma 0.9)", "elastic-cache", (f"generation.gen_length={gen}", LEAP)),
    ]
    out = [Entry("llada-reference", label, recipe, over) for label, recipe, over in rows[:None if policies else 4]]
    if dream:
        # dream-reference was trained on whole-canvas masks only: it cannot decode in blocks
        # (accuracy 0 with blocks of 32), so its rows use one block over the canvas
        one = one_block + (f"generation.steps={gen}",)
        out += [Entry("dream-reference", "llada, 1 token / forward (baseline)", "llada", llada),
                Entry("dream-reference", "dream-block, threshold 0.9, one block", "dream-block", one),
                Entry("dream-reference", "dream-block + kv_block dual, one block", "dream-fast-dllm", one),
                Entry("dream-reference", "dream-block + dllm_cache (100, 7, 0.25), one block", "dream-block",
                      one + (DLLM,)),
                Entry("dream-reference", "dream sampler (entropy), no cache", "dream-dkv-cache",
                      (f"generation.gen_length={gen}", f"generation.steps={gen}", NONE)),
                Entry("dream-reference", "dream sampler (entropy) + dkv_cache (refresh 16)", "dream-dkv-cache",
                      (f"generation.gen_length={gen}", f"generation.steps={gen}")),
                Entry("dream-reference", "d2cache sampler (certainty prior, top-p 0.9), no cache", "dream-d2cache",
                      one + (NONE,)),
                Entry("dream-reference", "d2cache sampler + d2cache (k 32, p 0.1, top-p 0.9)", "dream-d2cache", one),
                Entry("dream-reference", "threshold in a window of 16 masks, no cache", "elastic-cache",
                      (f"generation.gen_length={gen}", NONE)),
                Entry("dream-reference", "threshold + elastic_cache (window 16, gamma 0.9)", "elastic-cache",
                      (f"generation.gen_length={gen}",))]
    if policies:
        # the block-diffusion model, decoded block by block in its blocks of 4 (the llada2 and
        # fast-dllm-v2 recipes' rules at that block size: their own 32 is the LLaDA2 / Fast-dLLM v2
        # checkpoints')
        sdar = (f"generation.gen_length={gen}", f"generation.steps={gen}")
        at4 = sdar + ("generation.block_length=4",)
        out += [Entry("sdar-reference", "sdar, 1 token / forward, no cache", "sdar",
                      sdar + ("select_tokens.threshold=1.0", NONE)),
                Entry("sdar-reference", "sdar, threshold 0.85, no cache", "sdar", sdar + (NONE,)),
                Entry("sdar-reference", "sdar, threshold 0.85 + block_kv", "sdar", sdar),
                Entry("sdar-reference", "llada2 rule (threshold 0.95) + block_kv, blocks of 4", "llada2", at4),
                Entry("sdar-reference", "fast-dllm-v2 rule (first token alone, 0.9) + block_kv, blocks of 4",
                      "fast-dllm-v2", at4)]
    return tuple(out)


def run(models_dir: Path, tasks, n: int, seed: int, gen: int, dream: bool = True, policies: bool = True,
        max_length: int | None = None, progress: bool = True) -> list[dict]:
    """Every entry for ``gen``, each model's entries interleaved batch by batch (bench.run_bench)."""
    import dataclasses

    from dllm_decode.measure.bench import run_bench
    from dllm_decode.config import load_recipe
    from dllm_decode.models import load_model
    from dllm_decode.recipes import find_recipe

    problems = held_out(tasks, n, seed)
    rows = []
    todo = entries(gen, dream, policies)
    for name in dict.fromkeys(e.model for e in todo):
        mine = [e for e in todo if e.model == name]
        model, tok = load_model(models_dir / name)
        if max_length is not None:
            model.spec = dataclasses.replace(model.spec, max_length=max(max_length, model.spec.max_length))
        recipes = [(e.label, load_recipe(find_recipe(e.recipe), overrides=list(e.overrides))) for e in mine]
        chunk = max(r.generation.batch_size for _, r in recipes)

        def note(label: str, k: int) -> None:
            if progress:
                print(f"  {name} {label}: +{k}", flush=True)

        runs = run_bench(model, tok, recipes, problems, chunk=chunk, progress=note)
        for e, r in zip(mine, runs):
            per_task = {t: {"n": sum(1 for p in r.records if p.task == t),
                            "accuracy": sum(p.correct for p in r.records if p.task == t)
                            / max(1, sum(1 for p in r.records if p.task == t))} for t in tasks}
            flops = sum(p.flops for p in r.records)
            rows.append({"model": name, "label": e.label, "recipe": e.recipe, "overrides": list(e.overrides),
                         "tasks": per_task, "accuracy": r.accuracy, "nfe": r.nfe,
                         "seconds_per_problem": r.seconds_per_problem,
                         "flops_per_problem": flops / max(1, r.n),
                         # a row's share of the batch's FLOPs over the batch's forwards
                         "flops_per_forward": flops / max(1, sum(p.steps for p in r.records)),
                         "problems": [p.as_dict() for p in r.records]})
    return rows


def render(rows: list[dict], tasks) -> str:
    agree = {id(r): a for r, a in zip(rows, agreement(rows))}
    lead: list[Column] = [("model", lambda r, b: r["model"]), ("recipe", lambda r, b: r["label"])]
    tail: list[Column] = [("mean acc", lambda r, b: f"{r['accuracy']:.3f}"),
                          ("agree", lambda r, b: "" if agree[id(r)] is None else f"{agree[id(r)]:.2f}"),
                          ("NFE / problem", lambda r, b: f"{r['nfe']:.1f}"),
                          ("GFLOP / problem", lambda r, b: f"{r['flops_per_problem'] / 1e9:.2f}"),
                          ("MFLOP / forward", lambda r, b: f"{r['flops_per_forward'] / 1e6:.1f}"),
                          ("s / problem", lambda r, b: f"{r['seconds_per_problem']:.3f}"),
                          ("FLOP ratio", lambda r, b: f"{b['flops_per_problem'] / r['flops_per_problem']:.1f}x"),
                          ("wall speedup", lambda r, b: f"{b['seconds_per_problem'] / r['seconds_per_problem']:.2f}x")]
    return ratio_table(rows, tasks, lead, tail)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure every policy with every cache against the baseline.")
    ap.add_argument("--models", default="models", help="directory holding the reference models")
    ap.add_argument("--gen", type=int, default=256, help="generation length of the main table")
    ap.add_argument("--n", type=int, default=8, help="held-out problems per task at --gen")
    ap.add_argument("--long", type=int, default=1024, help="second generation length (0: skip)")
    ap.add_argument("--long-tasks", default="copy", help="tasks at the long length")
    ap.add_argument("--long-n", type=int, default=2, help="problems per task at the long length")
    ap.add_argument("--tasks", default=",".join(REFERENCE_MIX), help="task names, comma-separated, or a named mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", nargs="?", const="docs/caches.md", default=None,
                    help="replace the tables between the report markers of this file")
    ap.add_argument("--from-json", metavar="FILE", help="render the tables of an earlier run's record "
                    "(the .json --write leaves, e.g. docs/caches.json) instead of measuring")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = Path(a.models)
    tasks = list(task_names(a.tasks))
    saved = json.loads(Path(a.from_json).read_text()) if a.from_json else None
    rows = saved[str(a.gen)] if saved else run(models, tasks, a.n, a.seed, a.gen)
    parts = [f"### Generation length {a.gen}\n\n{a.n} held-out problems per task (seed {a.seed}), T = 0, "
             f"batches of 4, every row of a model interleaved batch by batch.\n\n{render(rows, tasks)}"]
    record = {"machine": saved["machine"] if saved else machine(), str(a.gen): rows}
    cmd = "python -m dllm_decode.tools.cache_report --write"

    def publish() -> None:              # after each length, so a long run never loses the first
        text = f"Machine: {record['machine']}.\n\n" + "\n\n".join(parts) + f"\n\nReproduce: `{cmd}`"
        print(text, flush=True)
        if a.write:
            write_between_markers(Path(a.write), text, START, END)
            Path(a.write).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")

    publish()
    if a.long:
        long_tasks = list(task_names(a.long_tasks))
        long_rows = saved[str(a.long)] if saved else run(models, long_tasks, a.long_n, a.seed, a.long,
                                                          dream=False, policies=False, max_length=a.long + 256)
        record[str(a.long)] = long_rows
        parts.append(f"### Generation length {a.long}: the cost of a forward\n\n{a.long_n} held-out "
                     f"problem(s) of {', '.join(long_tasks)}, one batch, the baseline (one token per forward, "
                     f"{a.long} forwards) with each cache. This length lies past the models' training "
                     f"canvases (at most 256 generated positions), so the answers are wrong and the "
                     f"policies' own step counts would mean nothing; with the number of forwards fixed, "
                     f"the rows compare what a forward computes and costs.\n\n{render(long_rows, long_tasks)}")
        publish()


if __name__ == "__main__":
    main()
