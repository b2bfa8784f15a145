"""The shipped reference checkpoints: formats, size budget, and accuracy floors on held-out
problems at fast settings, so an engine or model regression shows up as lost accuracy."""

from pathlib import Path

import pytest

from dllm_decode.config import load_recipe
from dllm_decode.measure.evaluate import evaluate, evaluate_ar, load_ar
from dllm_decode.models import load_model
from dllm_decode.recipes import find_recipe
from dllm_decode.measure.tasks import REFERENCE_MIX, get_task

MODELS = Path(__file__).resolve().parents[1] / "models"
N = 24      # held-out problems per task: enough for a floor, cheap enough for every run


def _problems(tasks=REFERENCE_MIX, n=N):
    return [p for t in tasks for p in get_task(t).problems("test", n, seed=0)]


def _recipe(tokens_per_step=1, block=32, gen=96):
    return load_recipe(find_recipe("llada"), overrides=[
        f"generation.gen_length={gen}", f"generation.block_length={block}",
        f"generation.steps={gen // tokens_per_step}", "generation.batch_size=64"])


def test_shipped_directories_and_size_budget():
    total = 0
    for name in ("llada-reference", "dream-reference", "ar-reference"):
        d = MODELS / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
            assert (d / f).is_file(), d / f
        assert "| tokens / step |" in (d / "README.md").read_text()
        total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total <= 40 * 2 ** 20


def test_every_shipped_checkpoint_together_within_100_mb():
    """The workload models (bfloat16 weights) and the small reference models together."""
    total = 0
    for d in MODELS.iterdir():
        if (d / "config.json").is_file():
            for f in ("model.safetensors", "tokenizer.json", "training.json", "README.md"):
                assert (d / f).is_file(), d / f
            total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total <= 100 * 2 ** 20


@pytest.mark.filterwarnings("ignore::FutureWarning")   # AutoTokenizer peeking at a Qwen2-style config
def test_one_tokenizer_for_all_three():
    from transformers import AutoTokenizer

    # trust_remote_code=False as the cards advise: the diffusion configs keep their family's
    # auto_map, and without it transformers would ask on a terminal whether to run remote code
    vocabs = [AutoTokenizer.from_pretrained(str(MODELS / n), trust_remote_code=False).get_vocab()
              for n in ("llada-reference", "dream-reference", "ar-reference")]
    assert vocabs[0] == vocabs[1] == vocabs[2]


@pytest.fixture(scope="module")
def llada():
    return load_model(MODELS / "llada-reference")


# Floors sit below the measured accuracy (model cards) and far above a broken model (0.0);
# they catch regressions, the cards hold the numbers.
LLADA_FLOOR = {"copy": 0.95, "repeat": 0.9, "case": 0.9}


def test_llada_reference_one_token_per_step(llada):
    res = evaluate(*llada, _recipe(1, 96), _problems())
    for task, v in res.per_task.items():
        assert v["accuracy"] >= LLADA_FLOOR[task], (task, v)
    assert res.nfe == 96


def test_four_tokens_per_forward_costs_the_free_choice_task(llada):
    """The trade-off the parallel policies are measured on: four tokens per forward in blocks of
    8 commits half a block of `case` letters together, each from its own marginal, and the case
    splits; one token per forward keeps it. The control task loses nothing."""
    problems = _problems(("copy", "case"), n=32)
    one = evaluate(*llada, _recipe(1, 8), problems).per_task
    four = evaluate(*llada, _recipe(4, 8), problems).per_task
    assert four["copy"]["accuracy"] >= one["copy"]["accuracy"] - 0.05, (one, four)
    assert four["case"]["accuracy"] <= one["case"]["accuracy"] - 0.15, (one, four)


def test_llada_reference_in_semi_autoregressive_blocks(llada):
    """Blocks of 32 at one token per forward: the states semi-AR decoding visits were trained.
    (Two tokens per forward already costs `case` a little: the model card's grid.)"""
    res = evaluate(*llada, _recipe(1, 32), _problems(("copy", "case"), n=16))
    assert res.per_task["copy"]["accuracy"] >= 0.9, res.per_task
    assert res.per_task["case"]["accuracy"] >= 0.9, res.per_task


DREAM_FLOOR = {"copy": 0.9, "repeat": 0.85, "case": 0.85}


def test_dream_reference():
    model, tok = load_model(MODELS / "dream-reference")
    assert model.spec.shift_logits
    res = evaluate(model, tok, _recipe(1, 96), _problems(n=16))
    for task, v in res.per_task.items():
        assert v["accuracy"] >= DREAM_FLOOR[task], (task, v)


def test_ar_reference_greedy():
    model, tok = load_ar(str(MODELS / "ar-reference"))
    res = evaluate_ar(model, tok, _problems(), max_new_tokens=96)
    for task, v in res.per_task.items():
        assert v["accuracy"] >= 0.95, (task, v)


# measured on 200 problems per task in models/ar-workload/README.md: copy 1.000, chain 0.965,
# columns 0.965; a floor on 16 sits below that and far above a broken load (0.0)
AR_WORKLOAD_FLOOR = {"copy": 0.95, "chain": 0.8, "columns": 0.8}


def test_ar_workload_greedy():
    """The workload AR model (bfloat16 weights, GPU-trained) through the AR evaluation path."""
    model, tok = load_ar(str(MODELS / "ar-workload"))
    res = evaluate_ar(model, tok, _problems(tuple(AR_WORKLOAD_FLOOR), n=16), max_new_tokens=400, batch_size=16)
    for task, v in res.per_task.items():
        assert v["accuracy"] >= AR_WORKLOAD_FLOOR[task], (task, v)
