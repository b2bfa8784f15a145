"""``dllm-decode eval ...``: lm-eval's own command line with the ``dllm_decode`` model registered.

Every argument goes to lm-eval unchanged, so ``dllm-decode eval --model dllm_decode
--model_args model=DIR,recipe=NAME --tasks T`` behaves as ``lm_eval`` would if it knew the
model. One addition: unless ``--include_path`` is given, the shipped offline tasks
(``dllm_reference`` and its parts) are put on lm-eval's task path.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from dllm_decode.harness import TASKS_DIR

_SUBCOMMANDS = ("run", "ls", "validate")


def with_shipped_tasks(args: Sequence[str]) -> list[str]:
    """``args`` plus ``--include_path <shipped tasks>`` where lm-eval takes one and none is given."""
    out = list(args)
    if not out or out[0] in ("-h", "--help"):
        return out
    if any(a == "--include_path" or a.startswith("--include_path=") for a in out):
        return out
    if out[0] in _SUBCOMMANDS or out[0].startswith("-"):
        # lm-eval inserts `run` itself when no subcommand is given
        return out + ["--include_path", str(TASKS_DIR)]
    return out


def main(argv: Sequence[str]) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("dllm-decode eval: lm-eval is not installed; pip install 'dllm-decode[eval]'", file=sys.stderr)
        return 2
    import dllm_decode.harness.lm  # noqa: F401  (registers the `dllm_decode` model)

    _show_logs()

    saved = sys.argv
    # lm-eval's command line reads sys.argv itself (and inserts `run` there when needed)
    sys.argv = ["dllm-decode eval", *with_shipped_tasks(argv)]
    try:
        cli_evaluate()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
        _leave_process_group()
    return code


def _show_logs() -> None:
    # lm-eval's command line configures only its own logger; the model's speed summaries and
    # warnings are wanted next to lm-eval's lines
    logger = logging.getLogger("dllm_decode")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [%(name)s] %(message)s",
                                               datefmt="%Y-%m-%d:%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _leave_process_group() -> None:
    # the model joined the launcher's group; leaving it cleanly avoids teardown warnings and
    # lets every rank exit together
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
