"""The shipped lm-eval task data: held-out problems of the reference tasks as JSONL.

Each file holds the first ``N`` problems of a task's test stream for seed 0, exactly the
problems ``dllm-decode bench --task NAME --n N`` decodes, so an lm-eval run with ``--limit n``
and a bench run with ``--n n`` see the same prompts in the same order. Regenerate with::

    python -m dllm_decode.harness.task_data --write        # rewrite the JSONL files
    python -m dllm_decode.harness.task_data --check        # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dllm_decode.measure.tasks import REFERENCE_MIX, get_task

TASK_DIR = Path(__file__).resolve().parent / "tasks" / "dllm_reference"
PROBLEMS_PER_TASK = 200
SEED = 0


def task_file(name: str) -> Path:
    return TASK_DIR / f"{name}.jsonl"


def records(name: str, n: int = PROBLEMS_PER_TASK, seed: int = SEED) -> list[dict[str, Any]]:
    """One JSON-ready record per problem. ``meta`` is stored as a JSON string: its shape differs
    between tasks (and is empty for some), which an Arrow table cannot hold as one column type."""
    out = []
    for p in get_task(name).problems("test", n, seed):
        out.append({"task": p.task, "index": p.index, "prompt": p.prompt, "answer": p.answer,
                    "target": p.target, "meta": json.dumps(p.meta, sort_keys=True)})
    return out


def render(name: str) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records(name))


def stale() -> list[str]:
    """Names of the tasks whose shipped file differs from what the generators produce now."""
    return [name for name in REFERENCE_MIX
            if not task_file(name).exists() or task_file(name).read_text() != render(name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dllm_decode.harness.task_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the shipped JSONL files")
    mode.add_argument("--check", action="store_true", help="exit 1 if a shipped file is stale")
    args = parser.parse_args(argv)
    if args.write:
        for name in REFERENCE_MIX:
            task_file(name).write_text(render(name))
            print(f"wrote {task_file(name).name}: {PROBLEMS_PER_TASK} problems")
        return 0
    bad = stale()
    for name in bad:
        print(f"{task_file(name).name} is stale; run with --write", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
