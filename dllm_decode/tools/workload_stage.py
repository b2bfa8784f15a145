"""Train the next stage of the workload models in a wall-clock budget, then read them.

The stage runs in three phases, each a ``tools.train`` / ``tools.probe`` / ``dllm-decode bench``
command it prints before running:

1. the AR model is continued on the task mix. It learns a task's arithmetic, and where a long
   answer stops, far faster than a masked-diffusion model does, and a Dream model adapted from it
   starts with what it knows (docs/models.md, "Where a Dream model's stop comes from");
2. Dream and LLaDA are adapted from that AR model (LLaDA is continued from ``--llada-init`` when
   given), side by side on one device, with end rows (``train --end-rows``: with them a Dream
   model adapted from an AR model that stops right learns the stop, where without them it keeps
   about half of the AR model's). A short timing run of both measures the step rate they share,
   and each schedule is sized to what is left of ``--train-minutes``, so the learning rate
   finishes its decay;
3. the readings: a bench of the diffusion models at one token per forward with the AR row, at
   generation length 256 on the short tasks and 1024 on the long one (``OUT/bench-256.json``,
   ``OUT/bench-1024.json``), then where each model stops on ``ladder`` (``tools.probe --stop``).

Each command and the end of its output go to ``OUT/stage.log``. Every command stops at its
phase's deadline: a training run is sent SIGINT and writes a checkpoint, which becomes a model
folder (``train --snapshot``); a reading is ended and the log says so. ::

    python -m dllm_decode.tools.workload_stage --out runs/stage --device cuda --train-minutes 6 --read-minutes 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "mlp_hidden")
NOISE = ("Loading weights", "Writing model shards", "\r")      # progress bars, not readings


@dataclass
class StageConfig:
    out: Path
    ar_init: Path = Path("models/ar-workload")
    llada_init: Path | None = None     # None: LLaDA is adapted from the stage's AR model, as Dream is
    families: tuple[str, ...] = ("dream", "llada")
    # the short variants' answers fit a 256-position canvas: trained at it, and read at --gen-length
    tasks: str = "copy,chain,columns-short,listops-short,ladder"
    task_weights: str = "1,4,2,2,2"
    short_tasks: str = "copy,chain,columns-short,listops-short"     # read at --gen-length
    long_tasks: str = "ladder"                          # read at --long-gen-length
    batch_tokens: int = 65536      # the AR phase's
    # the diffusion runs' steps are small: on a fixed token budget the adaptation learns from the number
    # of steps more than their size (600 steps of 4,096 tokens read chain with a third of the wrong
    # characters of 150 of 16,384, at the same or twice the rate, and fewer than 1,200 of 2,048;
    # docs/models.md, "Steps, not tokens")
    diffusion_batch_tokens: int = 4096
    # 0: no AR phase (Dream adapts from --ar-init as it is). 400 steps hold about 26M tokens; on a
    # CPU 4M (200 steps of ladder alone, then 300 on the mix, at 8,192 tokens) taught the mix
    ar_steps: int = 400
    ar_lr: float = 5e-4
    ar_minutes: float = 1.5        # the AR phase's deadline (an H200 made 13.8 AR steps/s: 400 in 29 s)
    diffusion_lr: float = 2e-4
    attention_anneal: int = 500
    end_rows: float = 0.4          # rows that write the final line and stop (train --end-rows)
    # a batch's canvas is drawn among those its task's answers fit: ladder's only fit 1024, so the odds
    # choose the short tasks' canvases. Mostly 256, their reading length: with odds 3,2,2 a step held
    # about two thirds as many chain answers and the reading ended at 1.8x the wrong characters of 256
    # alone, with 6,1,1 no worse than 256 alone (docs/models.md, "The stage's canvases and end rows");
    # the long ones keep the short answers' EOS tail at long generation lengths
    canvas: str = "256,512,1024"
    canvas_weights: str = "6,1,1"
    timing_steps: int = 30
    train_minutes: float = 6.0     # AR and diffusion phases together
    read_minutes: float = 3.0
    safety: float = 0.85           # share of the measured budget a diffusion schedule plans for
    n: int = 200                   # held-out problems per task in the readings
    gen_length: int = 256
    long_gen_length: int = 1024
    device: str = "cuda"
    threads: int = 4
    seed: int = 30


def shape_flags(init: Path) -> list[str]:
    """The model-shape flags of the checkpoint `init` (train refuses an --init of another shape)."""
    try:
        c = json.loads((init / "training.json").read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise SystemExit(f"workload_stage: {init}/training.json: not a checkpoint written by train ({e})")
    from dllm_decode.tools.train import TrainConfig

    kv = TrainConfig(**{k: v for k, v in c.items() if k in TrainConfig.__dataclass_fields__}).kv_heads()
    flags = [f"--{k.replace('_', '-')}={c[k]}" for k in SHAPE_KEYS]
    return flags + [f"--n-kv-heads={kv}", f"--max-length={c.get('max_length') or 2048}"]


def train_command(cfg: StageConfig, family: str, out: Path, steps: int) -> list[str]:
    """The ``tools.train`` command of one run of the stage."""
    adapted = cfg.out / "ar" if cfg.ar_steps else cfg.ar_init
    init = {"ar": cfg.ar_init, "llada": cfg.llada_init}.get(family) or adapted
    shape = shape_flags(cfg.ar_init if init == adapted else init)     # the stage's AR run has --ar-init's shape
    common = [*_module("dllm_decode.tools.train"), "--family", family, "--init", str(init), "--out", str(out),
              "--tasks", cfg.tasks, "--task-weights", cfg.task_weights, "--batch-by-task",
              "--batch-tokens", str(cfg.batch_tokens if family == "ar" else cfg.diffusion_batch_tokens),
              "--autocast", "bf16", "--steps", str(steps),
              "--device", cfg.device, "--threads", str(cfg.threads), "--log-every", "10", "--no-progress", *shape]
    if family == "ar":
        return [*common, "--lr", str(cfg.ar_lr), "--warmup", "20", "--seed", str(cfg.seed)]
    # annealing opens an AR model's causal attention gradually: for a run adapted from one, not a continued one
    extra = ["--attention-anneal", str(min(cfg.attention_anneal, steps))] if init == adapted else []
    return [*common, "--lr", str(cfg.diffusion_lr), "--warmup", str(min(100, steps // 10 + 1)),
            "--canvas", cfg.canvas, "--canvas-weights", cfg.canvas_weights, "--mask-mix", "0.2,0.6,0.2",
            "--loss-weight", "cart", "--end-rows", str(cfg.end_rows),
            "--seed", str(cfg.seed + (1 if family == "dream" else 2)), *extra]


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


def run_until(commands: dict[str, list[str]], deadline: float, log) -> dict[str, str]:
    """Run `commands` side by side until each ends or the `deadline` (a time.monotonic value) passes,
    then SIGINT the rest (a training run checkpoints on it) -> how each ended."""
    procs = {}
    for name, cmd in commands.items():
        log(f"$ {' '.join(cmd)}")
        sink = tempfile.TemporaryFile("w+")             # a file, not a pipe: a chatty command never blocks
        procs[name] = (subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True), sink)
    ended = {}
    for name, (p, sink) in procs.items():
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
            ended[name] = "finished" if p.returncode == 0 else f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            ended[name] = "stopped at the deadline"
        with sink:
            sink.seek(0)
            lines = [ln for ln in sink.read().splitlines() if not ln.startswith(NOISE)]
        log(f"[{name}: {ended[name]}]\n" + "\n".join(lines[-(40 if ended[name] == "finished" else 3):]))
    return ended


def model_folder(run: Path, log) -> Path | None:
    """`run` as a loadable model folder: itself when it finished (train writes training.json after
    the weights), else a snapshot of its checkpoint."""
    if (run / "training.json").exists():
        return run
    if not (run / "checkpoint.pt").exists():
        return None
    snap = run.with_name(run.name + "-snapshot")
    done = subprocess.run(_module("dllm_decode.tools.train", "--snapshot", str(run), "--out", str(snap)),
                          capture_output=True, text=True)
    log(f"[snapshot of {run}: exit {done.returncode}]")
    return snap if done.returncode == 0 else None


def step_rate(run: Path) -> float:
    """Steps per second of a run from its loss log, leaving out the first logged line (start-up)."""
    rows = [json.loads(line) for line in (run / "loss_log.jsonl").read_text().splitlines()]
    if len(rows) < 2:
        raise SystemExit(f"workload_stage: {run}/loss_log.jsonl has {len(rows)} lines; raise --timing-steps")
    return (rows[-1]["step"] - rows[0]["step"]) / max(rows[-1]["seconds"] - rows[0]["seconds"], 1e-9)


def train_phase(cfg: StageConfig, log) -> dict[str, Path | None]:
    start = time.monotonic()
    end = start + 60 * cfg.train_minutes
    models: dict[str, Path | None] = {}
    if cfg.ar_steps:
        run_until({"ar": train_command(cfg, "ar", cfg.out / "ar", cfg.ar_steps)},
                  min(end, start + 60 * cfg.ar_minutes), log)
        models["ar"] = model_folder(cfg.out / "ar", log)
        if models["ar"] is None:
            log("the AR run wrote no checkpoint: no diffusion phase")
            return models
        if models["ar"] != cfg.out / "ar":              # Dream adapts from the snapshot
            shutil.rmtree(cfg.out / "ar")
            models["ar"].rename(cfg.out / "ar")
            models["ar"] = cfg.out / "ar"
    else:
        models["ar"] = cfg.ar_init
    timing = {f: cfg.out / f"timing-{f}" for f in cfg.families}
    ended = run_until({f: [*train_command(cfg, f, timing[f], 10 ** 6), "--stop-after", str(cfg.timing_steps),
                           "--log-every", "1"] for f in cfg.families}, end, log)
    families = [f for f in cfg.families if ended[f] == "finished"]
    if families != list(cfg.families):
        log(f"no timing for {', '.join(f for f in cfg.families if f not in families)}: left out of the stage")
    left = end - time.monotonic()
    rate = {f: step_rate(timing[f]) for f in families}
    steps = {f: max(1, int(cfg.safety * rate[f] * left)) for f in families}
    log(f"timing: {', '.join(f'{f} {rate[f]:.2f} steps/s' for f in families)} side by side; "
        f"{left:.0f} s left: schedules of {steps}")
    for r in timing.values():
        shutil.rmtree(r, ignore_errors=True)
    run_until({f: train_command(cfg, f, cfg.out / f, steps[f]) for f in families}, end, log)
    return {**models, **{f: model_folder(cfg.out / f, log) for f in families}}


def read_phase(cfg: StageConfig, models: dict[str, Path | None], log) -> None:
    """The benches first (the accuracies the stage is for), then where each model stops: a reading
    cut by the deadline is the one that matters least."""
    end = time.monotonic() + 60 * cfg.read_minutes
    dev = ["--device", cfg.device]
    rows = [f"llada@{models[f]}" for f in cfg.families if models.get(f) is not None]
    ar = ["--ar-model", str(models["ar"])] if models.get("ar") is not None else []
    benches = ((cfg.short_tasks, cfg.gen_length), (cfg.long_tasks, cfg.long_gen_length)) if rows else ()
    for tasks, gen in benches:          # none without a diffusion model to bench
        bench = [*_module("dllm_decode", "bench"), "--recipes", *rows, "--set", "generation.block_length=32",
                 "--task", tasks, "--n", str(cfg.n), "--batch-size", str(cfg.n), "--gen-length", str(gen),
                 "--dtype", "bfloat16", *dev, *ar, "--no-progress", "--json", str(cfg.out / f"bench-{gen}.json")]
        run_until({f"bench {gen}": bench}, end, log)
    for name, path in models.items():
        if path is not None:
            probe = _module("dllm_decode.tools.probe", str(path), "--tasks", cfg.long_tasks, "--n", str(cfg.n),
                            "--gen-length", str(cfg.long_gen_length), "--stop", *dev)
            run_until({f"stop {name}": probe}, end, log)


HELP = {
    "ar_init": "the AR checkpoint the stage continues",
    "llada_init": "a LLaDA checkpoint the stage continues, instead of adapting one from the AR run",
    "tasks": "training tasks, comma-separated", "task_weights": "their sampling odds",
    "short_tasks": "tasks read at --gen-length", "long_tasks": "tasks read at --long-gen-length, and where they stop",
    "batch_tokens": "tokens per AR training step", "diffusion_batch_tokens": "tokens per diffusion training step",
    "ar_steps": "the AR schedule (0: no AR phase)",
    "ar_lr": "the AR peak rate", "ar_minutes": "the AR phase's deadline",
    "diffusion_lr": "the diffusion runs' peak rate", "end_rows": "the diffusion runs' share of end rows",
    "canvas": "the diffusion runs' canvases", "canvas_weights": "their odds, among those a batch's task fits",
    "attention_anneal": "Dream's annealing steps (DiffuLLaMA's)",
    "timing_steps": "steps of the timing run", "train_minutes": "the AR and diffusion phases' deadline",
    "read_minutes": "the readings' deadline", "safety": "share of the measured time a diffusion schedule fills",
    "n": "held-out problems per task read", "gen_length": "generation length of the short tasks",
    "long_gen_length": "generation length of the long tasks", "device": "torch device of every command",
    "threads": "CPU threads of each training run", "seed": "seed of the AR run (diffusion runs: +1, +2)",
}


def main(argv: list[str] | None = None) -> None:
    d = StageConfig(out=Path("."))
    ap = argparse.ArgumentParser(prog="python -m dllm_decode.tools.workload_stage",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="stage folder (new): runs, stage.log, bench JSON")
    for key, text in HELP.items():
        default = getattr(d, key)
        ap.add_argument(f"--{key.replace('_', '-')}", default=default, help=f"{text} (default: {default})",
                        type=str if default is None or isinstance(default, Path) else type(default))
    ap.add_argument("--families", default=",".join(d.families), help="diffusion families, comma-separated")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"--out {out}: not empty (a stage writes a new folder)")
    families = tuple(f for f in a.families.split(",") if f)
    if not set(families) <= {"dream", "llada"}:
        ap.error(f"--families {a.families}: dream and/or llada")
    if not 0 < a.safety <= 1:
        ap.error(f"--safety must be in (0, 1], got {a.safety}")
    cfg = StageConfig(**{**{k: getattr(a, k) for k in vars(a) if k not in ("out", "families")},
                         "out": out, "families": families,
                         "ar_init": Path(a.ar_init), "llada_init": Path(a.llada_init) if a.llada_init else None})
    from dllm_decode.measure.tasks import get_task, task_names
    for flag in ("tasks", "short_tasks", "long_tasks"):
        try:
            [get_task(t) for t in task_names(getattr(cfg, flag))]
        except KeyError as e:
            ap.error(f"--{flag.replace('_', '-')}: {e.args[0]}")
    if len(cfg.task_weights.split(",")) != len(task_names(cfg.tasks)):
        ap.error(f"--task-weights {cfg.task_weights}: one per task of --tasks {cfg.tasks}")
    try:
        canvas = [int(c) for c in cfg.canvas.split(",")]
    except ValueError:
        ap.error(f"--canvas {cfg.canvas}: expected comma-separated whole numbers")
    try:
        odds = [float(w) for w in cfg.canvas_weights.split(",")]
    except ValueError:
        ap.error(f"--canvas-weights {cfg.canvas_weights}: expected comma-separated numbers")
    if len(odds) != len(canvas):
        ap.error(f"--canvas-weights {cfg.canvas_weights}: one per canvas of --canvas {cfg.canvas}")
    # train refuses this too, but only once the stage has run its AR phase
    longest = max((get_task(t) for t in task_names(cfg.tasks)), key=lambda t: t.max_answer_tokens)
    if max(canvas) <= longest.max_answer_tokens:
        ap.error(f"--canvas {cfg.canvas}: task {longest.name!r} needs a canvas over {longest.max_answer_tokens}")
    for init in (cfg.ar_init, *((cfg.llada_init,) if "llada" in families and cfg.llada_init else ())):
        shape_flags(init)                       # a wrong --init is refused before any training
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stage.log", "a") as report:
        def log(text: str) -> None:
            print(text, flush=True)
            report.write(text + "\n")
            report.flush()

        read_phase(cfg, train_phase(cfg, log), log)


if __name__ == "__main__":
    main()
