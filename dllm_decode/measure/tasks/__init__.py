"""Seeded tasks with checkable answers, for training and measuring the reference models.

    from dllm_decode.measure.tasks import get_task
    probs = get_task("repeat").problems("test", 200, seed=0)
    ok = get_task("repeat").score(probs[0], completion_text)
"""

from __future__ import annotations

from dllm_decode.measure.tasks.base import Problem, Task, extract_answer, split_of
from dllm_decode.measure.tasks.catalog import Add, Case, Copy, Distinct, Repeat

TASKS: dict[str, type[Task]] = {t.name: t for t in (Copy, Repeat, Distinct, Case, Add)}
REFERENCE_MIX = ("copy", "repeat", "case")     # what the shipped reference models learned


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


__all__ = ["Problem", "Task", "TASKS", "REFERENCE_MIX", "get_task", "extract_answer", "split_of"]
