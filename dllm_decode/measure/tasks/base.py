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
    kind: str = ""              # 'control' | 'dependency' | 'arithmetic' | 'long'
    description: str = ""
    max_answer_tokens: int = 0  # longest reference answer, in characters (= tokens)
    max_prompt_tokens: int = 0  # longest prompt, in characters (sizes token-budget batches)

    def sample(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        raise NotImplementedError

    def stream(self, split: str, seed: int = 0) -> "ProblemStream":
        """The endless, deterministic stream of `split` problems for `seed` (training reads it
        batch by batch; evaluation takes a prefix with `problems`)."""
        return ProblemStream(self, split, seed)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """The first `n` problems of the `split` stream for `seed`."""
        return list(itertools.islice(self.stream(split, seed), n))

    def is_valid(self, problem: Problem, final: str) -> bool:
        return final == problem.target

    def score(self, problem: Problem, completion: str) -> bool:
        """Exact match of the extracted final answer (validity for multi-answer tasks)."""
        final = extract_answer(completion)
        return final is not None and self.is_valid(problem, final)


class ProblemStream(Iterator[Problem]):
    """An endless iterator over one task's problems whose position can be saved and restored
    (`state_dict` / `load_state_dict`), so an interrupted training run resumes on the very
    problem it would have drawn next."""

    def __init__(self, task: Task, split: str, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.task, self.split, self.seed = task, split, seed
        self.rng = random.Random(f"{task.name}/{split}/{seed}")
        self.index = 0

    def __next__(self) -> Problem:
        while True:
            prompt, answer, meta = self.task.sample(self.rng)
            if split_of(prompt) == self.split:
                problem = Problem(self.task.name, self.index, prompt, answer, meta)
                self.index += 1
                return problem

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task.name, "split": self.split, "seed": self.seed,
                "index": self.index, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.task.name, self.split, self.seed)
        theirs = (state["task"], state["split"], state["seed"])
        if mine != theirs:
            raise ValueError(f"stream state is for task/split/seed {theirs}, this stream is {mine}")
        self.index = state["index"]
        rng = state["rng"]      # a list after a round trip through some serialisers
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
