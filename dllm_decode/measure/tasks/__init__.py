"""Seeded tasks with checkable answers, for training and measuring the reference models.

    from dllm_decode.measure.tasks import get_task
    probs = get_task("repeat").problems("test", 200, seed=0)
    ok = get_task("repeat").score(probs[0], completion_text)
"""

from __future__ import annotations

from dllm_decode.measure.tasks.base import Problem, ProblemStream, Task, extract_answer, split_of
from dllm_decode.measure.tasks.catalog import Add, Case, Copy, Distinct, Repeat
from dllm_decode.measure.tasks.workload import (Chain, Columns, ColumnsShort, Echo, Ladder, ListOps, ListOpsShort,
                                                Series)

TASKS: dict[str, type[Task]] = {t.name: t for t in (Copy, Repeat, Distinct, Case, Add,
                                                    Echo, Chain, Columns, ListOps, Series, Ladder,
                                                    ColumnsShort, ListOpsShort)}
REFERENCE_MIX = ("copy", "repeat", "case")     # what the shipped reference models learned
# what the workload models learn: multi-step worked traces, one long answer, and a copy control.
# The control is the fixed-length copy: echo's variable-length copy of random letters needs a
# content lookup (a letter recurs about n/26 times in the prompt) that a 12.8M-parameter AR model
# had not found after 5000 steps (its echo loss stayed at chance, 3.16 nats, while the other
# tasks' fell); a fixed offset is found in a few hundred steps. Echo stays as a harder task.
WORKLOAD_MIX = ("copy", "chain", "columns", "listops", "series")
MIXES: dict[str, tuple[str, ...]] = {"reference": REFERENCE_MIX, "workload": WORKLOAD_MIX}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def task_names(text: str) -> tuple[str, ...]:
    """The task names a ``--tasks`` flag gives: a named mix, or names separated by commas."""
    return MIXES[text] if text in MIXES else tuple(text.split(","))


def get_mix(name: str) -> tuple[str, ...]:
    """The task names of a named mix ('reference', 'workload')."""
    try:
        return MIXES[name]
    except KeyError:
        raise KeyError(f"unknown task mix {name!r}; known: {', '.join(MIXES)}") from None


__all__ = ["Problem", "ProblemStream", "Task", "TASKS", "REFERENCE_MIX", "WORKLOAD_MIX", "MIXES",
           "get_task", "get_mix", "task_names", "extract_answer", "split_of"]
