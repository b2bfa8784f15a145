"""Data-parallel scale-out: `accelerate launch --num_processes 2 -m dllm_decode eval ...` on the
CPU (gloo), offline, against the same evaluation in one process: the same answer for every
document, the same aggregate, and one request log per rank."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from dllm_decode.harness import TASKS_DIR  # noqa: E402
from dllm_decode.harness.distributed import ProcessGroup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "llada-reference")
SMALL = {"generation.gen_length": 32, "generation.block_length": 32, "generation.steps": 16}
LIMIT = 3          # odd: the ranks get 2 and 1 documents per task, so lm-eval pads rank 1


def test_single_process_group_is_the_identity():
    group = ProcessGroup.single(torch.device("cpu"))
    t = torch.tensor(5)
    assert group.all_gather(t) is t and group.gather_object({"a": 1}) == [{"a": 1}]
    group.barrier()
    group.close()


def _one_process(log_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dllm_decode.harness.lm import DllmDecodeLM

    lm = DllmDecodeLM(model=MODEL, recipe="llada", batch_size=1, log_dir=str(log_dir), **SMALL)
    return lm_eval.simple_evaluate(model=lm, tasks=["dllm_reference"], limit=LIMIT, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))


@pytest.mark.usefixtures("one_torch_thread")     # as the ranks' OMP_NUM_THREADS=1
def test_two_processes_match_one(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        launcher = shutil.which("accelerate")
    assert launcher, "accelerate's launcher is not installed"
    model_args = ",".join([f"model={MODEL}", "recipe=llada", f"log_dir={tmp_path / 'log2'}",
                           *(f"{k}={v}" for k, v in SMALL.items())])
    # accelerate's --cpu launcher starts one process; --multi_gpu is its torchrun launcher,
    # which on a machine without (visible) GPUs starts CPU ranks that join a gloo group
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "dllm_decode", "eval", "--model", "dllm_decode", "--model_args", model_args,
           "--tasks", "dllm_reference", "--limit", str(LIMIT), "--batch_size", "2", "--device", "cpu",
           "--log_samples", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "on rank 1" in out.stderr                # two ranks really took part
    assert "dllm_decode rank 0: generated" in out.stderr and "dllm_decode rank 1: generated" in out.stderr

    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    two = {}
    for f in (tmp_path / "out").rglob("samples_*.jsonl"):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            two[(s["doc"]["task"], s["doc_id"])] = (s["filtered_resps"][0], s["exact_match"])

    ref = _one_process(tmp_path / "log1")
    one = {(s["doc"]["task"], s["doc_id"]): (s["filtered_resps"][0], s["exact_match"])
           for samples in ref["samples"].values() for s in samples}
    assert len(one) == 3 * LIMIT and two == one
    for name in ("dllm_reference", "dllm_reference_copy", "dllm_reference_repeat", "dllm_reference_case"):
        assert results["results"][name]["exact_match,none"] == pytest.approx(ref["results"][name]["exact_match,none"])

    # one log per rank, the documents split between them (rank 1 also answers lm-eval's padding)
    logs = {r: [json.loads(line) for line in (tmp_path / "log2" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    docs = {r: {(rec["task"], rec["doc_id"]) for rec in recs} for r, recs in logs.items()}
    assert docs[0] and docs[1] and not docs[0] & docs[1]
    assert len(docs[0] | docs[1]) == 3 * LIMIT
    assert all(rec["rank"] == r and rec["nfe"] == 16 for r, recs in logs.items() for rec in recs)
