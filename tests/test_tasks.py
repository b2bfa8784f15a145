"""The task suite: deterministic seeded streams, disjoint splits, the extractor and scorers."""

import pytest

from dllm_decode.config import load_recipe
from dllm_decode.recipes import find_recipe
from dllm_decode.measure.tasks import REFERENCE_MIX, TASKS, extract_answer, get_task, split_of


@pytest.mark.parametrize("name", list(TASKS))
def test_reference_answers_score_correct(name):
    task = get_task(name)
    for p in task.problems("test", 50):
        assert task.score(p, p.answer), p
        assert task.score(p, p.answer + "\n")         # trailing text after the line is ignored
        assert not task.score(p, p.answer.split("#### ")[0])   # no final line: wrong


@pytest.mark.parametrize("name", list(TASKS))
def test_streams_are_seeded_and_splits_disjoint(name):
    task = get_task(name)
    a, b = task.problems("test", 100, seed=3), task.problems("test", 100, seed=3)
    assert a == b
    assert [p.prompt for p in task.problems("test", 100, seed=4)] != [p.prompt for p in a]
    train = {p.prompt for p in task.problems("train", 1000)}
    test = {p.prompt for p in task.problems("test", 300)}
    assert not train & test
    assert all(split_of(p) == "test" for p in test) and all(split_of(p) == "train" for p in train)


def test_answers_fit_the_baseline_canvas_and_some_are_long():
    gen = load_recipe(find_recipe("llada")).generation.gen_length
    longest = {n: max(len(p.answer) for p in get_task(n).problems("test", 200)) for n in REFERENCE_MIX}
    assert max(longest.values()) < gen          # room for EOS after every answer
    assert longest["copy"] >= 64                # long enough that caching matters
    assert all(longest[n] <= get_task(n).max_answer_tokens for n in REFERENCE_MIX)


def test_extract_answer():
    assert extract_answer("work\n#### 42") == "42"
    assert extract_answer("#### 1\n#### 2\nmore") == "2"
    assert extract_answer("####42") is None and extract_answer("no answer") is None


def test_repeat_checks_agreement_options_and_count():
    task = get_task("repeat")
    p = next(p for p in task.problems("test", 50) if len(p.meta["options"]) == 3)
    d, other = p.meta["options"][0], p.meta["options"][1]
    n = p.meta["n"]
    absent = next(c for c in "0123456789" if c not in p.meta["options"])
    assert task.score(p, f"#### {d * n}") and task.score(p, f"#### {other * n}")
    assert not task.score(p, f"#### {d * (n - 1) + other}")      # mixed modes
    assert not task.score(p, f"#### {absent * n}")               # not offered
    assert not task.score(p, f"#### {d * (n + 1)}")              # wrong count


def test_repeat_prompts_hold_no_digit_but_the_options():
    """The count is written as a word: a digit count lets a small model repeat a digit of the
    count instead of an option, which is a reading error, not the dependency the task measures."""
    for p in get_task("repeat").problems("test", 200):
        assert sorted(c for c in p.prompt if c.isdigit()) == sorted(p.meta["options"])
        assert len(extract_answer(p.answer)) == p.meta["n"]


def test_case_checks_one_case_throughout():
    task = get_task("case")
    p = task.problems("test", 1)[0]
    w = p.meta["word"]
    assert task.score(p, f"#### {w}") and task.score(p, f"#### {w.upper()}")
    assert not task.score(p, f"#### {w[:5].upper() + w[5:]}")
    assert not task.score(p, f"#### {w[::-1]}")


def test_unknown_task_is_named():
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
