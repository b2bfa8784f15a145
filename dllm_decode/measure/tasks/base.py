"""Problems with checkable answers: the `Problem` record, the `Task` base class, the answer
extractor and the scorer.

Answers follow GSM8K's shape: a worked line where the task has one, then a final ``#### ANSWER``
line. The scorer is exact match on the final answer; tasks that accept several answers (a free
choice among offered options) check validity instead of comparing with one reference string.
"""

from __future__ import annotations

import itertools
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

FINAL = "#### "
TEST_BUCKETS = 5        # a prompt is held out when crc32(prompt) % TEST_BUCKETS == 0


@dataclass(frozen=True)
class Problem:
    task: str
    index: int                      # position in its (task, split, seed) stream
    prompt: str
    answer: str                     # one reference completion: [worked line +] final line
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The reference final answer (one of several for multi-answer tasks)."""
        return extract_answer(self.answer) or ""

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "index": self.index, "prompt": self.prompt,
                "answer": self.answer, "target": self.target, "meta": self.meta}


def extract_answer(completion: str) -> str | None:
    """The text after the last ``#### `` marker, up to the end of its line; None if absent."""
    at = completion.rfind(FINAL)
    if at < 0:
        return None
    return completion[at + len(FINAL):].split("\n", 1)[0].strip()


def split_of(prompt: str) -> str:
    """'test' or 'train', fixed by the prompt text itself, so the splits never share a prompt
    whatever seeds or sizes are asked for."""
    return "test" if zlib.crc32(prompt.encode()) % TEST_BUCKETS == 0 else "train"


class Task:
    """A seeded problem generator. Subclasses set `name`, `kind`, `description` and implement
    `sample(rng) -> (prompt, answer, meta)`; multi-answer tasks override `is_valid`."""

    name: str = ""
    kind: str = ""              # 'control' | 'dependency' | 'arithmetic'
    description: str = ""
    max_answer_tokens: int = 0  # longest reference answer, in characters (= tokens)

    def sample(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        raise NotImplementedError

    def stream(self, split: str, seed: int = 0) -> Iterator[Problem]:
        """The endless, deterministic stream of `split` problems for `seed` (training reads it
        batch by batch; evaluation takes a prefix with `problems`)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        index = 0
        while True:
            prompt, answer, meta = self.sample(rng)
            if split_of(prompt) == split:
                yield Problem(self.name, index, prompt, answer, meta)
                index += 1

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """The first `n` problems of the `split` stream for `seed`."""
        return list(itertools.islice(self.stream(split, seed), n))

    def is_valid(self, problem: Problem, final: str) -> bool:
        return final == problem.target

    def score(self, problem: Problem, completion: str) -> bool:
        """Exact match of the extracted final answer (validity for multi-answer tasks)."""
        final = extract_answer(completion)
        return final is not None and self.is_valid(problem, final)
