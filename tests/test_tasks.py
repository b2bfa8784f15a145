"""The task suite: deterministic seeded streams, disjoint splits, the extractor and scorers."""

import pytest

from dllm_decode.config import load_recipe
from dllm_decode.recipes import find_recipe
from dllm_decode.measure.tasks import (MIXES, REFERENCE_MIX, TASKS, WORKLOAD_MIX, extract_answer, get_mix,
                                        get_task, split_of)


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


# --- the workload tasks: worked traces whose later lines use values written on earlier lines ---

RANGES = {"echo": (30, 250), "chain": (40, 300), "columns": (40, 300), "listops": (30, 300),
          "series": (400, 900)}


def test_reference_mix_is_unchanged_and_the_workload_mix_is_named():
    assert REFERENCE_MIX == ("copy", "repeat", "case")
    assert get_mix("reference") == REFERENCE_MIX and get_mix("workload") == WORKLOAD_MIX == MIXES["workload"]
    assert set(WORKLOAD_MIX) == set(RANGES) - {"echo"} | {"copy"}
    with pytest.raises(KeyError, match="unknown task mix 'nope'"):
        get_mix("nope")


def test_reference_streams_are_the_ones_the_shipped_models_learned_from():
    """The resumable stream draws exactly what the original generator loop drew, so the
    shipped models' training commands still see the same problems."""
    import random

    for name in REFERENCE_MIX + ("add", "distinct"):
        task = get_task(name)
        rng, old = random.Random(f"{name}/train/0"), []
        while len(old) < 300:
            prompt, answer, _ = task.sample(rng)
            if split_of(prompt) == "train":
                old.append((prompt, answer))
        assert [(p.prompt, p.answer) for p in task.problems("train", 300)] == old


@pytest.mark.parametrize("name", sorted(RANGES))
def test_workload_answer_lengths_vary_within_their_range(name):
    task = get_task(name)
    lengths = [len(p.answer) for p in task.problems("train", 500)]
    lo, hi = RANGES[name]
    assert lo <= min(lengths) and max(lengths) <= min(hi, task.max_answer_tokens), (min(lengths), max(lengths))
    assert max(lengths) - min(lengths) > (hi - lo) / 2     # spread over the range, not one length
    assert len(set(lengths)) > 30


def test_the_long_task_needs_the_long_canvases():
    lengths = [len(p.answer) for p in get_task("series").problems("test", 300)]
    assert min(lengths) > 256 and sum(n > 512 for n in lengths) > 60 and max(lengths) < 1024


@pytest.mark.parametrize("name", list(TASKS))
def test_every_character_is_in_the_tokenizer_and_lengths_fit_their_bounds(name):
    from dllm_decode.tools.char_tokenizer import DEFAULT_CHARS

    task = get_task(name)
    probs = task.problems("train", 600) + task.problems("test", 200, seed=1)
    assert set("".join(p.prompt + p.answer for p in probs)) <= set(DEFAULT_CHARS)
    assert max(len(p.prompt) for p in probs) <= task.max_prompt_tokens
    assert max(len(p.answer) for p in probs) <= task.max_answer_tokens


def test_stream_state_round_trips_to_the_same_next_problems():
    task = get_task("chain")
    a = task.stream("train", seed=5)
    for _ in range(7):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(5)]
    b = task.stream("train", seed=5)
    assert next(b) != expected[0]
    b.load_state_dict(state)
    assert [next(b) for _ in range(5)] == expected and expected[0].index == 7
    with pytest.raises(ValueError, match="columns"):
        get_task("columns").stream("train", seed=5).load_state_dict(state)


def _trace(p):
    """-> (worked lines, final answer) of a reference answer."""
    work, final = p.answer.rsplit("\n", 1)
    assert final.startswith("#### ")
    return work.split("\n"), final[len("#### "):]


def test_echo_copies_the_prompt():
    for p in get_task("echo").problems("test", 100):
        s = p.prompt[len("echo: "):-1]
        assert _trace(p) == ([s], s) and s.isalpha()


def test_chain_worked_lines_compute_the_answer():
    import re

    for p in get_task("chain").problems("test", 300):
        *defs, question = p.prompt.strip().split("\n")
        asked = re.fullmatch(r"what is ([a-z])\?", question).group(1)
        exprs = dict(d.split(" = ") for d in defs)
        values = {}
        while len(values) < len(exprs):       # evaluate the prompt alone, whatever its order
            for name, expr in exprs.items():
                try:
                    values[name] = eval(expr, {}, dict(values))
                except NameError:
                    pass
        lines, final = _trace(p)
        assert int(final) == values[asked] and 2 <= len(lines) - 1 <= 8
        assert len(exprs) - len(lines) <= 2                   # at most two distractors
        seen = {}
        for i, line in enumerate(lines):
            name, *parts = line.split(" = ")
            if i == 0:
                seen[name] = int(parts[0])
                continue
            expr, substituted, result = parts
            assert expr == exprs[name]
            assert eval(expr, {}, dict(seen)) == eval(substituted) == int(result) == values[name], line
            assert 0 <= int(result) <= 999
            seen[name] = int(result)
        assert name == asked


def test_columns_worked_lines_compute_the_answer():
    import re

    ops = set()
    for p in get_task("columns").problems("test", 300):
        word, expr = p.prompt.split()
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", expr).groups()
        assert word == {"+": "sum", "-": "diff"}[op] and 3 <= len(a) <= 8 and len(b) <= len(a)
        ops.add(op)
        lines, final = _trace(p)
        digits, carry = [], 0
        for line in lines:
            if m := re.fullmatch(r"write (\d)", line):
                digits.append(int(m.group(1)))
                continue
            if op == "+":
                m = re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+) write (\d) carry (\d)", line)
                x, y, c, s, w, k = map(int, m.groups())
                assert s == x + y + c and w == s % 10 and k == s // 10
            else:
                m = re.fullmatch(r"(\d)(\+10)?-(\d)-(\d)=(\d) write (\d) borrow (\d)", line)
                x, ten, y, c, v, w, k = m.groups()
                x, y, c, v, w, k = map(int, (x, y, c, v, w, k))
                assert (ten is not None) == (k == 1) == (x - y - c < 0) and v == w == x + 10 * k - y - c
            assert c == carry
            digits.append(w)
            carry = k
        assert int("".join(map(str, reversed(digits)))) == int(final) == eval(expr)
    assert ops == {"+", "-"}


def test_listops_worked_lines_compute_the_answer():
    from collections import Counter

    seen_ops = set()
    for p in get_task("listops").problems("test", 300):
        op, items = p.prompt.split(": ")
        items = items.split()
        seen_ops.add(op)
        lines, final = _trace(p)
        assert len(lines) == len(items)
        if op == "count":
            for i, (c, line) in enumerate(zip(items, lines)):
                assert line == f"{c} {items[:i + 1].count(c)}"
            assert final.split() == [f"{c}{n}" for c, n in Counter(items).items()]
            continue
        left, out = [int(x) for x in items], []
        for line in lines:
            word, x, w2, *rest = line.split()
            x = int(x)
            assert (word, w2) == ("take", "left")
            assert x == (min(left) if op == "sort" else left[-1])
            left.remove(x) if op == "sort" else left.pop()
            assert [int(r) for r in rest] == left
            out.append(x)
        ints = [int(x) for x in items]
        assert [int(x) for x in final.split()] == out == (sorted(ints) if op == "sort" else ints[::-1])
    assert seen_ops == {"sort", "reverse", "count"}


def test_series_worked_lines_compute_the_answer():
    import re

    for p in get_task("series").problems("test", 100):
        start, k, limit = map(int, re.fullmatch(r"from (\d+) add (\d+) until over (\d+)\n", p.prompt).groups())
        lines, final = _trace(p)
        total = start
        for line in lines:
            assert total <= limit                               # still not over: one more step
            assert line == f"{total}+{k}={total + k}"
            total += k
        assert total > limit and int(final) == total


@pytest.mark.parametrize("name", sorted(RANGES))
def test_workload_scoring_is_exact_match_on_the_final_line(name):
    task = get_task(name)
    for p in task.problems("test", 20):
        lines, final = _trace(p)
        assert task.score(p, p.answer)
        wrong = final[:-1] + ("1" if final[-1] != "1" else "2")
        assert not task.score(p, "\n".join(lines) + "\n#### " + wrong)
        assert not task.score(p, "\n".join(lines))
