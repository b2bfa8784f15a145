"""The built-in tasks.

- ``copy`` (control): copy a 32-letter string. Every answer position is determined by the
  prompt, so committing many tokens per forward cannot hurt; 70-token answers make caching
  matter.
- ``repeat`` (dependency): pick any one of 2-3 offered digits and write it n times (n six to
  ten, written as a word). Each position alone is a fair coin over the options, but all must
  agree: committing several at once from the marginals mixes them.
- ``distinct`` (dependency): name three different digits among 4-5 offered. Every position
  alone prefers the same digits, so committing them together from the marginals repeats a digit;
  one at a time, each new digit avoids those already written. Not in the reference mix yet.
- ``case`` (dependency): copy a word entirely in upper or entirely in lower case, the choice
  free. A long answer whose every letter carries the same hidden bit.
- ``add`` (arithmetic): two-digit addition with a worked column sum. Not in the reference
  models' training mix: it does not learn within the CPU training budget at their size.

The free-choice tasks have no worked line: a line that names the choice ("pick 7", "upper")
settles it before the answer, so a well-trained model commits it alone and parallel decoding of
the rest costs nothing; without it the choice lives in the answer's own positions.
"""

from __future__ import annotations

import random
import string

from dllm_decode.measure.tasks.base import FINAL, Problem, Task

COUNTS = {6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


class Copy(Task):
    name = "copy"
    kind = "control"
    description = "copy a 32-letter string (deterministic; parallel decoding cannot hurt)"
    length = 32
    max_answer_tokens = 2 * 32 + 1 + len(FINAL)
    max_prompt_tokens = len("copy: \n") + 32

    def sample(self, rng: random.Random):
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(self.length))
        return f"copy: {s}\n", f"{s}\n{FINAL}{s}", {}


class Repeat(Task):
    name = "repeat"
    kind = "dependency"
    description = "pick one of 2-3 offered digits and write it n times (all positions must agree)"
    max_answer_tokens = len(FINAL) + 10
    max_prompt_tokens = len("pick one of 0 1 2, seven times\n")

    def sample(self, rng: random.Random):
        options = rng.sample(string.digits, rng.choice((2, 3)))
        n = rng.randint(6, 10)
        d = rng.choice(options)
        # The count is a word, so the only digits in the prompt are the options: a digit count
        # taught the small models to repeat a digit of the count ("of 4 5, 10 times" -> 1111111111).
        prompt = f"pick one of {' '.join(options)}, {COUNTS[n]} times\n"
        return prompt, f"{FINAL}{d * n}", {"options": options, "n": n}

    def is_valid(self, problem: Problem, final: str) -> bool:
        n = problem.meta["n"]
        return len(final) == n and final[0] in problem.meta["options"] and final == final[0] * n


class Distinct(Task):
    name = "distinct"
    kind = "dependency"
    description = "name three different digits among 4-5 offered (no digit may repeat)"
    max_answer_tokens = len(FINAL) + 3
    max_prompt_tokens = len("three different of 0 1 2 3 4\n")

    def sample(self, rng: random.Random):
        options = rng.sample(string.digits, rng.choice((4, 5)))
        a, b, c = rng.sample(options, 3)
        return f"three different of {' '.join(options)}\n", f"{FINAL}{a}{b}{c}", {"options": options}

    def is_valid(self, problem: Problem, final: str) -> bool:
        return len(final) == 3 and len(set(final)) == 3 and all(c in problem.meta["options"] for c in final)


class Case(Task):
    name = "case"
    kind = "dependency"
    description = "write a word entirely in upper or entirely in lower case (free choice)"
    length = 20
    max_answer_tokens = len(FINAL) + 20
    max_prompt_tokens = len("upper or lower: \n") + 20

    def sample(self, rng: random.Random):
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(self.length))
        upper = rng.random() < 0.5
        return f"upper or lower: {w}\n", f"{FINAL}{w.upper() if upper else w}", {"word": w}

    def is_valid(self, problem: Problem, final: str) -> bool:
        w = problem.meta["word"]
        return final in (w, w.upper())


class Add(Task):
    name = "add"
    kind = "arithmetic"
    description = "two-digit addition with a worked column sum"
    max_answer_tokens = len("7+5=12 carry 1, 4+8+1=13\n") + len(FINAL) + 3
    max_prompt_tokens = len("add 99+99\n")

    def sample(self, rng: random.Random):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        lo = a % 10 + b % 10
        hi = a // 10 + b // 10 + lo // 10
        work = f"{a % 10}+{b % 10}={lo}" + (" carry 1" if lo >= 10 else "") + \
            f", {a // 10}+{b // 10}" + ("+1" if lo >= 10 else "") + f"={hi}"
        return f"add {a}+{b}\n", f"{work}\n{FINAL}{a + b}", {}
