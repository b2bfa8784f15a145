"""The console script: generate --json, plugins --json, errors on stderr with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm_decode.tools.demo_model import make_demo_model

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("dllm-decode"))


def _run(*args, cwd=ROOT):
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_demo_model(tmp_path_factory.mktemp("tiny") / "llada", seed=1)


def test_generate_json_from_ids_and_text(model_dir):
    out = _run("generate", "--model", str(model_dir), "--recipe", "llada", "--set", "generation.gen_length=16",
               "--set", "generation.block_length=8", "--set", "generation.steps=8", "--set", "generation.batch_size=2",
               "--input-ids", "6,7,8", "1+1=", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    rows = data["rows"]
    assert len(rows) == 2 and rows[0]["prompt_ids"] == [6, 7, 8]
    for row in rows:
        assert set(row) >= {"token_ids", "text", "nfe", "steps", "seconds"}
        assert len(row["token_ids"]) == 16 and row["nfe"] == 8 and row["steps"] == 8
        assert isinstance(row["text"], str)
    assert "Do you wish to run the custom code" not in out.stdout + out.stderr


def test_generate_matches_the_library(model_dir):
    from dllm_decode.config import load_recipe
    from dllm_decode.engine import Decoder
    from dllm_decode.models import load_model

    out = _run("generate", "--model", str(model_dir), "--input-ids", "9,10,11", "--json",
               "--set", "generation.gen_length=8", "--set", "generation.block_length=8", "--set", "generation.steps=8")
    model, tok = load_model(model_dir)
    recipe = load_recipe(ROOT / "recipes" / "llada.yaml", overrides=["generation.gen_length=8",
                                                                     "generation.block_length=8", "generation.steps=8"])
    assert json.loads(out.stdout)["rows"][0]["token_ids"] == Decoder(model, recipe).generate([[9, 10, 11]]).tokens[0]


def test_recipe_errors_exit_2_and_name_the_key(model_dir):
    out = _run("generate", "--model", str(model_dir), "--input-ids", "5", "--set", "score.remaskin=x")
    assert out.returncode == 2
    assert "--set score.remaskin=x: score.remaskin: unknown parameter" in out.stderr


def test_unknown_recipe_name():
    out = _run("generate", "--recipe", "nosuch", "--input-ids", "5")
    assert out.returncode == 2 and "no shipped recipe of that name" in out.stderr


def test_plugins_json():
    out = _run("plugins", "--json")
    assert out.returncode == 0, out.stderr
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    llada = plugins["llada"]
    assert llada["distribution"] == "dllm-decode" and llada["version"]
    assert llada["slots"] == ["choose_span", "score", "select_tokens"]
    assert {"name": "remasking", "default": "low_confidence"}.items() <= llada["parameters"][0].items()
    assert plugins["none"]["exact"] is True


def test_plugins_table_and_block():
    out = _run("plugins", "--block", "none")
    assert out.returncode == 0
    assert "llada" in out.stdout and "\nnone " not in out.stdout


def test_generate_scores_held_out_task_problems():
    out = _run("generate", "--model", "models/llada-reference", "--task", "copy,repeat", "--n", "2", "--json",
               "--set", "generation.steps=24")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    assert [r["task"] for r in rows] == ["copy", "copy", "repeat", "repeat"]
    assert all(isinstance(r["correct"], bool) and r["nfe"] == 24 for r in rows)
    bad = _run("generate", "--model", "models/llada-reference", "--task", "nope")
    assert bad.returncode == 2 and "unknown task 'nope'" in bad.stderr


def test_task_flag_takes_a_named_mix():
    """`--task workload` means the workload mix's tasks, as `--tasks` does in the training tools."""
    import argparse

    from dllm_decode.cli import _task_problems
    from dllm_decode.measure.tasks import WORKLOAD_MIX

    problems = _task_problems(argparse.Namespace(task="workload", n=1, task_seed=0))
    assert [p.task for p in problems] == list(WORKLOAD_MIX)


def test_model_card_command_writes_the_table(tmp_path):
    import shutil

    card = tmp_path / "llada-reference"
    shutil.copytree(ROOT / "models" / "llada-reference", card)
    (card / "README.md").unlink()
    out = subprocess.run([sys.executable, "-m", "dllm_decode.tools.model_card", str(card), "--n", "2", "--grid-n", "0",
                          "--write"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = (card / "README.md").read_text()
    assert "| 1 | full |" in text and "| 4 | full |" in text and "python -m dllm_decode.tools.train --family llada" in text
    assert "--stop-after 100 --check" in text     # the quick reproduction check
    assert json.loads((card / "eval.json").read_text())["tables"][0]["rows"][0]["tokens_per_step"] == 1


def test_model_card_names_the_dtype_and_device_it_decoded_with(tmp_path):
    """--dtype reaches the machine line, eval.json and the re-measure command, and --render keeps
    them; a device torch cannot use here is refused in one line before anything loads."""
    import shutil

    card = tmp_path / "llada-reference"
    shutil.copytree(ROOT / "models" / "llada-reference", card)
    run = [sys.executable, "-m", "dllm_decode.tools.model_card", str(card), "--n", "2", "--grid-n", "0"]
    out = subprocess.run(run + ["--dtype", "bfloat16", "--write"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    stored = json.loads((card / "eval.json").read_text())
    assert stored["dtype"] == "bfloat16" and stored["machine"].endswith("bfloat16, batch decoding")
    for step in ("written", "rendered"):
        text = (card / "README.md").read_text()
        assert "--n 2 --grid-n 0 --dtype bfloat16 --write" in text, step
        assert "torch 2" in text and "bfloat16, batch decoding" in text, step
        out = subprocess.run([*run[:4], "--render"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    if not torch.cuda.is_available():
        out = subprocess.run(run + ["--device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "--device 'cuda'" in out.stderr and "use cpu" in out.stderr


def test_model_card_of_a_gpu_trained_diffusion_model_adapted_from_ar(tmp_path):
    """dream-workload: trained on a GPU from an AR first stage. Its card names the GPU, prints
    --device in the training commands but not in the CPU check of the first stage's first steps,
    describes its batches in tokens, and gives the diffusion stage's canvases (not the AR
    stage's defaults); its re-measure command keeps the tasks and generation length."""
    import shutil

    card = tmp_path / "dream-workload"
    card.mkdir()
    for f in ("config.json", "training.json", "eval.json"):
        shutil.copy(ROOT / "models" / "dream-workload" / f, card / f)
    out = subprocess.run([sys.executable, "-m", "dllm_decode.tools.model_card", str(card), "--render"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = (card / "README.md").read_text()
    meta = json.loads((card / "training.json").read_text())
    assert f"on one {meta['device_name']} GPU (`--device cuda`)" in text and "65,536 padded tokens a batch" in text
    from dllm_decode.tools.model_card import training_stages

    n = len(training_stages(meta, "models/dream-workload"))
    commands = [line for line in text.splitlines() if line.startswith("python -m dllm_decode.tools.train")]
    assert n >= 3 and len(commands) == n + 1 and all("--device cuda" in c for c in commands[:n])
    assert "--stop-after 11 --check" in commands[n] and "--device" not in commands[n]
    assert "--family ar" in commands[0] and "--family ar" in commands[n]
    for word in ("second", "third", "fourth", "fifth", "sixth")[:n - 1]:
        assert f"The {word} stage starts from the weights of the one before" in text
    assert "a canvas of 256/512/1024 tokens" in text and "96/128/256" not in text
    assert "--tasks copy,chain --gen-length 256 --write" in text


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "models").iterdir() if (p / "eval.json").exists()))
def test_shipped_cards_are_what_their_records_render(name, monkeypatch):
    """Every shipped card is the card its training.json and eval.json render today (up to its
    hand-written Limitations): a change to the card's text, or a record edited by hand, shows here."""
    from dllm_decode.tools.model_card import KEEP, is_ar_checkpoint, rerender

    monkeypatch.chdir(ROOT)
    path = Path("models") / name
    shipped = (path / "README.md").read_text()
    assert rerender(path, is_ar_checkpoint(path), dry=True) == shipped.split("\n" + KEEP)[0]


def test_model_card_render_rebuilds_the_card_from_eval_json(tmp_path):
    """--render rewrites README.md from the stored tables without decoding: the rows come from
    eval.json (a changed number there shows up in the card) and the machine line is the stored one."""
    import shutil

    card = tmp_path / "dream-reference"
    shutil.copytree(ROOT / "models" / "dream-reference", card)
    stored = json.loads((card / "eval.json").read_text())
    stored["tables"][0]["rows"][0]["tasks"]["copy"]["accuracy"] = 0.123
    stored["machine"] = "elsewhere, 7 threads"
    (card / "eval.json").write_text(json.dumps(stored))
    training = json.loads((card / "training.json").read_text())
    training["config"]["full_mask"] = 0.1       # a non-default option reaches the command and the prose
    (card / "training.json").write_text(json.dumps(training))
    (card / "README.md").unlink()
    out = subprocess.run([sys.executable, "-m", "dllm_decode.tools.model_card", str(card), "--render"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = (card / "README.md").read_text()
    assert "| 0.123 |" in text and "Machine: elsewhere, 7 threads." in text
    assert f"--check {card.as_posix()}" in text
    assert "--full-mask 0.1" in text and "A share 0.10 of the rows instead mask the whole answer" in text
    # a checkpoint trained in stages shows each stage's command, the first stage's flags in the
    # reproduction check, and what the later stage changed
    first = training["init"]["config"]
    assert f"--out {training['config']['init']} --steps {first['steps']}" in text
    assert f"--out {card.as_posix()} --init {training['config']['init']}" in text
    check = text.split("--stop-after 100")[0].splitlines()[-1]
    assert f"--steps {first['steps']}" in check and "--init" not in check
    assert f"--threads {first['threads']}" in check     # the count the weights depend on
    assert f"The second stage starts from the weights of the one before and trains {training['config']['steps']}" in text


# ----------------------------------------------------------------------------- bad input


def _one_line_error(capsys, args, *needles):
    """The CLI refuses ``args`` with exit code 2 and one error line naming ``needles``, no traceback."""
    from dllm_decode.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dllm-decode: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_broken_checkpoints_are_one_line_naming_the_file(tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ROOT / "models" / "llada-reference", bad)
    (bad / "config.json").write_text('{"model_type": "llada", ')
    _one_line_error(capsys, ["generate", "--model", str(bad), "--task", "copy"], str(bad / "config.json"))
    shutil.copy(ROOT / "models" / "llada-reference" / "config.json", bad / "config.json")
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    _one_line_error(capsys, ["generate", "--model", str(bad), "--task", "copy"], str(bad / "model.safetensors"),
                    "truncated")
    _one_line_error(capsys, ["generate", "--model", "models/ar-reference", "--task", "copy"],
                    "models/ar-reference/config.json", "LlamaForCausalLM", "--ar-model")


def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys):
    import torch

    png = str(tmp_path / "t.png")
    _one_line_error(capsys, ["generate", "--task", "copy", "--n", "-2"], "--n -2")
    _one_line_error(capsys, ["bench", "--recipes", "llada", "--n", "0"], "--n 0", "at least 1")
    _one_line_error(capsys, ["trace", "--index", "-1", "--out", png], "--index -1")
    _one_line_error(capsys, ["generate", "--input-ids", ""], "--input-ids", "empty")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["generate", "--task", "copy", "--device", "cuda"], "--device 'cuda'", "no CUDA")
        _one_line_error(capsys, ["generate", "--task", "copy", "--set", "model.device=cuda"], "--set model.device")


def test_prompts_outside_the_vocabulary_and_empty_prompts_are_refused(capsys):
    _one_line_error(capsys, ["generate", "--model", "models/llada-reference", "copy: ab\\c\n"],
                    "prompt 1", "character '\\\\' at position 8", "vocabulary")
    _one_line_error(capsys, ["generate", "--model", "models/llada-reference", "copy: abc\n", "é"],
                    "prompt 2", "character 'é' at position 0")
    _one_line_error(capsys, ["generate", "--model", "models/llada-reference", ""], "prompt 1: empty prompt")


def test_gen_length_device_dtype_flags_and_the_default_model(capsys):
    from dllm_decode.cli import main

    assert main(["generate", "--gen-length", "32", "--dtype", "float64", "--device", "cpu", "--json",
                 "pick one of 3 5, seven times\n"]) == 0
    out = capsys.readouterr()
    row = json.loads(out.out)["rows"][0]
    assert len(row["token_ids"]) == 32 and row["nfe"] == 32         # one block, one token per forward
    assert "using the shipped reference model models/llada-reference" in out.err
    # a recipe of several blocks keeps its block length, which must divide the new length
    assert main(["generate", "--recipe", "llada-random", "--gen-length", "48", "--input-ids", "5"]) == 2
    err = capsys.readouterr().err
    assert "llada-random.yaml with --gen-length 48: generation:" in err and "must divide" in err   # the flag typed
    assert main(["generate", "--recipe", "llada", "--gen-length", "48", "--set", "generation.block_length=32",
                 "--input-ids", "5"]) == 2
    assert "with --set generation.block_length=32, --gen-length 48: generation:" in capsys.readouterr().err


def test_outside_a_checkout_a_missing_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from dllm_decode import cli

    monkeypatch.setattr(cli, "shipped_model", lambda: tmp_path / "no-checkout")
    _one_line_error(capsys, ["generate", "--input-ids", "5"], "no model: pass --model DIR")


def test_task_summary_goes_to_stdout_and_bench_labels_rows_by_recipe_name(tmp_path):
    out = _run("generate", "--model", "models/llada-reference", "--task", "repeat", "--gen-length", "32")
    assert out.returncode == 0 and "exact match" in out.stdout and "exact match" not in out.stderr
    recipe = tmp_path / "my-file.yaml"
    recipe.write_text("name: my-policy\npolicy: llada\ngeneration: {gen_length: 32, block_length: 32, steps: 32}\n")
    out = _run("bench", "--recipes", str(recipe), "--task", "repeat", "--n", "1", "--no-warmup")
    assert out.returncode == 0, out.stderr
    assert "| my-policy |" in out.stdout and "my-file" not in out.stdout


def _task_prompts(n):
    from dllm_decode.measure.tasks import get_task

    return [p.prompt for name in ("copy", "case") for p in get_task(name).problems("test", n)]


def test_generate_stream_writes_the_same_text_when_not_a_terminal(capsys):
    from dllm_decode.cli import main

    prompts = _task_prompts(1)
    for batch in ([prompts[0]], prompts):
        assert main(["generate", "--recipe", "threshold", "--gen-length", "64", *batch]) == 0
        plain = capsys.readouterr().out
        assert main(["generate", "--recipe", "threshold", "--gen-length", "64", "--stream", *batch]) == 0
        streamed = capsys.readouterr().out
        assert streamed == plain and "\x1b[" not in streamed


def test_stream_redraws_the_canvas_on_a_terminal():
    import io

    from dllm_decode.config import load_recipe
    from dllm_decode.engine import Decoder
    from dllm_decode.models import load_model
    from dllm_decode.serve.terminal import MASK, stream_to

    model, tok = load_model(ROOT / "models" / "llada-reference")
    dec = Decoder(model, load_recipe("llada", overrides=["generation.gen_length=32", "generation.block_length=32",
                                                         "generation.steps=16"]), tokenizer=tok)
    prompts = [tok.encode(p, add_special_tokens=False) for p in _task_prompts(1)]
    out = io.StringIO()
    texts = stream_to(out, dec, prompts, tok, tty=True)
    frames = out.getvalue().split("\x1b[2F")                       # one redraw per step after the first
    assert len(frames) == 16
    first = [line.removeprefix("\x1b[2K") for line in frames[0].splitlines()]
    # after the first step each row shows its masks (those after a committed stop id are cut)
    assert len(first) == 2 and all(line.count(MASK) >= 20 and len(line) <= 32 for line in first)
    last = [line.removeprefix("\x1b[2K") for line in frames[-1].splitlines()]
    assert last == [t.replace("\n", "⏎") for t in texts] and all(MASK not in line for line in last)
    assert texts == [r.text for r in dec.generate(prompts).rows]


def test_bad_output_paths_are_refused_before_anything_is_decoded(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    png = str(tmp_path / "t.png")
    bench = ["bench", "--recipes", "threshold", "--task", "case", "--n", "1", "--no-warmup"]
    cases = [(bench + ["--json", str(missing / "out.json")], ["--json", "no folder"]),
             (bench + ["--plot", str(missing / "x.png")], ["--plot", "no folder"]),
             (bench + ["--plot", str(tmp_path / "x.txt")], ["--plot", ".txt is not an image format", ".png"]),
             (bench + ["--json", str(tmp_path)], ["--json", "a folder"]),
             (["trace", "--out", str(missing / "t.png")], ["--out", "no folder"]),
             (["trace", "--out", str(tmp_path / "t.txt")], ["--out", ".txt is not an image format"]),
             (["trace", "--out", str(tmp_path / "t")], ["--out", "no suffix"]),
             (["trace", "--out", png, "--json", str(missing / "t.json")], ["--json", "no folder"])]
    for args, needles in cases:
        _one_line_error(capsys, args, *needles)
    assert list(tmp_path.iterdir()) == []          # the checks leave no file behind


def _removing_after(monkeypatch, module, name, folder):
    """Run the real ``module.name``, then remove ``folder``: an output path that was writable when
    the run started and is not by its end."""
    import shutil

    real = getattr(module, name)

    def run(*args, **kwargs):
        out = real(*args, **kwargs)
        shutil.rmtree(folder)
        return out
    monkeypatch.setattr(module, name, run)


def test_an_output_that_fails_at_the_end_keeps_the_others(tmp_path, monkeypatch, capsys):
    from dllm_decode.cli import main
    from dllm_decode.measure import bench, trace

    gone = tmp_path / "gone"
    gone.mkdir()
    _removing_after(monkeypatch, bench, "run_bench", gone)
    assert main(["bench", "--recipes", "threshold", "--task", "case", "--n", "1", "--no-warmup", "--gen-length", "32",
                 "--plot", str(gone / "p.png"), "--json", str(tmp_path / "b.json")]) == 2
    out = capsys.readouterr()
    assert "| threshold |" in out.out and "Traceback" not in out.err
    assert f"could not write --plot {gone / 'p.png'}: No such file or directory (--json written)" in out.err
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["problems"]

    gone.mkdir()
    _removing_after(monkeypatch, trace, "trace_record", gone)
    assert main(["trace", "--gen-length", "32", "--out", str(tmp_path / "t.png"),
                 "--json", str(gone / "t.json")]) == 2
    assert "could not write --json" in capsys.readouterr().err
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_prompts_are_numbered_as_the_user_gave_them(tmp_path, capsys):
    model = ["generate", "--model", "models/llada-reference"]
    _one_line_error(capsys, [*model, "copy: abc\n", "a" * 2000], "prompt 2 has 2000 tokens")
    _one_line_error(capsys, [*model, "--input-ids", "5", "--input-ids", "5,999"],
                    "prompt 2 has token ids outside the vocabulary")
    # both kinds: --input-ids rows come first, as they are decoded and printed
    _one_line_error(capsys, [*model, "--input-ids", "5", "xÄ"], "prompt 2 (text prompt 1): character 'Ä'")
    _one_line_error(capsys, [*model, "--input-ids", "5", "a" * 2000], "prompt 2 (text prompt 1) has 2000 tokens")
    _one_line_error(capsys, [*model, "--input-ids", "5", ""], "prompt 2 (text prompt 1): empty prompt")
    line = _one_line_error(capsys, ["trace", "--input-ids", "5,999", "--out", str(tmp_path / "t.png")],
                           "--input-ids has token ids outside")
    assert "prompt 0" not in line


def test_generate_task_says_when_answers_cannot_fit_the_generation_length(capsys):
    from dllm_decode.cli import main

    assert main(["generate", "--task", "copy", "--n", "1", "--gen-length", "32", "--recipe", "threshold"]) == 0
    err = capsys.readouterr().err
    assert "generate: generation length 32 is shorter than the reference answers of 1 of 1 `copy`" in err


def test_an_unknown_block_name_is_refused_by_every_command(tmp_path, capsys):
    png = str(tmp_path / "t.png")
    for args in (["plugins"], ["generate", "--input-ids", "5"], ["bench", "--recipes", "threshold"],
                 ["trace", "--out", png]):
        _one_line_error(capsys, [*args, "--block", "thresold"], "--block 'thresold'", "did you mean 'threshold'",
                        "known: apd")
    from dllm_decode.cli import main

    assert main(["plugins", "--block", "threshold", "--json"]) == 0
    assert "threshold" not in {p["name"] for p in json.loads(capsys.readouterr().out)}


def test_an_unknown_name_in_the_block_variable_is_said(monkeypatch, capsys):
    """DLLM_DECODE_BLOCK may be shared with installs that have other plugins: a name no plugin
    has is said on stderr (a typo would otherwise block nothing silently), and the known one
    is blocked."""
    from dllm_decode.cli import main

    monkeypatch.setenv("DLLM_DECODE_BLOCK", "thresold,wino")
    assert main(["plugins", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "DLLM_DECODE_BLOCK names 'thresold', which no installed plugin has" in err and "wino" not in err
    assert "wino" not in {p["name"] for p in json.loads(out)}


def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    png = str(tmp_path / "t.png")
    for args, needles in ((["generate", "--task", "copy", "--stream"], ["--stream", "--task"]),
                          (["generate", "--task", "copy", "--chat"], ["--chat", "--task"]),
                          (["generate", "--task", "copy", "copy: abc\n"], ["--task", "not both"]),
                          (["generate", "--input-ids", "5", "--chat"], ["--chat", "--input-ids"]),
                          (["generate", "--input-ids", "5", "--n", "3"], ["--n", "give --task"]),
                          (["generate", "copy: abc\n", "--task-seed", "3"], ["--task-seed", "give --task"]),
                          (["generate", "copy: abc\n", "--stream", "--json"], ["--stream", "--json"]),
                          (["trace", "--input-ids", "5", "--index", "2", "--out", png], ["--input-ids", "--index"]),
                          (["trace", "copy: abc\n", "--input-ids", "5", "--out", png], ["text prompt", "--input-ids"]),
                          (["trace", "--input-ids", "5", "--chat", "--out", png], ["--chat", "--input-ids"])):
        _one_line_error(capsys, args, *needles)


def test_recipes_lists_every_shipped_recipe_and_what_it_runs(capsys):
    """`dllm-decode recipes`: one entry per YAML file shipped, with the plugins its slots resolve
    to; a recipe whose plugin is blocked is listed with the reason, the others still are."""
    import yaml

    from dllm_decode.cli import main

    files = sorted((ROOT / "recipes").glob("*.yaml"))
    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == sorted(f.stem for f in files)
    for f in files:
        data = yaml.safe_load(f.read_text())
        row = rows[f.stem]
        assert row["description"] == data.get("description") and "error" not in row, row
        for slot, entry in data.items():        # a slot the file names is filled by that plugin
            if slot in row["slots"]:
                assert row["slots"][slot] == (entry if isinstance(entry, str) else entry["plugin"]), (f.stem, slot)
    assert rows["wino"]["families"] == ["llada"] and "bidirectional" in rows["wino"]["requires"]
    assert rows["threshold"]["generation"]["block_length"] == 32
    assert main(["recipes", "--json", "--block", "threshold"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "'threshold' is blocked" in rows["threshold"]["error"] and "error" not in rows["llada"]
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "llada  (recipes/llada.yaml)" in out and "select_tokens: threshold" in out


def _parsed_back(flags: str):
    """The TrainConfig that train builds from a card's flags."""
    from dllm_decode.tools.train import _config, _parser

    return _config(_parser().parse_args(["--out", "x"] + flags.split()))


def test_model_card_flags_keep_canvas_odds_train_would_not_derive():
    """--canvas-weights is in the card's command whenever the run's odds differ from those train
    derives without it (6,2.5,1.5 for the default canvases, else equal), so it parses back to the
    run's odds; odds train would derive anyway stay out."""
    from dataclasses import asdict

    from dllm_decode.tools.model_card import train_flags
    from dllm_decode.tools.train import TrainConfig

    for cfg in (TrainConfig(out="x", canvas_weights=(1.0, 1.0, 1.0)),       # default canvases, other odds
                TrainConfig(out="x", canvas=(64, 128), canvas_weights=(6.0, 2.5)),
                TrainConfig(out="x", canvas=(256, 512), canvas_weights=(3.0, 2.0))):
        assert asdict(_parsed_back(train_flags(asdict(cfg)))) == asdict(cfg)
    for cfg in (TrainConfig(out="x"), TrainConfig(out="x", canvas=(80,), canvas_weights=(1.0,))):
        assert "--canvas-weights" not in train_flags(asdict(cfg))


def test_model_card_flags_keep_the_log_cadence_its_check_compares():
    """A run logged every N steps prints --log-every N in its command and in the card's check
    (whose loss log is compared line by line with the shipped one); the default stays out."""
    from dataclasses import asdict

    from dllm_decode.tools.model_card import train_flags
    from dllm_decode.tools.train import TrainConfig

    cfg = TrainConfig(out="x", canvas=(80,), canvas_weights=(1.0,), log_every=1)
    assert "--log-every 1" in train_flags(asdict(cfg), device=False)
    assert asdict(_parsed_back(train_flags(asdict(cfg)))) == asdict(cfg)
    assert "--log-every" not in train_flags(asdict(TrainConfig(out="x")))


def _model_card_error(capsys, *args) -> str:
    """Run model_card in-process on input it must refuse: exit status 2 before any table is
    decoded (nothing on stdout) and one line on stderr, returned."""
    from dllm_decode.tools.model_card import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
    return err


def test_model_card_refuses_bad_input_before_decoding(tmp_path, capsys):
    """A folder without training.json under --write, unknown --tasks, a missing folder, --render
    without eval.json and a generation length the grid's blocks do not divide are each refused
    in one line naming the file or flag, before the first decode."""
    import shutil

    card = tmp_path / "llada-reference"
    card.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "llada-reference" / f, card / f)
    quick = ("--n", "1", "--grid-n", "0", "--tasks", "copy")
    assert "training.json" in _model_card_error(capsys, card, *quick, "--write")
    assert not (card / "README.md").exists() and not (card / "eval.json").exists()
    assert "eval.json" in _model_card_error(capsys, card, "--render")
    assert "--tasks 'bogus'" in _model_card_error(capsys, card, "--tasks", "bogus")
    assert str(tmp_path / "nowhere") in _model_card_error(capsys, tmp_path / "nowhere", *quick)
    # block length 8 of the grid does not divide 100; the headline (one block) alone would decode
    assert "--gen-length 100" in _model_card_error(capsys, card, *quick[:2], "--grid-n", "1", "--tasks", "copy",
                                                   "--gen-length", "100")


def test_model_card_of_a_run_with_all_zero_task_weights(tmp_path, capsys):
    """All-zero task weights draw with equal odds in train's Batcher (as any equal weights do): the
    card says so, and its command leaves out the weights (which train now refuses)."""
    import shutil

    from dllm_decode.tools.model_card import main

    # the second stage's weights zero (compared with the first stage's), then both stages' (the
    # first stage's odds are the objective's sentence)
    for stages in (("config",), ("config", "init")):
        card = tmp_path / "-".join(stages) / "llada-reference"
        card.mkdir(parents=True)
        for f in ("config.json", "training.json", "eval.json"):
            shutil.copy(ROOT / "models" / "llada-reference" / f, card / f)
        training = json.loads((card / "training.json").read_text())
        tasks = training["config"]["tasks"]
        training["config"]["task_weights"] = [0.0] * len(tasks)
        if "init" in stages:
            training["init"]["config"]["task_weights"] = [0.0] * len(tasks)
        (card / "training.json").write_text(json.dumps(training))
        main([str(card), "--render"])
        text = (card / "README.md").read_text()
        odds = ", ".join(f"`{t}` {1 / len(tasks):.2f}" for t in tasks)
        assert f"Each row's task is drawn with odds {odds}." in text and "--task-weights" not in text, stages
        assert text.count("task is drawn with odds") == 1, stages        # no stage changed the odds
