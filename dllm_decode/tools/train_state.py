"""The resumable state of a training run: one ``checkpoint.pt`` in the run's folder holding the
weights, the optimizer, the schedule position, every random state and the data streams' positions,
so that ``train --resume DIR`` continues to the very weights an uninterrupted run reaches.

The file is written to a temporary name and renamed, so an interruption while writing leaves the
previous checkpoint intact. It holds only tensors and plain Python values and loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"


@dataclass
class Progress:
    """What a run has done so far, beside its modules and random states."""
    step: int = 0                   # the next step of the schedule to run
    running: float | None = None    # the smoothed loss of the log
    elapsed: float = 0.0            # seconds spent by earlier sessions of this run


def _py_state(rng: random.Random) -> tuple:
    return rng.getstate()


def _set_py_state(rng: random.Random, state) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def save_checkpoint(out: Path, config: dict[str, Any], progress: Progress, model: torch.nn.Module,
                    opt: torch.optim.Optimizer, batcher, gen: torch.Generator,
                    canvas_rng: random.Random, extra: dict[str, Any] | None = None) -> Path:
    """Write `out`/checkpoint.pt atomically -> its path. `extra`: plain values the run needs
    back (the --init checkpoint's record)."""
    state = {
        "config": config,
        "extra": extra or {},
        "progress": {"step": progress.step, "running": progress.running, "elapsed": progress.elapsed},
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "random": {
            "batcher": _py_state(batcher.rng),
            "streams": [s.state_dict() for s in batcher.streams],
            "mask": gen.get_state(),
            "canvas": _py_state(canvas_rng),
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
        },
    }
    path = Path(out) / CHECKPOINT
    # a name of this process's own: two writers never replace each other's half-written file
    tmp = path.with_name(f"{CHECKPOINT}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(out: Path, flag: str = "--resume") -> dict[str, Any]:
    """The checkpoint dict of run folder `out`; a clear error naming `flag` (the option that named
    the folder) when there is none or it does not load."""
    path = Path(out) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{flag} {out}: no {CHECKPOINT} (a run folder written by train with "
                                "checkpointing, or stopped by --stop-after)")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:      # truncated, not a checkpoint, ...: one line naming the file, not a traceback
        raise ValueError(f"{flag} {out}: {path} does not load as a checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def restore(state: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer, batcher,
            gen: torch.Generator, canvas_rng: random.Random) -> Progress:
    """Load a checkpoint dict into freshly built run objects -> the run's progress."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    r = state["random"]
    _set_py_state(batcher.rng, r["batcher"])
    if len(r["streams"]) != len(batcher.streams):
        raise ValueError(f"checkpoint has {len(r['streams'])} task streams, the run {len(batcher.streams)}")
    for stream, s in zip(batcher.streams, r["streams"]):
        stream.load_state_dict(s)
    gen.set_state(r["mask"])
    _set_py_state(canvas_rng, r["canvas"])
    torch.set_rng_state(r["torch"])
    _set_py_state(random, r["python"])
    p = state["progress"]
    return Progress(step=p["step"], running=p["running"], elapsed=p["elapsed"])
