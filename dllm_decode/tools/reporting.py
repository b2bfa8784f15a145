"""Helpers the maintainer reports share: the machine line, held-out problem sets, the
ratio table and writing a table between a document's markers."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable

import torch

from dllm_decode.measure.bench import machine_info
from dllm_decode.measure.tasks import get_task


def held_out(tasks, n: int, seed: int):
    return [p for name in tasks for p in get_task(name).problems("test", n, seed)]


def machine(device: str = "cpu", dtype: str = "float32") -> str:
    """The measuring machine in one line: the GPU's name on a CUDA device, else the CPU's
    architecture and threads (the fields `measure.bench.machine_info` records)."""
    info = machine_info(device, dtype)
    where = info["device"] if torch.device(device).type == "cuda" else \
        f"{platform.machine()}, {info['threads']} threads"
    return f"{where}, torch {info['torch']}, {dtype}, batch decoding"


#: a table column: (header, cell of a row given the first row of the same model)
Column = tuple[str, Callable[[dict, dict], str]]


def ratio_table(rows: list[dict], tasks, lead: list[Column], tail: list[Column]) -> str:
    """Markdown table of measured rows: the ``lead`` columns left-aligned, one accuracy column
    per task and the ``tail`` columns right-aligned. Ratios in ``tail`` get the first row of the
    row's model as their baseline."""
    task_cols: list[Column] = [(t, lambda r, b, t=t: f"{r['tasks'][t]['accuracy']:.2f}") for t in tasks]
    right = task_cols + tail
    lines = ["| " + " | ".join(h for h, _ in lead + right) + " |",
             "|" + "---|" * len(lead) + "---:|" * len(right)]
    base: dict[str, dict] = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        lines.append("| " + " | ".join(cell(r, b) for _, cell in lead + right) + " |")
    return "\n".join(lines)


def write_between_markers(path: Path, table: str, start: str, end: str) -> None:
    """Replace what lies between the report markers of ``path``; the rest of the file stays."""
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no {start} ... {end} markers to write the table between")
    head, rest = text.split(start, 1)
    path.write_text(f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")
