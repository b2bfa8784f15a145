"""The lm-eval model (dllm_decode.harness): construction from model_args, batched
generate_until against batch size 1, stop strings, the likelihood requests, resumable logs,
the shipped offline task, and accuracy parity with `dllm-decode bench` on the same problems."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from dllm_decode.errors import DllmDecodeError, InputError, RecipeError  # noqa: E402
from dllm_decode.harness import TASKS_DIR, task_data  # noqa: E402
from dllm_decode.harness.lm import DllmDecodeLM  # noqa: E402
from dllm_decode.measure.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "llada-reference")
# a short canvas with two tokens per forward keeps every decode here well under a second
SMALL = {"generation.gen_length": 32, "generation.block_length": 32, "generation.steps": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_lm(**kwargs):
    return DllmDecodeLM(model=MODEL, recipe="llada", **{**SMALL, **kwargs})


def gen_request(context, i=0, **gen_kwargs):
    kw = {"until": ["\n\n"], "do_sample": False, **gen_kwargs}
    return Instance("generate_until", {}, (context, kw), i, ("t", i, 1))


def prompts(n=3):
    return [p.prompt for name in ("repeat", "case", "copy") for p in get_task(name).problems("test", n)]


# ----------------------------------------------------------------------------- construction


def test_model_args_string_is_cast_and_applied():
    lm = DllmDecodeLM.create_from_arg_string(
        f"model={MODEL},recipe=llada,generation.gen_length=32,generation.block_length=16,"
        "generation.steps=16,score.remasking=random,mc_num=8,mc_batch=4,greedy_check=off",
        {"batch_size": 3, "max_batch_size": None, "device": "cpu"})
    gen = lm.recipe.generation
    assert (gen.gen_length, gen.block_length, gen.steps, gen.batch_size) == (32, 16, 16, 3)
    assert lm.recipe.slot("score").params["remasking"] == "random"
    assert (lm.options.mc_num, lm.options.mc_batch, lm.options.greedy_check) == (8, 4, "off")
    assert lm.rank == 0 and lm.world_size == 1 and lm.device == torch.device("cpu")
    assert lm.batch_size == 3


def test_auto_batch_size_keeps_the_recipe_capped_by_max_batch_size():
    lm = make_lm(batch_size="auto:2", max_batch_size=2)
    assert lm.recipe.generation.batch_size == 4 and lm.batch_size == 2


@pytest.mark.parametrize("kwargs, needle", [
    ({"model": MODEL, "bogus": 1}, "unknown key 'bogus'"),
    ({"model": MODEL, "mc_num": 10, "mc_batch": 4}, "mc_batch=4 must divide mc_num=10"),
    ({"model": MODEL, "greedy_check": "maybe"}, "greedy_check"),
    ({"model": MODEL, "recipe": "no-such-recipe"}, "no-such-recipe"),
    ({"model": MODEL, "generation.steps": -1}, "steps"),
    ({"model": str(ROOT / "nowhere")}, f"model_args model '{ROOT / 'nowhere'}': directory does not exist"),
    ({}, "no model"),
])
def test_bad_model_args_name_the_key(kwargs, needle):
    with pytest.raises((InputError, RecipeError, DllmDecodeError)) as err:
        DllmDecodeLM(**kwargs)
    assert needle in str(err.value)


# ----------------------------------------------------------------------------- generate_until


def test_batched_generation_equals_batch_size_one(tmp_path):
    reqs = [gen_request(p, i) for i, p in enumerate(prompts())]
    one = make_lm(batch_size=1).generate_until(reqs)
    batched_lm = make_lm(batch_size=4, log_dir=str(tmp_path))
    batched = batched_lm.generate_until(reqs)
    assert batched == one
    rows = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert sorted(r["batch_rows"] for r in rows) == [1, 4, 4, 4, 4, 4, 4, 4, 4]   # really batched
    assert sum(get_task(t).score(p, o) for t, p, o in
               zip(["repeat"] * 3 + ["case"] * 3 + ["copy"] * 3,
                   [q for n in ("repeat", "case", "copy") for q in get_task(n).problems("test", 3)], one)) > 0


def test_until_and_max_gen_toks_cut_the_answer():
    # copy writes a 32-letter worked line, then "\n#### ": a 48-position canvas holds the newline
    lm = make_lm(batch_size=2, **{"generation.gen_length": 48, "generation.block_length": 48,
                                  "generation.steps": 24})
    ctx = get_task("copy").problems("test", 1)[0].prompt
    full = lm.generate_until([gen_request(ctx, until=[])])[0]
    assert "\n" in full
    cut, short, both = lm.generate_until([gen_request(ctx, 0, until=["\n"]), gen_request(ctx, 1, max_gen_toks=3),
                                          gen_request(ctx, 2, until="####", max_gen_toks=9)])
    assert cut == full.split("\n")[0]
    assert short == full[:3]                    # the character tokenizer: 3 tokens, 3 characters
    assert both == full[:9].split("####")[0]


def test_request_log_makes_a_run_resumable(tmp_path, capsys):
    reqs = [gen_request(p, i) for i, p in enumerate(prompts(2))]
    first = make_lm(log_dir=str(tmp_path), batch_size=2).generate_until(reqs)
    assert "answered from the log" not in capsys.readouterr().err     # a fresh directory: nothing to say
    log = tmp_path / "rank0.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == len(reqs)
    for r in records:
        assert {"key", "rank", "index", "doc_id", "prompt_hash", "output", "nfe", "tokens", "seconds"} <= set(r)
        assert r["nfe"] == 16 and 0 < r["tokens"] <= 32 and r["seconds"] > 0
    # drop two answers and leave a torn line, as a killed run would
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-2]) + "\n" + lines[-1][:20])
    lm = make_lm(log_dir=str(tmp_path), batch_size=4)
    decoded = []
    real = lm.decoder.generate
    lm.decoder.generate = lambda ids, **kw: decoded.append(len(ids)) or real(ids, **kw)
    assert lm.generate_until(reqs) == first
    assert decoded == [2]                       # only the two lost requests were decoded again
    assert lm.generate_until(reqs) == first and decoded == [2]
    # another recipe must not reuse these answers
    capsys.readouterr()
    other = make_lm(log_dir=str(tmp_path), **{"generation.steps": 32})
    said = capsys.readouterr().err        # a reused directory is announced
    assert re.search(rf"log_dir {re.escape(str(tmp_path))} already holds \d+ answered request", said), said
    assert "answered from the log" in said
    seen = []
    real_other = other.decoder.generate
    other.decoder.generate = lambda ids, **kw: seen.append(len(ids)) or real_other(ids, **kw)
    other.generate_until(reqs[:1])
    assert seen == [1]


# ----------------------------------------------------------------------------- likelihood


def test_loglikelihood_requests():
    lm = make_lm(mc_num=8, mc_batch=4)
    pairs = [("copy: ab\n", "ab\n#### ab"), ("pick one of 1 2, six times\n", "#### 111111"), ("", "abc")]
    reqs = [Instance("loglikelihood", {}, pair, i, ("t", i, 1)) for i, pair in enumerate(pairs)]
    out = lm.loglikelihood(reqs)
    assert all(isinstance(ll, float) and ll < 0 and isinstance(g, bool) for ll, g in out)
    # each request seeds its own masks: order (and so rank and batching) does not matter
    assert lm.loglikelihood(reqs[::-1]) == out[::-1]
    # on a held-out problem of the task the model learned, the right copy beats the same letters
    # reversed (a toy prompt of another length is outside what it was trained on)
    p = get_task("copy").problems("test", 1)[0]
    wrong = p.answer.split("\n")[0][::-1]
    good, bad = lm.loglikelihood([Instance("loglikelihood", {}, (p.prompt, p.answer), 0),
                                  Instance("loglikelihood", {}, (p.prompt, f"{wrong}\n#### {wrong}"), 1)])
    assert good[0] > bad[0]
    # trailing context whitespace moves into the continuation
    ctx, cont = lm.encode_pair("copy: ab \n", "x")
    assert lm.tokenizer.decode(cont) == " \nx" and lm.tokenizer.decode(ctx) == "copy: ab"


def test_loglikelihood_rolling_is_refused():
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        make_lm().loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("text",), 0)])


def test_chat_template():
    lm = make_lm()
    with pytest.raises(InputError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    lm.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = [{"role": "user", "content": "copy: ab"}]
    assert lm.apply_chat_template(chat) == "<user>copy: ab\n<assistant>"
    assert lm.apply_chat_template(chat, add_generation_prompt=False) == "<user>copy: ab\n"
    assert lm.tokenizer_name == "llada-reference"


# ----------------------------------------------------------------------------- the shipped task


def test_shipped_task_data_is_what_the_generators_make():
    assert task_data.stale() == []
    sizes = [task_data.task_file(n).stat().st_size for n in ("copy", "repeat", "case")]
    assert sum(sizes) < 300_000


def test_lm_eval_accuracy_equals_bench_on_the_same_problems():
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dllm_decode.measure.bench import run_bench

    n = 3
    lm = make_lm(batch_size=2)
    res = lm_eval.simple_evaluate(model=lm, tasks=["dllm_reference"], limit=n, log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    problems = [p for name in ("copy", "repeat", "case") for p in get_task(name).problems("test", n)]
    run = run_bench(lm.model, lm.tokenizer, [("llada", lm.recipe)], problems, chunk=4, warmup=False)[0]
    bench = {(r.task, r.index): r for r in run.records}
    seen = 0
    for task_name, samples in res["samples"].items():
        for s in samples:
            rec = bench[(s["doc"]["task"], s["doc_id"])]
            assert s["arguments"][0][0] == rec.prompt
            assert s["filtered_resps"][0] == rec.completion
            assert s["exact_match"] == int(rec.correct)
            seen += 1
    assert seen == len(problems)
    assert res["results"]["dllm_reference"]["exact_match,none"] == pytest.approx(run.accuracy)


def test_package_imports_and_eval_fails_cleanly_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import dllm_decode.cli, dllm_decode.harness, dllm_decode.harness.command\n"
            "sys.exit(dllm_decode.cli.main(['eval', '--model', 'dllm_decode']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "pip install 'dllm-decode[eval]'" in out.stderr


def test_help_lists_eval():
    out = subprocess.run([sys.executable, "-m", "dllm_decode", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "eval" in out.stdout and "lm-evaluation-harness" in out.stdout


def test_eval_command_adds_the_shipped_tasks_unless_told_otherwise():
    from dllm_decode.harness.command import with_shipped_tasks

    shipped = ["--include_path", str(TASKS_DIR)]
    assert with_shipped_tasks(["--model", "dllm_decode", "--tasks", "x"]) == ["--model", "dllm_decode", "--tasks", "x",
                                                                              *shipped]
    assert with_shipped_tasks(["run", "--tasks", "x"]) == ["run", "--tasks", "x", *shipped]
    assert with_shipped_tasks(["ls", "tasks"]) == ["ls", "tasks", *shipped]
    assert with_shipped_tasks(["--tasks", "x", "--include_path", "mine"]) == ["--tasks", "x", "--include_path", "mine"]
    assert with_shipped_tasks(["--help"]) == ["--help"] and with_shipped_tasks([]) == []


def test_sampled_answers_ignore_batching_and_repeats_get_their_own_seeds(tmp_path):
    """At T > 0 a request's answer is its own (batch size 1 and 4 agree), and a task's repeats
    (identical requests, lm-eval's pass@k) are sampled with seeds seed, seed + 1, ..."""
    p = prompts(1)[0]
    reqs = [gen_request(p, i) for i in range(4)] + [gen_request(q, 4 + i) for i, q in enumerate(prompts(2))]
    sampled = {"generation.temperature": 2.0}
    one = make_lm(batch_size=1, **sampled).generate_until(reqs)
    batched_lm = make_lm(batch_size=4, log_dir=str(tmp_path), **sampled)
    assert batched_lm.generate_until(reqs) == one
    assert len(set(one[:4])) > 1                      # the repeats are different samples
    keys = [json.loads(line)["key"] for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert len(set(keys)) == len(reqs)               # and each is logged, so a resumed run keeps it
    seeded = make_lm(batch_size=1, **sampled, **{"generation.seed": 1}).generate_until(reqs[:1])
    assert seeded == one[1:2]


def test_lm_evals_cache_and_sampled_repeats(tmp_path):
    """Under `--use_cache` lm-eval answers a request from its cache unless its gen_kwargs say
    do_sample; the recipe's temperature is not in them, so sampled repeats are refused, naming
    the fix. With do_sample the cache leaves them alone and a rerun samples them again."""
    from lm_eval.api.model import CachingLM

    sampled = {"generation.temperature": 2.0}
    reqs = [gen_request(prompts(1)[0], i) for i in range(4)]
    with pytest.raises(InputError, match="do_sample: true"):
        CachingLM(make_lm(batch_size=2, **sampled), str(tmp_path / "refused")).generate_until(reqs)
    reqs = [gen_request(prompts(1)[0], i, do_sample=True) for i in range(4)]
    cached = CachingLM(make_lm(batch_size=2, **sampled), str(tmp_path / "sampled"))
    first = cached.generate_until(reqs)
    assert len(set(first)) > 1 and cached.generate_until(reqs) == first
    assert make_lm(batch_size=2, **sampled).generate_until(reqs) == first    # what the cache left alone


def test_lm_evals_own_models_stay_reachable():
    """lm-eval imports its models only into an empty registry; registering ours first must not hide
    them (`dllm-decode eval --model hf` or `local-completions` against `dllm-decode serve`)."""
    from lm_eval.api.registry import get_model

    code = ("import dllm_decode.harness.lm\n"
            "from lm_eval.api.registry import get_model\n"
            "print(get_model('local-completions').__name__, get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LocalCompletionsAPI", "HFLM"]
    assert get_model("dllm_decode") is DllmDecodeLM


@pytest.mark.parametrize("recipe, kwargs, needle", [
    ("threshold", {"select_tokens.treshold": 0.5}, "model_args select_tokens.treshold=0.5: select_tokens.treshold: "
                                                   "unknown parameter"),
    ("threshold", {"select_token.threshold": 0.5}, "model_args select_token.threshold=0.5: unknown key "
                                                   "'select_token'"),
    # a plugin's own check (policy.resolve), not only the recipe's validation
    ("dkv-cache", {"generation.steps": 95}, "model_args generation.steps=95: [plugin 'llada'] generation.steps"),
    ("threshold", {"batch_size": 5000}, "model_args batch_size=5000: generation.batch_size:"),
])
def test_recipe_errors_of_model_args_name_the_model_args_key(recipe, kwargs, needle):
    """eval has no --set: an override's error names the model_args key it came from, not the
    recipe file and not a --set."""
    from dllm_decode.recipes import find_recipe

    with pytest.raises(RecipeError) as err:
        DllmDecodeLM(model=MODEL, recipe=recipe, **kwargs)
    msg = str(err.value)
    assert msg.startswith(needle), msg
    assert "--set" not in msg and str(find_recipe(recipe)) not in msg, msg
