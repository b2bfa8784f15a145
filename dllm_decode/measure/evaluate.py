"""Score a model on task problems: decode, extract the final answer, exact-match it.

`evaluate` runs a diffusion model under a recipe through the engine; `evaluate_ar` runs greedy
decoding of an ``AutoModelForCausalLM`` (with its KV cache) on the same problems, so both give
the same record shape and can share a table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

import torch

from dllm_decode.eos import first_stop
from dllm_decode.measure.ar_decode import greedy_decode
from dllm_decode.models.loader import encode_prompts
from dllm_decode.measure.tasks import Problem, get_task


@dataclass
class ProblemRecord:
    task: str
    index: int
    prompt: str
    completion: str
    correct: bool
    nfe: int
    tokens: int               # generated tokens up to and including the first EOS
    flops: float = 0.0        # matmul FLOPs the model computed for this problem (its share of the batch)
    steps: int = 0            # forwards of the request (batch) it was decoded in

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EvalResult:
    records: list[ProblemRecord]
    seconds: float                              # wall time of all decoding
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.records) / max(1, len(self.records))

    @property
    def nfe(self) -> float:
        return sum(r.nfe for r in self.records) / max(1, len(self.records))

    @property
    def seconds_per_problem(self) -> float:
        return self.seconds / max(1, len(self.records))

    @property
    def flops_per_problem(self) -> float:
        return sum(r.flops for r in self.records) / max(1, len(self.records))

    @property
    def flops_per_forward(self) -> float:
        """Computed FLOPs per forward per row: the batch's FLOPs over its forwards and rows."""
        return sum(r.flops for r in self.records) / max(1, sum(r.steps for r in self.records))


def _summarise(records: list[ProblemRecord], seconds_by_task: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r.task for r in records):
        rs = [r for r in records if r.task == name]
        out[name] = {"n": len(rs), "accuracy": sum(r.correct for r in rs) / len(rs),
                     "nfe": sum(r.nfe for r in rs) / len(rs),
                     "seconds_per_problem": seconds_by_task[name] / len(rs)}
    return out


def generated_tokens(ids: Sequence[int], eos_ids: Collection[int]) -> int:
    """Generated tokens up to and including the first EOS (the throughput convention of bench
    and of the lm-eval request logs)."""
    return min(first_stop(ids, eos_ids) + 1, len(ids))


def answers_longer_than(problems: Sequence[Problem], tokenizer, gen_length: int) -> dict[str, tuple[int, int]]:
    """Per task: (problems whose reference answer takes more than ``gen_length`` tokens, problems).
    Those cannot be written in full at that generation length, so exact match on them is capped:
    at gen 256, a quarter of the ``columns`` answers and almost half of the ``listops`` ones."""
    counts: dict[str, list[int]] = {}
    for p in problems:
        c = counts.setdefault(p.task, [0, 0])
        c[0] += len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) > gen_length
        c[1] += 1
    return {t: (k, n) for t, (k, n) in counts.items()}


def truncation_note(counts: dict[str, tuple[int, int]], gen_length: int) -> str | None:
    """One line naming the tasks whose answers do not all fit ``gen_length`` (None when all fit)."""
    over = [f"{k} of {n} `{t}`" for t, (k, n) in counts.items() if k]
    if not over:
        return None
    return (f"generation length {gen_length} is shorter than the reference answers of {', '.join(over)} "
            "problems: those cannot be exact, so the accuracy there is capped (raise --gen-length)")


def evaluate(model, tokenizer, recipe, problems: Sequence[Problem], pm=None, policy=None,
             progress: bool = False) -> EvalResult:
    """Decode every problem with `model` under `recipe` (task by task, batched as the recipe
    says) and score it with its task's scorer. `policy`: an already resolved recipe policy."""
    from dllm_decode.engine import Decoder

    decoder = Decoder(model, recipe, pm=pm, tokenizer=tokenizer, policy=policy)
    eos = {int(model.spec.eos_token_id)} | ({int(model.spec.eot_token_id)} if model.spec.eot_token_id is not None
                                           else set())
    records: list[ProblemRecord] = []
    seconds: dict[str, float] = {}
    for name in dict.fromkeys(p.task for p in problems):
        group = [p for p in problems if p.task == name]
        ids = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in group]
        t0 = time.perf_counter()
        result = decoder.generate(ids, progress=progress)
        seconds[name] = time.perf_counter() - t0
        records += score_rows(group, result.rows, eos)
    return EvalResult(records, sum(seconds.values()), _summarise(records, seconds))


def score_rows(problems: Sequence[Problem], rows, eos: set[int]) -> list[ProblemRecord]:
    """Records of decoded rows (``RowResult``, decoded with a tokenizer) against their problems."""
    out = []
    for p, row in zip(problems, rows):
        text = row.text or ""
        out.append(ProblemRecord(p.task, p.index, p.prompt, text, get_task(p.task).score(p, text),
                                 row.nfe, generated_tokens(row.tokens, eos), row.flops, row.steps))
    return out


@torch.inference_mode()
def evaluate_ar(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int = 96,
                batch_size: int = 64) -> EvalResult:
    """Greedy decoding of a causal LM with its KV cache (prompts left-padded), finished rows
    leaving the batch (``ar_decode.greedy_decode``); one forward per generated token, so NFE =
    tokens generated until the row's EOS."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    records: list[ProblemRecord] = []
    seconds: dict[str, float] = {}
    for name in dict.fromkeys(p.task for p in problems):
        task = get_task(name)
        group = [p for p in problems if p.task == name]
        t0 = time.perf_counter()
        for s in range(0, len(group), batch_size):
            chunk = group[s:s + batch_size]
            ids, att = encode_prompts(tokenizer, [p.prompt for p in chunk], pad_token_id=pad,
                                      device=model.device, add_special_tokens=False)
            out = greedy_decode(model, ids, att, max_new_tokens, eos, pad)
            for p, gen in zip(chunk, out.tolist()):
                n = generated_tokens(gen, {eos})
                text = tokenizer.decode(gen[:n], skip_special_tokens=True)
                records.append(ProblemRecord(name, p.index, p.prompt, text, task.score(p, text), n, n))
        seconds[name] = time.perf_counter() - t0
    return EvalResult(records, sum(seconds.values()), _summarise(records, seconds))


def load_ar(path: str, device: str = "cpu", what: str | None = None):
    """An ``AutoModelForCausalLM`` and its tokenizer from a local directory (no remote code).
    ``what``: where ``path`` came from (``"--ar-model"``), named with it in errors.

    :raises CheckpointError: as :func:`~dllm_decode.models.loader.load_causal_lm`, or when the
        directory has no tokenizer (or one transformers cannot read)."""
    from dllm_decode.errors import CheckpointError
    from dllm_decode.models.loader import load_causal_lm, load_tokenizer

    model = load_causal_lm(path, device=device, what=what)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        named = f"{what} {str(path)!r}" if what else str(path)
        raise CheckpointError(f"{named}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json "
                              "or tokenizer.model); the AR rows decode text")
    return model, tokenizer
