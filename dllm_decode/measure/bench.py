"""``dllm-decode bench``: several recipes (and an autoregressive baseline) on the same held-out
problems, in one process, interleaved batch by batch after a warm-up, so that every row of the
table saw the same machine state. The first recipe is the baseline of the speedup column.

Everything in the result but the timings is deterministic for a fixed seed: the problems come
from seeded generators and decoding draws only from each request's seeded generator.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dllm_decode.config import Recipe, load_recipe
from dllm_decode.eos import stop_ids
from dllm_decode.errors import RecipeError
from dllm_decode.measure.evaluate import ProblemRecord, score_rows
from dllm_decode.recipes import find_recipe
from dllm_decode.measure.tasks import Problem


@dataclass
class BenchRun:
    """One row of the table: a recipe (or the AR baseline) over every problem."""

    label: str
    kind: str                                   # 'diffusion' | 'autoregressive'
    recipe: dict[str, Any] | None               # the resolved recipe, for the JSON
    records: list[ProblemRecord] = field(default_factory=list)
    seconds: float = 0.0                        # decoding wall time over all problems
    peak_bytes: int = 0                         # peak accelerator memory, else peak cache store

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.records) / max(1, self.n)

    @property
    def nfe(self) -> float:
        return sum(r.nfe for r in self.records) / max(1, self.n)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(1, sum(r.nfe for r in self.records))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_problem(self) -> float:
        return self.seconds / max(1, self.n)

    @property
    def ms_per_forward(self) -> float:
        """Wall time per model forward (the cost of one step; a cached or block step is cheaper)."""
        return 1000.0 * self.seconds / max(1, sum(r.nfe for r in self.records))

    def summary(self, baseline: "BenchRun | None" = None) -> dict[str, Any]:
        out = {"label": self.label, "kind": self.kind, "n": self.n, "accuracy": self.accuracy,
               "nfe_per_problem": self.nfe, "tokens_per_forward": self.tokens_per_forward,
               "tokens_per_second": self.tokens_per_second, "seconds_per_problem": self.seconds_per_problem,
               "ms_per_forward": self.ms_per_forward, "peak_mib": self.peak_bytes / 2 ** 20}
        if baseline is not None:
            out["speedup"] = baseline.seconds_per_problem / self.seconds_per_problem if self.seconds else 0.0
        return out


# ----------------------------------------------------------------------------- recipes


def gen_length_overrides(path: str, gen_length: int, overrides: Sequence[str] = ()) -> list[str]:
    """Overrides that move a recipe to ``gen_length``: a one-block recipe stays one block and a
    one-token-per-forward schedule stays one token per forward; other block lengths and step
    counts are kept (they must still divide)."""
    gen = load_recipe(find_recipe(path), overrides=list(overrides)).generation
    out = [f"generation.gen_length={gen_length}"]
    if gen.block_length is not None and gen.block_length == gen.gen_length:
        out.append(f"generation.block_length={gen_length}")
    if gen.steps is not None and gen.steps == gen.gen_length:
        out.append(f"generation.steps={gen_length}")
    return out


def bench_label(label: str, overrides: Sequence[str]) -> str:
    """A row's label with the overrides that set it apart: ``threshold[threshold=0.7]``."""
    short = ",".join(f"{k.split('.')[-1]}={v}" for k, _, v in (o.partition("=") for o in overrides))
    return f"{label}[{short}]" if overrides else label


def expand_sweeps(named: Sequence[tuple], overrides: Sequence[str], sweeps: Sequence[str],
                  pm=None, gen_length: int | None = None) -> list[tuple[str, Recipe]]:
    """Load each (label, recipe file or name[, its own overrides]) with the common overrides
    (and, with ``gen_length``, :func:`gen_length_overrides`). Every sweep
    ``slot.key=v1,v2`` turns each recipe that accepts the key (its plugin in that slot has such
    an option) into one recipe per value, labelled ``label[key=v]``; recipes that do not accept
    it stay as they are. A sweep no recipe accepts is an error."""
    from dllm_decode.config import resolve_recipe
    from dllm_decode.plugins import get_plugin_manager

    pm = pm or get_plugin_manager()

    def load(over: list[str], path: str) -> Recipe:
        recipe = load_recipe(find_recipe(path), overrides=over)
        resolve_recipe(recipe, pm)
        return recipe

    out = []
    for label, path, *own in named:
        over = [*overrides, *(own[0] if own else [])]
        out.append((label, over + (gen_length_overrides(path, gen_length, over) if gen_length else []), path))
    for sweep in sweeps:
        key, _, raw = sweep.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not key.strip() or not values:
            raise RecipeError(f"--sweep {sweep!r}: expected KEY=V1,V2,... e.g. select_tokens.threshold=0.5,0.9")
        key = key.strip()
        expanded, first_error = [], None
        for label, over, path in out:
            try:
                load(over + [f"{key}={values[0]}"], path)
            except RecipeError as err:
                first_error = first_error or err
                expanded.append((label, over, path))
                continue
            expanded += [(bench_label(label, [f"{key}={v}"]), over + [f"{key}={v}"], path) for v in values]
        if len(expanded) == len(out) and first_error is not None:
            raise RecipeError(f"--sweep {sweep!r} applies to none of the recipes: {first_error}")
        out = expanded
    return [(label, load(over, path)) for label, over, path in out]


# ----------------------------------------------------------------------------- running


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def run_bench(model, tokenizer, recipes: Sequence[tuple[str, Recipe]], problems: Sequence[Problem], *,
              chunk: int, ar: tuple[Any, Any] | None = None, ar_tokens: int = 96, pm=None,
              warmup: bool = True, progress: Callable[[str, int], Any] | None = None,
              models: Sequence[tuple[Any, Any]] | None = None) -> list[BenchRun]:
    """Decode ``problems`` under every recipe, ``chunk`` problems at a time, recipes in turn
    within each chunk (interleaved), after one warm-up chunk per recipe. ``ar``: an
    (``AutoModelForCausalLM``, tokenizer) pair decoded greedily as an extra row. ``models``: a
    (model, tokenizer) per recipe when the rows compare checkpoints (default: ``model`` for all)."""
    import time

    from dllm_decode.engine import Decoder
    from dllm_decode.measure.evaluate import evaluate_ar

    models = list(models) if models is not None else [(model, tokenizer)] * len(recipes)
    decoders = [Decoder(m, r, pm=pm, tokenizer=t) for (_, r), (m, t) in zip(recipes, models)]
    runs = [BenchRun(label, "diffusion", r.to_dict()) for label, r in recipes]
    if ar is not None:
        runs.append(BenchRun(f"autoregressive ({ar[0].config.model_type}, greedy, KV cache)", "autoregressive", None))
    device = decoders[0]._device() if decoders else torch.device("cpu")

    stops = [set(stop_ids(m.spec)) for m, _ in models]                  # each row's model's EOS / end of turn

    def encode(group, tok):
        return [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in group]

    chunks = [list(problems[i:i + chunk]) for i in range(0, len(problems), chunk)]
    if warmup and chunks:
        for dec, (_, tok) in zip(decoders, models):
            dec.generate(encode(chunks[0][:1], tok))
        if ar is not None:
            evaluate_ar(ar[0], ar[1], chunks[0][:1], max_new_tokens=ar_tokens)
    for group in chunks:
        encoded: dict[int, list] = {}            # one encoding per tokenizer, not per row
        for run, dec, (_, tok), stop in zip(runs, decoders, models, stops):
            if id(tok) not in encoded:
                encoded[id(tok)] = encode(group, tok)
            ids = encoded[id(tok)]
            _peak_reset(device)
            t0 = time.perf_counter()
            result = dec.generate(ids, keep_states=True)
            run.seconds += time.perf_counter() - t0
            run.records += score_rows(group, result.rows, stop)
            run.peak_bytes = max(run.peak_bytes, _peak(device),
                                 *(int(s.counters.get("store_bytes", 0)) for s in result.states))
            if progress:
                progress(run.label, len(group))
        if ar is not None:
            _peak_reset(device)
            res = evaluate_ar(ar[0], ar[1], group, max_new_tokens=ar_tokens, batch_size=chunk)
            runs[-1].seconds += res.seconds
            runs[-1].records += res.records
            runs[-1].peak_bytes = max(runs[-1].peak_bytes, _peak(device))
            if progress:
                progress(runs[-1].label, len(group))
    return runs


# ----------------------------------------------------------------------------- reporting


def machine_info(device: str | torch.device = "cpu", dtype: str | None = None) -> dict[str, Any]:
    """The measuring machine's fields: the GPU's name on a CUDA device, else the CPU's
    architecture; torch, threads, the decoding dtype, Python. `tools.reporting.machine` writes
    them as one line."""
    d = torch.device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({platform.machine()})"
    return {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": dtype, "python": platform.python_version()}


def model_device(model) -> torch.device:
    """Where a model's weights live (the CPU for one without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def device_overrides(device: str | None = None, dtype: str | None = None) -> list[str]:
    """Recipe overrides that move decoding to `device` / `dtype` (None: leave the recipe's)."""
    out = [f"model.device={json.dumps(device)}"] if device else []
    return out + ([f"generation.dtype={dtype}"] if dtype else [])


def render(runs: Sequence[BenchRun], info: dict[str, Any]) -> str:
    base = runs[0] if runs else None
    lines = [f"device {info['device']} | torch {info['torch']} | {info['threads']} threads | dtype {info['dtype']}",
             "",
             "| recipe | acc | NFE / problem | tokens / forward | tokens / s | s / problem | speedup | ms / forward "
             "| peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        s = run.summary(base)
        lines.append(f"| {run.label} | {s['accuracy']:.3f} | {s['nfe_per_problem']:.1f} | {s['tokens_per_forward']:.2f} | "
                     f"{s['tokens_per_second']:.1f} | {s['seconds_per_problem']:.4f} | {s['speedup']:.2f}x | "
                     f"{s['ms_per_forward']:.2f} | {s['peak_mib']:.1f} |")
    against = against_ar(runs)
    return "\n".join(lines + ([""] + against if against else []))


def against_ar(runs: Sequence[BenchRun]) -> list[str]:
    """Lines comparing the dLLM rows with the autoregressive row in tokens per second: the
    fastest dLLM row, and the fastest at least as accurate as the AR row when that is another
    (none without an AR row, or without a dLLM row)."""
    ar = next((r for r in runs if r.kind == "autoregressive"), None)
    dllm = [r for r in runs if r.kind != "autoregressive" and r.seconds > 0]
    if ar is None or not dllm or ar.tokens_per_second <= 0:
        return []

    def line(what: str, run: BenchRun) -> str:
        return (f"{what}: {run.label}, {run.tokens_per_second / ar.tokens_per_second:.2f}x the autoregressive "
                f"row's tokens / s at accuracy {run.accuracy:.3f} (autoregressive {ar.accuracy:.3f})")

    fastest = max(dllm, key=lambda r: r.tokens_per_second)
    out = [line("fastest dLLM row", fastest)]
    level = [r for r in dllm if r.accuracy >= ar.accuracy]
    best = max(level, key=lambda r: r.tokens_per_second) if level else None
    if best is None:
        out.append("no dLLM row is as accurate as the autoregressive row")
    elif best is not fastest:
        out.append(line("fastest dLLM row at least as accurate", best))
    return out


def to_json(runs: Sequence[BenchRun], info: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    base = runs[0] if runs else None
    return {"machine": info, "settings": settings, "against_ar": against_ar(runs),
            "rows": [{**run.summary(base), "recipe": run.recipe,
                      "problems": [r.as_dict() for r in run.records]} for run in runs]}


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (x, y) points where larger is better on both axes: which no other point dominates."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def plot(runs: Sequence[BenchRun], path: str, title: str = "") -> None:
    """Write :func:`figure` of ``runs`` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(runs, title)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def figure(runs: Sequence[BenchRun], title: str = ""):
    """Accuracy against throughput and against NFE, one numbered point per row (the key under
    the panels names them; numbers are moved apart until none overlaps another or a point), the
    Pareto-optimal rows in red (joined by a dashed line when there are several), and a legend
    saying what the colours mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key_lines = 0.16 * max(1, (len(runs) + 1) // 2)      # inches the key under the panels takes
    fig = plt.figure(figsize=(13, 5.2 + key_lines))
    height = fig.get_figheight()
    bottom = (1.3 + key_lines) / height
    axes = fig.subplots(1, 2, gridspec_kw=dict(left=0.06, right=0.98, top=1 - 0.9 / height, bottom=bottom,
                                               wspace=0.18))
    acc = [r.accuracy for r in runs]
    panels = [("tokens / second (log scale)", [r.tokens_per_second for r in runs], 1, "faster"),
              ("forwards (NFE) per problem (log scale)", [r.nfe for r in runs], -1, "fewer forwards")]
    renderer = fig.canvas.get_renderer()
    for ax, (xlabel, xs, sign, better) in zip(axes, panels):
        _panel(ax, runs, xs, acc, sign, renderer)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("exact match")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles=_legend_handles(runs), loc="upper left", bbox_to_anchor=(0.05, (0.6 + key_lines) / height),
               ncol=4, fontsize=8, frameon=False)
    key = [f"{i + 1}  {r.label}  (acc {r.accuracy:.2f}, {r.tokens_per_second:.0f} tok/s, NFE {r.nfe:.1f})"
           for i, r in enumerate(runs)]
    half = (len(key) + 1) // 2
    for col, part in enumerate((key[:half], key[half:])):
        fig.text(0.06 + 0.48 * col, (0.2 + key_lines) / height, "\n".join(part),
                 fontsize=8, va="top", family="monospace")
    fig.suptitle(title or "accuracy vs speed", y=1 - 0.25 / height)
    return fig


def _legend_handles(runs: Sequence[BenchRun]) -> list:
    from matplotlib.lines import Line2D

    dot = dict(marker="o", linestyle="", markersize=8)
    handles = [Line2D([], [], color="tab:red", label="Pareto-optimal in its panel: no other row is as "
                      "accurate and better on that x axis", **dot),
               Line2D([], [], color="tab:blue", label="dominated by a red row", **dot),
               Line2D([], [], color="tab:red", linestyle="--", label="Pareto front (two or more red rows)")]
    if any(r.kind == "autoregressive" for r in runs):
        handles.append(Line2D([], [], color="grey", marker="*", linestyle="", markersize=10,
                              label="autoregressive baseline"))
    return handles


def _panel(ax, runs: Sequence[BenchRun], xs: list[float], acc: list[float], sign: int, renderer) -> None:
    """One panel's points, numbers and front (larger x is better when sign is 1, smaller when -1)."""
    from matplotlib.ticker import NullFormatter

    # scales and limits first: the label placement below works in display coordinates
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())       # minor log labels collide
    lo = min(acc) if acc else 0.0
    ax.set_ylim(max(-0.02, lo - 0.1), 1.04)
    ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
    front = pareto([(sign * x, a) for x, a in zip(xs, acc)])
    for x, a, on, run in zip(xs, acc, front, runs):
        star = run.kind == "autoregressive"             # drawn over a diffusion row at the same spot
        ax.scatter([x], [a], s=200 if star else 70, marker="*" if star else "o", color="tab:red" if on else "tab:blue",
                   edgecolor="black" if star else "none", linewidths=0.6, zorder=4 if star else 3)
    _place_numbers(ax, xs, acc, renderer)
    pts = sorted((x, a) for x, a, on in zip(xs, acc, front) if on)
    if len(pts) > 1:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="tab:red", lw=1, zorder=2)


def _place_numbers(ax, xs: list[float], acc: list[float], renderer) -> None:
    """Number each point, trying offsets around it (then further out, with a leader line) until
    the number overlaps no number placed before and no point."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    frame = ax.get_window_extent(renderer)                                     # numbers stay inside
    points = [ax.transData.transform((x, a)) for x, a in zip(xs, acc)]
    taken = [Bbox.from_bounds(px - 6, py - 6, 12, 12) for px, py in points]     # the markers
    around = [(5, 5), (5, -14), (-14, 5), (-14, -14), (-4, 9), (-4, -18)]
    for i, (x, a) in enumerate(zip(xs, acc)):
        for ring in range(8):
            spread = 1 + 1.4 * ring
            for dx, dy in around:
                note = ax.annotate(str(i + 1), (x, a), textcoords="offset points", fontsize=9, fontweight="bold",
                                   xytext=(dx * spread, dy * spread),
                                   arrowprops=dict(arrowstyle="-", color="grey", lw=0.6) if ring else None)
                # the number's own box (an Annotation's includes its leader line), with a gap
                note.update_positions(renderer)
                box = Text.get_window_extent(note, renderer).padded(3)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not any(box.overlaps(b) for b in taken):
                    taken.append(box)
                    break
                note.remove()
            else:
                continue
            break
