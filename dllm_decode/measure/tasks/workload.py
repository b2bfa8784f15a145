"""The workload tasks: multi-step problems whose later answer tokens depend on values computed in
earlier ones, with answers long enough (40 to 900 tokens) that generation lengths 256 to 1024 are
a real use. Every answer is a worked trace, one line per step, then the ``#### ANSWER`` line.

- ``echo``: copy a string of 16 to 120 letters; every answer position is fixed by the prompt, so
  parallel decoding cannot hurt. The workload mix uses the fixed-length ``copy`` as its control
  instead: at a variable offset the copy needs a content lookup small models learn slowly.
- ``chain`` (arithmetic): 2 to 8 chained assignments (``b = a + 26``, ``c = b * 3``, some
  reading two earlier variables), shuffled in among unrelated ones; the answer works each needed
  line out (``b = a + 26 = 17 + 26 = 43``) and gives the asked variable.
- ``columns`` (arithmetic): addition or subtraction of 3- to 8-digit numbers, one worked line per
  column from the right with its carry or borrow.
- ``listops`` (dependency): sort (selection trace), reverse (taken from the end), or a running
  count of letters, each with one line per item.
- ``series`` (long): add a step to a start value until the total passes a limit, one worked line
  per addition; 400 to 900 tokens. When to stop depends on the last value written.

Only characters of the character tokenizer's default set are used (tests check it), so models
for the workload keep the shipped models' tokenizer and ids.
"""

from __future__ import annotations

import random
import string

from dllm_decode.measure.tasks.base import FINAL, Task


class Echo(Task):
    name = "echo"
    kind = "control"
    description = "copy a string of 16-120 letters (deterministic; parallel decoding cannot hurt)"
    lengths = (16, 120)
    max_answer_tokens = 2 * 120 + 1 + len(FINAL)
    max_prompt_tokens = len("echo: \n") + 120

    def sample(self, rng: random.Random):
        n = rng.randint(*self.lengths)
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
        return f"echo: {s}\n", f"{s}\n{FINAL}{s}", {"n": n}


def _chain_step(rng: random.Random, chain: list[tuple[str, int]], name: str) -> tuple[str, str, int]:
    """One derived assignment of `chain` (names and values so far) -> (prompt line, worked line,
    value). Values stay within 0..999 so every number is at most three digits."""
    prev, pv = chain[-1]
    if len(chain) >= 2 and rng.random() < 0.3:          # reads two earlier variables
        other, ov = rng.choice(chain[:-1])
        op = "+" if pv + ov <= 999 and (pv < ov or rng.random() < 0.5) else "-"
        a, av, b, bv = (prev, pv, other, ov) if op == "+" or pv >= ov else (other, ov, prev, pv)
        v = av + bv if op == "+" else av - bv
        return f"{name} = {a} {op} {b}", f"{name} = {a} {op} {b} = {av} {op} {bv} = {v}", v
    ops = [o for o, ok in (("+", pv <= 989), ("-", pv >= 10), ("*", 2 * pv <= 999)) if ok]
    op = rng.choice(ops)
    if op == "*":
        k = rng.randint(2, min(9, 999 // pv) if pv else 9)
        v = pv * k
    else:
        k = rng.randint(1, min(99, 999 - pv) if op == "+" else min(99, pv))
        v = pv + k if op == "+" else pv - k
    return f"{name} = {prev} {op} {k}", f"{name} = {prev} {op} {k} = {pv} {op} {k} = {v}", v


class Chain(Task):
    name = "chain"
    kind = "arithmetic"
    description = "2-8 chained assignments among distractors; each needed line worked out"
    steps = (2, 8)
    max_answer_tokens = 300
    # the start, 8 steps and 2 distractors, one line each, then the question
    max_prompt_tokens = 11 * len("x = y + 99\n") + len("what is x?\n")

    def sample(self, rng: random.Random):
        n = rng.randint(*self.steps)
        extra = rng.randint(0, 2)
        names = rng.sample(string.ascii_lowercase, n + 1 + extra)
        start = rng.randint(10, 99)
        chain, prompt_lines, work = [(names[0], start)], [f"{names[0]} = {start}"], [f"{names[0]} = {start}"]
        for name in names[1:n + 1]:
            line, worked, v = _chain_step(rng, chain, name)
            chain.append((name, v))
            prompt_lines.append(line)
            work.append(worked)
        for name in names[n + 1:]:      # distractors: defined, never needed; inserted anywhere
            line = f"{name} = {rng.randint(10, 99)}"
            prompt_lines.insert(rng.randint(0, len(prompt_lines)), line)
        ask, value = chain[-1]
        prompt = "\n".join(prompt_lines) + f"\nwhat is {ask}?\n"
        return prompt, "\n".join(work) + f"\n{FINAL}{value}", {"steps": n, "value": value}


def _add_columns(a: int, b: int) -> list[str]:
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s} write {s % 10} carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"write {carry}")
    return lines


def _sub_columns(a: int, b: int) -> list[str]:
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, borrow = [], 0
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        v = x - y - borrow
        if v < 0:
            lines.append(f"{x}+10-{y}-{borrow}={v + 10} write {v + 10} borrow 1")
            borrow = 1
        else:
            lines.append(f"{x}-{y}-{borrow}={v} write {v} borrow 0")
            borrow = 0
    return lines


class Columns(Task):
    name = "columns"
    kind = "arithmetic"
    description = "3-8 digit addition or subtraction, one worked line per column with its carry"
    digits = (3, 8)
    max_answer_tokens = 9 * len("9+9+1=19 write 9 carry 1\n") + len(FINAL) + 9
    max_prompt_tokens = len("diff 99999999-99999999\n")

    def sample(self, rng: random.Random):
        a = rng.randint(10 ** (rng.randint(*self.digits) - 1), 10 ** self.digits[1] - 1)
        a = int(str(a)[:rng.randint(self.digits[0], self.digits[1])])      # 3-8 digits, uniform
        b = rng.randint(10 ** (rng.randint(1, len(str(a))) - 1), 10 ** len(str(a)) - 1)
        if rng.random() < 0.5:
            work, result, prompt = _add_columns(a, b), a + b, f"sum {a}+{b}\n"
        else:
            a, b = max(a, b), min(a, b)
            work, result, prompt = _sub_columns(a, b), a - b, f"diff {a}-{b}\n"
        return prompt, "\n".join(work) + f"\n{FINAL}{result}", {"a": a, "b": b}


def _sort_trace(items: list[int]) -> tuple[list[str], str]:
    rest, lines, out = list(items), [], []
    while rest:
        m = min(rest)
        rest.remove(m)
        out.append(m)
        lines.append(f"take {m} left {' '.join(map(str, rest))}".rstrip())
    return lines, " ".join(map(str, out))


def _reverse_trace(items: list[int]) -> tuple[list[str], str]:
    lines = [f"take {items[i]} left {' '.join(map(str, items[:i]))}".rstrip() for i in range(len(items) - 1, -1, -1)]
    return lines, " ".join(map(str, items[::-1]))


def _count_trace(items: list[str]) -> tuple[list[str], str]:
    seen: dict[str, int] = {}
    lines = []
    for c in items:
        seen[c] = seen.get(c, 0) + 1
        lines.append(f"{c} {seen[c]}")
    return lines, " ".join(f"{c}{n}" for c, n in seen.items())


class ListOps(Task):
    name = "listops"
    kind = "dependency"
    description = "sort, reverse or running letter count of a list, one worked line per item"
    max_answer_tokens = 400
    max_prompt_tokens = len("count: \n") + 2 * 24 - 1

    def sample(self, rng: random.Random):
        op = rng.choice(("sort", "reverse", "count"))
        if op == "count":
            items = [rng.choice("abcde") for _ in range(rng.randint(6, 24))]
            lines, final = _count_trace(items)
        else:
            items = [rng.randint(0, 99) for _ in range(rng.randint(4, 10))]
            lines, final = (_sort_trace if op == "sort" else _reverse_trace)(items)
        prompt = f"{op}: {' '.join(map(str, items))}\n"
        return prompt, "\n".join(lines) + f"\n{FINAL}{final}", {"op": op, "items": items}


class Series(Task):
    name = "series"
    kind = "long"
    description = "add a step to a start value until the total passes a limit (400-900 tokens)"
    answer_range = (400, 900)
    max_answer_tokens = 900
    max_prompt_tokens = len("from 999 add 29 until over 3318\n")

    def sample(self, rng: random.Random):
        while True:     # redraw until the answer length falls in range (deterministic per rng)
            start, k, n = rng.randint(10, 999), rng.randint(3, 29), rng.randint(30, 80)
            values = [start + i * k for i in range(n + 1)]
            limit = values[-1] - 1 - rng.randrange(k)        # values[-2] <= limit < values[-1]
            work = [f"{values[i]}+{k}={values[i + 1]}" for i in range(n)]
            answer = "\n".join(work) + f"\n{FINAL}{values[-1]}"
            if self.answer_range[0] <= len(answer) <= self.answer_range[1]:
                return f"from {start} add {k} until over {limit}\n", answer, {"n": n}
