"""lm-evaluation-harness integration: the ``dllm_decode`` LM, its Monte-Carlo likelihood, the
data-parallel process group, per-request logs and the shipped offline reference task.

Importing this package does not import lm-eval; :mod:`dllm_decode.harness.lm` does (and
registers the model under the name ``dllm_decode``).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
