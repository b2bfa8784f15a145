"""Hooks of the ``dllm_reference`` lm-eval tasks (referenced from the YAML with ``!function``).

The documents are read from the JSONL files next to this module, never from the Hub, so the
tasks run offline. Scoring is the repository's own scorer (``Task.score``: exact match of the
text after the last ``#### ``, or validity for the free-choice tasks), so an lm-eval run and
``dllm-decode bench`` give the same accuracy for the same completions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    import datasets

    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# lm-eval passes the run's metadata (model_args included) as keyword arguments; none matter here.
def load_copy(**_: Any) -> Any:
    return _load("copy")


def load_repeat(**_: Any) -> Any:
    return _load("repeat")


def load_case(**_: Any) -> Any:
    return _load("case")


def doc_to_text(doc: dict[str, Any]) -> str:
    # a function rather than a Jinja template: the prompt's trailing newline must survive
    return doc["prompt"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    from dllm_decode.measure.tasks import Problem, get_task

    problem = Problem(doc["task"], int(doc["index"]), doc["prompt"], doc["answer"], json.loads(doc["meta"]))
    return {"exact_match": int(get_task(doc["task"]).score(problem, results[0]))}
