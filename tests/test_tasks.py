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

RANGES = {"echo": (30, 250), "chain": (45, 160), "columns": (80, 350), "listops": (100, 410),
          "series": (400, 900), "ladder": (400, 900), "columns-short": (80, 255), "listops-short": (100, 255)}


def test_reference_mix_is_unchanged_and_the_workload_mix_is_named():
    assert REFERENCE_MIX == ("copy", "repeat", "case")
    assert get_mix("reference") == REFERENCE_MIX and get_mix("workload") == WORKLOAD_MIX == MIXES["workload"]
    assert set(WORKLOAD_MIX) == set(RANGES) - {"echo", "ladder", "columns-short", "listops-short"} | {"copy"}
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
    # (fixed-width lines: a length per item count, nearly; the short variants count fewer items)
    assert len(set(lengths)) > (5 if name.endswith("-short") else 10)


@pytest.mark.parametrize("name", ["series", "ladder"])
def test_the_long_task_needs_the_long_canvases(name):
    lengths = [len(p.answer) for p in get_task(name).problems("test", 300)]
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
        start, ops = re.fullmatch(r"from (\d{3}) do((?: [A-Z][-+*]\d\d)+)\n", p.prompt).groups()
        ops = ops.split()
        lines, final = _trace(p)
        assert lines[0] == f"from {start}" and 2 <= len(ops) == len(lines) - 1 <= 8
        assert len({len(line) for line in lines[1:]}) == 1        # one width: values read at a fixed offset
        value = int(start)
        for i, (op, line) in enumerate(zip(ops, lines[1:])):
            tag, sign, k = op[0], op[1], int(op[2:])
            assert tag == "ABCDEFGH"[i]
            new = {"+": value + k, "-": value - k, "*": value * k}[sign]    # the prompt alone says what follows
            assert line == f"{op}: {value:03d}{sign}{k:02d}={new:03d}" and 0 <= new <= 999, line
            value = new
        assert int(final) == value


@pytest.mark.parametrize("name, most", [("columns", 8), ("columns-short", 6)])
def test_columns_worked_lines_compute_the_answer(name, most):
    import re

    ops, widths = set(), set()
    for p in get_task(name).problems("test", 300):
        word, expr = p.prompt.split()
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", expr).groups()
        assert word == {"+": "sum", "-": "diff"}[op] and 3 <= len(a) <= most and len(b) <= len(a)
        widths.add(len(a))
        ops.add(op)
        n, b = len(a), b.rjust(len(a), "0")
        lines, final = _trace(p)
        assert len(lines) == n and len({len(line) for line in lines}) == 1
        flag, got = 0, ""
        for i, line in enumerate(lines):
            col = n - 1 - i
            x, y = int(a[col]), int(b[col])
            head, shifted, written = line.split(" | ")
            if op == "+":
                x2, y2, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d\d)", head).groups())
                assert s == x + y + c
                flag_out, digit = s // 10, s % 10
            else:
                k, x2, y2, c, digit = map(int, re.fullmatch(r"(\d)(\d)-(\d)-(\d)=(\d)", head).groups())
                assert (k == 1) == (x - y - c < 0) and digit == x + 10 * k - y - c
                flag_out = k
            assert (x2, y2, c) == (x, y, flag)
            got = str(digit) + got
            if col == 0 and op == "+" and flag_out:
                got = "1" + got
            zeros = "0" * (i + 1)
            assert shifted == f"{zeros}{a[:col]}{op}{zeros}{b[:col]}" and written == got.rjust(n + 1, "_")
            flag = flag_out
        assert int(final) == int(got) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert ops == {"+", "-"} and widths == set(range(3, most + 1))


@pytest.mark.parametrize("name, letters, numbers", [("listops", 12, 7), ("listops-short", 8, 5)])
def test_listops_worked_lines_compute_the_answer(name, letters, numbers):
    from collections import Counter

    seen_ops, sizes = set(), set()
    for p in get_task(name).problems("test", 300):
        op, items = p.prompt.rstrip("\n").split(": ")
        seen_ops.add(op)
        sizes.add((op == "count", len(items) if op == "count" else len(items.split())))
        lines, final = _trace(p)
        assert len({len(line) for line in lines}) == 1
        if op == "count":
            assert len(lines) == len(items)
            for i, (c, line) in enumerate(zip(items, lines)):
                counts = Counter(items[:i + 1])
                assert line == f"{c} | {'_' * (i + 1)}{items[i + 1:]} | " + "".join(f"{k}{counts[k]}" for k in "abcde")
            assert final == lines[-1].split(" | ")[-1]
            continue
        items = items.split()
        assert len(lines) == len(items) and all(len(x) == 2 for x in items)
        left, out = list(items), []
        for line in lines:
            word, rest = line.split(" ", 1)
            x, remaining, taken = rest.split(" | ")
            live = [j for j, v in enumerate(left) if v != "__"]
            j = live[-1] if op == "reverse" else min(live, key=lambda j: (int(left[j]), j))
            assert word == "take" and x == left[j]
            left[j] = "__"
            out.append(x)
            assert remaining.split() == left and taken.split() == out + ["__"] * (len(items) - len(out))
        expected = sorted(items, key=int) if op == "sort" else items[::-1]
        assert final.split() == out == expected
    assert seen_ops == {"sort", "reverse", "count"}
    assert sizes == {(True, k) for k in range(4, letters + 1)} | {(False, k) for k in range(3, numbers + 1)}


@pytest.mark.parametrize("name", ["columns-short", "listops-short"])
def test_the_short_variants_fit_a_256_token_canvas_with_their_eos(name):
    """Their answers (and one EOS) fit generation length 256, so a diffusion run trains them at
    that canvas (train draws only canvases longer than a task's longest answer) and a table at
    256 scores every problem; the full tasks' longest answers do not fit."""
    task = get_task(name)
    longest = max(len(p.answer) for s in ("train", "test") for p in task.problems(s, 2000))
    assert longest == task.max_answer_tokens < 256
    assert get_task(name.removesuffix("-short")).max_answer_tokens >= 256


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


def test_ladder_worked_lines_count_down_the_additions_the_prompt_asks_for():
    """Every line adds the step to the value the line before ended with, in four fixed-width
    digits, and counts the additions still to come; the last says 00 and the final line repeats
    its result."""
    import re

    for p in get_task("ladder").problems("test", 100):
        start, k, n = map(int, re.fullmatch(r"from (\d{4}) add (\d{2}), (\d{2}) times\n", p.prompt).groups())
        lines, final = _trace(p)
        assert len(lines) == n
        total = start
        for left, line in zip(range(n - 1, -1, -1), lines):
            assert re.fullmatch(r"\d{2} \d{4}\+\d{2}=\d{4}", line)
            assert (int(line[:2]), int(line[3:7]), int(line[8:10]), int(line[11:])) == (left, total, k, total + k)
            total += k
        assert final == f"{total:04d}" and get_task("ladder").score(p, p.answer)


@pytest.mark.parametrize("name", sorted(RANGES))
def test_workload_scoring_is_exact_match_on_the_final_line(name):
    task = get_task(name)
    for p in task.problems("test", 20):
        lines, final = _trace(p)
        assert task.score(p, p.answer)
        wrong = final[:-1] + ("1" if final[-1] != "1" else "2")
        assert not task.score(p, "\n".join(lines) + "\n#### " + wrong)
        assert not task.score(p, "\n".join(lines))
