"""tools.workload_stage: the commands it composes (Dream adapts from the AR run, each run with its
init's shape), the deadline (a command past it is sent SIGINT, which a training run answers with
a checkpoint), the step rate read from a loss log, refusals before anything runs, and (slow) a
whole stage on the small shipped models."""

import json
import sys
from pathlib import Path

import pytest

from dllm_decode.tools.workload_stage import (StageConfig, main, model_folder, run_until, shape_flags, step_rate,
                                             train_command)

MODELS = Path(__file__).resolve().parents[1] / "models"


def _flag(cmd: list[str], name: str) -> str:
    return cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1]      # the last occurrence wins, as in argparse


def test_dream_adapts_from_the_stage_ar_run_and_every_run_takes_its_init_shape(tmp_path):
    cfg = StageConfig(out=tmp_path, ar_init=MODELS / "ar-workload", llada_init=MODELS / "llada-reference")
    ar, dream, llada = (train_command(cfg, f, tmp_path / f, 40) for f in ("ar", "dream", "llada"))
    assert _flag(ar, "--init") == str(MODELS / "ar-workload") and _flag(ar, "--lr") == "0.0005"
    assert _flag(dream, "--init") == str(tmp_path / "ar") and _flag(dream, "--lr") == "0.0002"
    assert _flag(llada, "--init") == str(MODELS / "llada-reference")
    assert "--d-model=512" in dream and "--n-kv-heads=8" in dream       # the AR model's 8 heads, shared
    assert "--d-model=128" in llada and "--n-kv-heads=4" in llada
    assert _flag(dream, "--attention-anneal") == "40" and "--attention-anneal" not in llada
    assert _flag(dream, "--end-rows") == _flag(llada, "--end-rows") == "0.4" and "--end-rows" not in ar
    assert _flag(dream, "--steps") == "40" and _flag(dream, "--seed") != _flag(llada, "--seed")
    assert _flag(dream, "--canvas-weights") == _flag(llada, "--canvas-weights") == "6,1,1"
    assert "--canvas" not in ar                         # an AR model trains without a canvas
    assert _flag(ar, "--batch-tokens") == "65536"
    assert _flag(dream, "--batch-tokens") == _flag(llada, "--batch-tokens") == "4096"     # small diffusion steps
    no_ar = train_command(StageConfig(out=tmp_path, ar_init=MODELS / "ar-workload", ar_steps=0), "dream",
                          tmp_path / "dream", 40)
    assert _flag(no_ar, "--init") == str(MODELS / "ar-workload")
    adapted = train_command(StageConfig(out=tmp_path, ar_init=MODELS / "ar-workload"), "llada", tmp_path / "llada", 40)
    assert _flag(adapted, "--init") == str(tmp_path / "ar") and "--d-model=512" in adapted    # no --llada-init:
    assert _flag(adapted, "--attention-anneal") == "40"                                     # adapted as Dream is


def test_the_shape_of_a_checkpoint_is_read_from_its_training_record(tmp_path):
    flags = shape_flags(MODELS / "dream-workload")
    assert flags == ["--d-model=512", "--n-layers=4", "--n-heads=8", "--mlp-hidden=1408",
                     "--n-kv-heads=8", "--max-length=2048"]
    with pytest.raises(SystemExit, match=f"{tmp_path}/training.json: not a checkpoint"):
        shape_flags(tmp_path)


_SAVES_ON_SIGINT = ("import signal, sys, time\n"
                    "signal.signal(signal.SIGINT, lambda *a: (print('checkpoint written'), sys.exit(0)))\n"
                    "print('started', flush=True)\n"
                    "time.sleep(60)\n")


def test_a_command_past_the_deadline_is_sent_sigint_and_the_others_end_as_they_end():
    import time

    logged = []
    ended = run_until({"slow": [sys.executable, "-c", _SAVES_ON_SIGINT],
                       "quick": [sys.executable, "-c", "print('done')"],
                       "broken": [sys.executable, "-c", "raise SystemExit(3)"]},
                      time.monotonic() + 2, logged.append)
    assert ended == {"slow": "stopped at the deadline", "quick": "finished", "broken": "failed (exit 3)"}
    text = "\n".join(logged)
    assert "checkpoint written" in text and "[quick: finished]\ndone" in text


def test_a_run_counts_as_finished_only_with_its_training_record(tmp_path):
    """A run folder whose weights lack training.json (written last) is not taken as a model: its
    checkpoint is snapshotted instead; without either there is no model."""
    from dllm_decode.tools.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(family="llada", out=str(run), steps=4, batch_size=2, d_model=16, n_layers=1, n_heads=2,
                      mlp_hidden=32, canvas=(80,), canvas_weights=(1.0,), warmup=1, checkpoint_every=2,
                      stop_after=2), progress=False)
    assert model_folder(run, print) == run
    (run / "training.json").unlink()
    snap = model_folder(run, print)
    assert snap == tmp_path / "run-snapshot" and json.loads((snap / "training.json").read_text())["snapshot"]["step"] == 2
    (run / "checkpoint.pt").unlink()
    assert model_folder(run, print) is None


def test_the_step_rate_leaves_out_the_first_logged_step(tmp_path):
    rows = [{"step": 0, "seconds": 9.0}, {"step": 1, "seconds": 9.5}, {"step": 5, "seconds": 11.5}]
    (tmp_path / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert step_rate(tmp_path) == pytest.approx(5 / 2.5)
    (tmp_path / "loss_log.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SystemExit, match="raise --timing-steps"):
        step_rate(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--families", "dream,sdar"], "--families dream,sdar: dream and/or llada"),
    (["--safety", "0"], "--safety must be in (0, 1]"),
    (["--ar-init", "nowhere"], "nowhere/training.json: not a checkpoint"),
    (["--long-tasks", "ladder,nope"], "--long-tasks: unknown task 'nope'"),
    (["--task-weights", "1,2"], "--task-weights 1,2: one per task of --tasks"),
    (["--canvas-weights", "1,2"], "--canvas-weights 1,2: one per canvas of --canvas 256,512,1024"),
    (["--canvas", "256,512", "--canvas-weights", "1,1"], "--canvas 256,512: task 'ladder' needs a canvas over"),
    (["--canvas", "256,1k,x"], "--canvas 256,1k,x: expected comma-separated whole numbers"),
    (["--canvas-weights", "6,1,one"], "--canvas-weights 6,1,one: expected comma-separated numbers"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, argv, message, capsys):
    out = tmp_path / "stage"
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--device", "cpu", *argv])
    assert message in (capsys.readouterr().err + str(e.value.code)) and not out.exists()


def test_a_stage_writes_a_new_folder(tmp_path, capsys):
    (tmp_path / "old").write_text("kept")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--device", "cpu"])
    assert "not empty" in capsys.readouterr().err and (tmp_path / "old").read_text() == "kept"


@pytest.mark.slow
def test_a_whole_stage_on_the_small_models(tmp_path):
    """The three phases on the shipped small models, a few steps each, on the CPU (about two minutes)."""
    out = tmp_path / "stage"
    main(["--out", str(out), "--device", "cpu", "--ar-init", str(MODELS / "ar-reference"),
          "--llada-init", str(MODELS / "llada-reference"), "--tasks", "copy", "--task-weights", "1",
          "--short-tasks", "copy", "--long-tasks", "chain", "--batch-tokens", "2048",
          "--diffusion-batch-tokens", "2048", "--ar-steps", "2",
          "--timing-steps", "3", "--train-minutes", "1", "--read-minutes", "2", "--n", "2",
          "--gen-length", "64", "--long-gen-length", "160", "--threads", "1"])
    for f in ("ar", "dream", "llada"):          # finished, or stopped at the deadline and snapshotted
        assert any((out / name / "model.safetensors").exists() for name in (f, f"{f}-snapshot"))
        assert not (out / f"timing-{f}").exists()
    report = (out / "stage.log").read_text()
    assert report.count("[stop ") == 3 and "steps/s side by side" in report
    bench = json.loads((out / "bench-64.json").read_text())
    assert len(bench["rows"]) == 3
