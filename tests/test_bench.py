"""`dllm-decode bench`: sweeps, interleaved runs on the same problems, deterministic records,
the table, JSON, the plot and the autoregressive row."""

import json
from pathlib import Path

import pytest

from dllm_decode.measure.bench import BenchRun, expand_sweeps, pareto, render, run_bench, to_json
from dllm_decode.cli import main
from dllm_decode.errors import RecipeError
from dllm_decode.measure.evaluate import ProblemRecord

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "llada-reference"


def test_sweep_expands_only_the_recipes_that_take_the_key():
    recipes = expand_sweeps([("llada", "llada"), ("fast", "threshold")], [], ["select_tokens.threshold=0.5,0.9"],
                            gen_length=64)
    assert [label for label, _ in recipes] == ["llada", "fast[threshold=0.5]", "fast[threshold=0.9]"]
    assert recipes[2][1].select_tokens.params["threshold"] == 0.9
    # one block and one token per forward stay so; blocks of 32 stay 32
    assert [(r.generation.gen_length, r.generation.block_length, r.generation.steps) for _, r in recipes] == \
        [(64, 64, 64), (64, 32, 64), (64, 32, 64)]
    two = expand_sweeps([("t", "threshold")], [], ["select_tokens.threshold=0.5,0.9", "generation.seed=1,2"])
    assert [label for label, _ in two] == ["t[threshold=0.5][seed=1]", "t[threshold=0.5][seed=2]",
                                          "t[threshold=0.9][seed=1]", "t[threshold=0.9][seed=2]"]
    with pytest.raises(RecipeError, match="none of the recipes"):
        expand_sweeps([("llada", "llada")], [], ["select_tokens.nope=1,2"])
    with pytest.raises(RecipeError, match="expected KEY=V1,V2"):
        expand_sweeps([("llada", "llada")], [], ["select_tokens.threshold="])


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.4), (0.5, 0.9), (0.4, 0.8), (2.0, 0.5)]
    assert pareto(pts) == [False, False, True, False, True]


def _record(correct, nfe, tokens):
    return ProblemRecord("copy", 0, "p", "c", correct, nfe, tokens)


def test_table_columns_and_speedup_against_the_first_row():
    a = BenchRun("base", "diffusion", None, [_record(True, 96, 40), _record(False, 96, 20)], seconds=2.0)
    b = BenchRun("fast", "diffusion", None, [_record(True, 6, 40), _record(True, 4, 20)], seconds=0.5)
    assert b.tokens_per_forward == 6.0 and b.tokens_per_second == 120.0 and b.accuracy == 1.0
    table = render([a, b], {"device": "cpu", "torch": "x", "threads": 2, "dtype": "float32"})
    assert "| fast | 1.000 | 5.0 | 6.00 | 120.0 | 0.2500 | 4.00x | 50.00 |" in table       # 0.5 s / 10 forwards
    assert "| base | 0.500 | 96.0 | 0.31 | 30.0 | 1.0000 | 1.00x | 10.42 |" in table      # 2 s / 192 forwards


def test_the_table_compares_the_dllm_rows_with_the_autoregressive_row():
    """Tokens per second against the AR row: the fastest dLLM row, and the fastest at least as
    accurate when that is another row."""
    info = {"device": "cpu", "torch": "x", "threads": 2, "dtype": "float32"}
    base = BenchRun("base", "diffusion", None, [_record(True, 96, 40), _record(True, 96, 20)], seconds=2.0)
    fast = BenchRun("fast", "diffusion", None, [_record(True, 6, 40), _record(False, 4, 20)], seconds=0.5)
    ar = BenchRun("ar", "autoregressive", None, [_record(True, 40, 40), _record(True, 20, 20)], seconds=1.0)
    table = render([base, fast, ar], info)
    assert "fastest dLLM row: fast, 2.00x the autoregressive row's tokens / s at accuracy 0.500 " \
           "(autoregressive 1.000)" in table
    assert "fastest dLLM row at least as accurate: base, 0.50x" in table
    assert "at least as accurate" not in render([base, ar], info)
    assert "no dLLM row is as accurate" in render([fast, ar], info)
    assert "autoregressive row" not in render([base, fast], info)
    assert to_json([base, fast, ar], info, {})["against_ar"] == table.split("\n\n")[-1].split("\n")


@pytest.fixture(scope="module")
def reference():
    from dllm_decode.models import load_model
    return load_model(MODEL)


def test_interleaved_runs_are_deterministic_but_for_timings(reference):
    from dllm_decode.tools.reporting import held_out

    model, tok = reference
    problems = held_out(["repeat", "case"], 3, 0)
    recipes = expand_sweeps([("llada", "llada"), ("slowfast", "slowfast")], ["generation.batch_size=2"], [],
                            gen_length=48)
    first = run_bench(model, tok, recipes, problems, chunk=2)
    again = run_bench(model, tok, recipes, problems, chunk=2, warmup=False)
    assert [r.label for r in first] == ["llada", "slowfast"]
    for x, y in zip(first, again):
        assert [p.as_dict() for p in x.records] == [p.as_dict() for p in y.records]
        assert x.n == len(problems) and x.seconds > 0
    assert [p.index for p in first[0].records] == [p.index for p in problems]   # same problems, same order
    assert first[1].nfe < first[0].nfe


def test_cli_bench_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--model", str(MODEL), "--recipes", "llada", "threshold", "--task", "case", "--n", "2",
               "--gen-length", "48", "--set", "generation.block_length=48",
               "--sweep", "select_tokens.threshold=0.5,0.9", "--ar-model", str(ROOT / "models" / "ar-reference"),
               "--json", str(out_json), "--plot", str(out_png), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| llada |" in text and "threshold[threshold=0.5]" in text and "autoregressive" in text
    assert "torch" in text and "threads" in text
    data = json.loads(out_json.read_text())
    assert [r["label"] for r in data["rows"]][:3] == ["llada", "threshold[threshold=0.5]", "threshold[threshold=0.9]"]
    assert data["rows"][0]["speedup"] == 1.0 and len(data["rows"][0]["problems"]) == 2
    assert data["machine"]["dtype"] == "float32"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_errors_name_the_recipe(capsys):
    rc = main(["bench", "--model", str(MODEL), "--recipes", "no-such-recipe", "--no-progress"])
    assert rc == 2
    assert "no-such-recipe" in capsys.readouterr().err


def test_cli_bench_max_length_lifts_the_declared_limit_for_one_run(capsys):
    """The reference model declares 1024 positions: gen 1024 plus a prompt is refused with the
    limit named, and --max-length lets the run measure it anyway."""
    args = ["bench", "--model", str(MODEL), "--recipes", "threshold", "--task", "copy", "--n", "1",
            "--gen-length", "1024", "--set", "select_tokens.threshold=0.0",
            "--no-warmup", "--no-progress"]
    assert main(args) == 2
    assert "allows 1024" in capsys.readouterr().err
    assert main(args + ["--max-length", "1200"]) == 0
    assert "gen 1024" in capsys.readouterr().out


def test_the_plot_numbers_every_point_apart_and_explains_the_colours():
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from dllm_decode.measure.bench import figure

    # eight rows crowded at one accuracy and nearly one speed: a front of a single point
    runs = [BenchRun(f"r{i}", "diffusion", None, [_record(True, 10 + i % 3, 40)], seconds=1.0 + 0.01 * i)
            for i in range(8)]
    fig = figure(runs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        numbers = [t for t in ax.texts if t.get_text().isdigit()]
        assert sorted(int(t.get_text()) for t in numbers) == list(range(1, 9))
        texts = [Text.get_window_extent(t, renderer) for t in numbers]       # the numbers, not their leaders
        assert not any(a.overlaps(b) for i, a in enumerate(texts) for b in texts[i + 1:])
        frame = ax.get_window_extent(renderer)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in texts)
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "Pareto-optimal" in legend and "dominated" in legend      # a lone red point is explained
    plt.close(fig)


def test_cli_bench_rows_of_another_checkpoint(tmp_path, capsys):
    """RECIPE@DIR: that row decodes with its own checkpoint (here a block-causal one beside the
    full-attention model), in the same run and on the same problems."""
    import shutil

    from dllm_decode.models import build_random_model, load_model, save_pretrained

    _, tok = load_model(MODEL)
    sdar = build_random_model("sdar", vocab_size=len(tok), d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                              mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, block_size=4)
    save_pretrained(sdar, tmp_path / "sdar")
    for f in MODEL.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "sdar" / f.name)
    rc = main(["bench", "--model", str(MODEL), "--recipes", "llada", f"sdar@{tmp_path / 'sdar'}", "--task", "copy",
               "--n", "1", "--gen-length", "16", "--no-progress", "--no-warmup", "--json", str(tmp_path / "b.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["llada", "sdar @ sdar"]
    assert rows[1]["recipe"]["model"]["path"] == str(tmp_path / "sdar")
    assert main(["bench", "--recipes", "llada@", "--no-progress"]) == 2
    assert "expected RECIPE@DIR" in capsys.readouterr().err


def test_answers_longer_than_the_generation_length_are_counted_per_task():
    """The character tokenizer gives one token per character, so the count is the number of
    reference answers with more characters than the generation length."""
    from dllm_decode.measure.evaluate import answers_longer_than, truncation_note
    from dllm_decode.models.loader import load_tokenizer
    from dllm_decode.tools.reporting import held_out

    tok = load_tokenizer(ROOT / "models" / "ar-workload")
    problems = held_out(["chain", "listops"], 20, 0)
    longest = {t: max(len(p.answer) for p in problems if p.task == t) for t in ("chain", "listops")}
    g = longest["listops"] - 1
    counts = answers_longer_than(problems, tok, g)
    assert counts == {t: (sum(len(p.answer) > g for p in problems if p.task == t), 20) for t in ("chain", "listops")}
    assert counts["listops"][0] >= 1
    note = truncation_note(counts, g)
    assert f"{counts['listops'][0]} of 20 `listops`" in note and str(g) in note
    if counts["chain"][0] == 0:
        assert "chain" not in note
    fits = max(longest.values())
    assert answers_longer_than(problems, tok, fits) == {"chain": (0, 20), "listops": (0, 20)}
    assert truncation_note(answers_longer_than(problems, tok, fits), fits) is None


def test_cli_bench_says_when_answers_cannot_fit_the_generation_length(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["bench", "--model", str(MODEL), "--recipes", "threshold", "--task", "copy", "--n", "2",
            "--set", "generation.block_length=16", "--no-warmup", "--no-progress", "--json", str(out)]
    assert main(args + ["--gen-length", "16"]) == 0
    assert "generation length 16 is shorter than the reference answers of 2 of 2 `copy`" in capsys.readouterr().err
    assert json.loads(out.read_text())["settings"]["answers_longer_than_gen_length"] == {"copy": 2}
    assert main(args + ["--gen-length", "96"]) == 0
    assert "shorter than" not in capsys.readouterr().err
    assert json.loads(out.read_text())["settings"]["answers_longer_than_gen_length"] == {"copy": 0}


def test_cli_bench_rows_with_their_own_overrides(tmp_path, capsys):
    """RECIPE[KEY=VALUE,...]: one recipe at several settings side by side in one run (LLaDA at one
    and at two tokens a forward), labelled as --sweep labels its rows; a malformed entry, or a key
    its recipe does not take, fails before any decoding, naming the entry."""
    rc = main(["bench", "--model", str(MODEL), "--recipes", "llada", "llada[generation.steps=8]",
               "threshold[select_tokens.threshold=0.5,generation.block_length=8]", "--task", "copy", "--n", "2",
               "--gen-length", "16", "--no-progress", "--no-warmup", "--json", str(tmp_path / "b.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["llada", "llada[steps=8]", "threshold[threshold=0.5,block_length=8]"]
    assert [r["recipe"]["generation"]["steps"] for r in rows[:2]] == [16, 8]
    assert rows[2]["recipe"]["select_tokens"]["threshold"] == 0.5
    assert rows[2]["recipe"]["generation"]["block_length"] == 8
    assert [p["nfe"] for p in rows[0]["problems"]] == [16, 16]
    assert [p["nfe"] for p in rows[1]["problems"]] == [8, 8]
    for bad in ("llada[steps]", "[generation.steps=8]", "llada[]"):
        assert main(["bench", "--recipes", bad, "--no-progress"]) == 2
        assert f"--recipes {bad!r}: expected RECIPE[KEY=VALUE,...]" in capsys.readouterr().err
    # a key the recipe does not take is blamed on the row that gave it, not on a --set
    assert main(["bench", "--recipes", "llada", "llada[generation.stepz=8]", "--no-progress"]) == 2
    assert ("--recipes 'llada[generation.stepz=8]': generation.stepz=8: unknown key 'generation.stepz'"
            in capsys.readouterr().err)


def test_cli_bench_one_checkpoint_at_two_block_sizes(tmp_path):
    """Rows of one checkpoint at different model.block_size each decode with the checkpoint loaded
    at their own size: every row's completions are those of a run of that row alone (and the two
    sizes' differ, so a row decoded at the other's size would fail here)."""
    import shutil

    from dllm_decode.models import build_random_model, load_model, save_pretrained

    _, tok = load_model(MODEL)
    sdar = build_random_model("sdar", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, block_size=4, seed=2)
    save_pretrained(sdar, tmp_path / "sdar")
    for f in MODEL.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "sdar" / f.name)
    rows = {b: f"sdar[generation.block_length={b},model.block_size={b}]" for b in (8, 4)}

    def completions(recipes, name):
        assert main(["bench", "--model", str(tmp_path / "sdar"), "--recipes", *recipes, "--task", "copy", "--n", "2",
                     "--gen-length", "16", "--no-progress", "--no-warmup", "--json", str(tmp_path / name)]) == 0
        return [[p["completion"] for p in r["problems"]] for r in json.loads((tmp_path / name).read_text())["rows"]]

    both = completions([rows[8], rows[4]], "both.json")
    alone = [completions([rows[b]], f"{b}.json")[0] for b in (8, 4)]
    assert both == alone and alone[0] != alone[1]
