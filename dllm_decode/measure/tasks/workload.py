"""The workload tasks: multi-step problems whose later answer tokens depend on values computed in
earlier ones, with answers long enough (40 to 900 tokens) that generation lengths 256 to 1024 are
a real use. Every answer is a worked trace, one line per step, then the ``#### ANSWER`` line.

- ``echo``: copy a string of 16 to 120 letters; every answer position is fixed by the prompt, so
  parallel decoding cannot hurt. The workload mix uses the fixed-length ``copy`` as its control
  instead: at a variable offset the copy needs a content lookup small models learn slowly.
- ``chain`` (arithmetic): 2 to 8 operations applied in turn to a running value (``from 017 do
  A+26 B*03``); the answer works one line per operation (``B*03: 043*03=129``), each line starting
  from the value the line before ended with.
- ``columns`` (arithmetic): addition or subtraction of 3- to 8-digit numbers, one worked line per
  column from the right with its carry or borrow, then both numbers shifted past the columns done
  and the digits written so far.
- ``listops`` (dependency): sort (take the smallest), reverse (take the last) or a running count
  of letters, one line per item with the list, its taken items blanked, and the result so far.
- ``columns-short`` and ``listops-short``: the same on fewer digits and items, so that every
  answer fits a 256-token canvas (about a quarter of ``columns`` answers and two fifths of
  ``listops`` ones do not).
- ``series`` (long): add a step to a start value until the total passes a limit, one worked line
  per addition; 400 to 900 tokens. When to stop depends on the last value written.
- ``ladder`` (long): add a step to a start value a given number of times, one worked line per
  addition that also counts the additions left (``07 0371+18=0389``); 400 to 900 tokens. The
  stop is read from the line before (``00``), where ``series`` compares the value with a limit
  in the prompt, many lines back: the 12.8M-parameter AR model trained on the workload mix
  never learned that comparison (its chance of stopping is no higher at the true stop than
  lines before it), so every ``series`` answer it writes runs on.

Every worked line carries the state the next line needs, and the lines of one answer have one
width (numbers zero-padded, taken items blanked rather than removed), so a line reads the line
before it at fixed offsets, plus at most one read of the prompt keyed by a unique character
(chain's step tag). Attention with rotary positions finds a fixed offset quickly; a read whose
offset varies (the i-th column from the right, the i-th list item, a variable's line among
distractors) is a lookup a small model learns slowly. Measured on the 12.8M-parameter AR model
after 4,200 steps on the first version of these tasks, which read that way: teacher-forced, 15%
of chain's and listops' characters were wrong and 9% of columns', and no held-out answer came out
whole, while 300 steps on ``series`` alone (each line read from the line before) brought it to
0.03 nats a character.

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


TAGS = string.ascii_uppercase     # chain's step tags: a one-character key the answer looks up


def _chain_op(rng: random.Random, v: int) -> tuple[str, int, int]:
    """One step applied to value `v` -> (operator, operand, new value); values stay in 0..999."""
    ops = [o for o, ok in (("+", v <= 989), ("-", v >= 10), ("*", 2 * v <= 999 and v > 0)) if ok]
    op = rng.choice(ops)
    if op == "*":
        k = rng.randint(2, min(9, 999 // v))
        return op, k, v * k
    k = rng.randint(1, min(99, 999 - v) if op == "+" else min(99, v))
    return op, k, v + k if op == "+" else v - k


class Chain(Task):
    name = "chain"
    kind = "arithmetic"
    description = "2-8 chained operations on a running value, one worked line per step"
    steps = (2, 8)
    max_answer_tokens = len("from 999\n") + 8 * len("H+99: 999+99=999\n") + len(FINAL) + 3
    max_prompt_tokens = len("from 999 do\n") + 8 * len(" H+99")

    def sample(self, rng: random.Random):
        n = rng.randint(*self.steps)
        v = rng.randint(10, 99)
        prompt, work = f"from {v:03d} do", [f"from {v:03d}"]
        for tag in TAGS[:n]:
            op, k, nv = _chain_op(rng, v)
            prompt += f" {tag}{op}{k:02d}"
            work.append(f"{tag}{op}{k:02d}: {v:03d}{op}{k:02d}={nv:03d}")
            v = nv
        return prompt + "\n", "\n".join(work) + f"\n{FINAL}{v}", {"steps": n, "value": v}


def _columns(a: str, b: str, op: str) -> tuple[list[str], str]:
    """Worked lines of a op b (digit strings of one length n) -> (lines, result digits).

    A line works one column from the right (``x+y+c=ss``, or ``1x-y-b=d`` whose leading 1 is the
    borrow), then carries what the next line needs: both numbers shifted right by the column
    done (zero-filled, so they keep their width) and the digits written so far, right-aligned
    in n + 1 places."""
    n, lines, flag, got = len(a), [], 0, ""
    for i in range(n - 1, -1, -1):
        x, y = int(a[i]), int(b[i])
        if op == "+":
            s = x + y + flag
            head, flag, digit = f"{x}+{y}+{flag}={s:02d}", s // 10, s % 10
        else:
            borrow = int(x - y - flag < 0)
            head, digit = f"{borrow}{x}-{y}-{flag}={x + 10 * borrow - y - flag}", x + 10 * borrow - y - flag
            flag = borrow
        got = str(digit) + got
        if i == 0 and op == "+" and flag:
            got = "1" + got
        shifted = f"{'0' * (n - i)}{a[:i]}{op}{'0' * (n - i)}{b[:i]}"
        lines.append(f"{head} | {shifted} | {got.rjust(n + 1, '_')}")
    return lines, got


class Columns(Task):
    name = "columns"
    kind = "arithmetic"
    description = "3-8 digit addition or subtraction, one worked line per column with its carry"
    digits = (3, 8)
    max_answer_tokens = 8 * len("9+9+1=19 | 00000000+00000000 | 999999999\n") + len(FINAL) + 9
    max_prompt_tokens = len("diff 99999999-99999999\n")

    def sample(self, rng: random.Random):
        a = rng.randint(10 ** (rng.randint(*self.digits) - 1), 10 ** self.digits[1] - 1)
        a = int(str(a)[:rng.randint(self.digits[0], self.digits[1])])      # 3-8 digits, uniform
        b = rng.randint(10 ** (rng.randint(1, len(str(a))) - 1), 10 ** len(str(a)) - 1)
        op = "+" if rng.random() < 0.5 else "-"
        if op == "-":
            a, b = max(a, b), min(a, b)
        lines, result = _columns(str(a), str(b).rjust(len(str(a)), "0"), op)
        prompt = f"{'sum' if op == '+' else 'diff'} {a}{op}{b}\n"
        return prompt, "\n".join(lines) + f"\n{FINAL}{int(result)}", {"a": a, "b": b}


def _pick_trace(items: list[str], last: bool) -> tuple[list[str], list[str]]:
    """One line per item: the item taken (the smallest, or the last left), the list with the
    taken items blanked (so every item keeps its place), the items taken so far in their slots."""
    rest, out, lines = list(items), [], []
    blank = "__"
    for _ in items:
        left = [i for i, x in enumerate(rest) if x != blank]
        i = left[-1] if last else min(left, key=lambda j: (rest[j], j))
        out.append(rest[i])
        rest[i] = blank
        slots = out + [blank] * (len(items) - len(out))
        lines.append(f"take {out[-1]} | {' '.join(rest)} | {' '.join(slots)}")
    return lines, out


def _count_trace(items: str) -> tuple[list[str], str]:
    """One line per letter: the letter, the list with the letters counted so far blanked, the
    running counts of a to e."""
    counts = dict.fromkeys("abcde", 0)
    lines = []
    for i, c in enumerate(items):
        counts[c] += 1
        state = "".join(f"{k}{n}" for k, n in counts.items())
        lines.append(f"{c} | {'_' * (i + 1)}{items[i + 1:]} | {state}")
    return lines, state


class ListOps(Task):
    name = "listops"
    kind = "dependency"
    description = "sort, reverse or running letter count of a list, one worked line per item"
    max_answer_tokens = 7 * len("take 99 | __ __ __ __ __ __ __ | 99 99 99 99 99 99 99\n") + len(FINAL) + 20
    max_prompt_tokens = len("reverse: \n") + 3 * 7 - 1

    letters = (4, 12)           # how many letters a count reads
    numbers = (3, 7)            # how many numbers a sort or a reverse takes

    def sample(self, rng: random.Random):
        op = rng.choice(("sort", "reverse", "count"))
        if op == "count":
            items = "".join(rng.choice("abcde") for _ in range(rng.randint(*self.letters)))
            lines, final = _count_trace(items)
            prompt = f"{op}: {items}\n"
        else:
            nums = [f"{rng.randint(0, 99):02d}" for _ in range(rng.randint(*self.numbers))]
            lines, out = _pick_trace(nums, last=op == "reverse")
            final = " ".join(out)
            prompt = f"{op}: {' '.join(nums)}\n"
        return prompt, "\n".join(lines) + f"\n{FINAL}{final}", {"op": op}


class ColumnsShort(Columns):
    """``columns`` at 3 to 6 digits: every answer fits a 256-token canvas (at 7 and 8 digits a
    quarter of ``columns`` answers do not), so a table at generation length 256 measures the
    decoding, not the truncation, and a diffusion model trains the task at that canvas too."""
    name = "columns-short"
    description = "3-6 digit addition or subtraction, one worked line per column (answers fit 256 tokens)"
    digits = (3, 6)
    max_answer_tokens = 6 * len("9+9+1=19 | 000000+000000 | 9999999\n") + len(FINAL) + 7
    max_prompt_tokens = len("diff 999999-999999\n")


class ListOpsShort(ListOps):
    """``listops`` on lists that fit a 256-token canvas (3 to 5 numbers, 4 to 8 letters), as
    ``columns-short``."""
    name = "listops-short"
    description = "sort, reverse or running count of 3-5 numbers or 4-8 letters (answers fit 256 tokens)"
    letters = (4, 8)
    numbers = (3, 5)
    max_answer_tokens = 5 * len("take 99 | __ __ __ __ __ | 99 99 99 99 99\n") + len(FINAL) + 14
    max_prompt_tokens = len("reverse: \n") + 3 * 5 - 1


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


class Ladder(Task):
    name = "ladder"
    kind = "long"
    description = "add a step to a start value a given number of times, counting down (400-900 tokens)"
    rungs = (25, 55)
    max_answer_tokens = 55 * len("54 9999+99=9999\n") + len(FINAL) + 4
    max_prompt_tokens = len("from 9999 add 99, 55 times\n")

    def sample(self, rng: random.Random):
        start, k, n = rng.randint(10, 999), rng.randint(3, 29), rng.randint(*self.rungs)
        values = [start + i * k for i in range(n + 1)]
        work = [f"{n - 1 - i:02d} {values[i]:04d}+{k:02d}={values[i + 1]:04d}" for i in range(n)]
        return (f"from {start:04d} add {k:02d}, {n:02d} times\n", "\n".join(work) + f"\n{FINAL}{values[-1]:04d}",
                {"n": n})
