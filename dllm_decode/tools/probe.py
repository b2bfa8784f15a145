"""Teacher-forced reading of a checkpoint on held-out task problems, for a model still in
training: greedy decoding scores 0 on long answers until nearly every character is right, so
this says where it stands before then. Per task: the loss per answer character (the answer and
its EOS), the share of characters whose most likely prediction is wrong, how many answers have no
wrong character, the share of the wrong ones that follow an ``=`` on their line (a worked step's
result, where the arithmetic is), and the first wrong character of the first such answer in its
context. (On a task that accepts several answers, such as ``case``, a character of another valid
answer counts as wrong: the reading compares with the one reference answer.)

An autoregressive checkpoint reads each character after the answer before it. A diffusion one
(LLaDA, Dream) reads it in the state a left-to-right decode of one token per forward visits: the
prompt, the answer before the character, and masks from it to the end of a canvas of
``--gen-length`` positions (longer when the answer is), one canvas per character. A model that
reads every character right there decodes the answer exactly in that order; where it does not,
the reading tells a wrong value (``068*04=3``) from a decoding order that commits too early.
A block-causal one (SDAR) reads the same canvases through its own block-causal attention, so a
character sees the prompt, the answer before it and the masks to the end of its block, and nothing
later: the state its block-by-block decode of one token per forward visits.

    python -m dllm_decode.tools.probe runs/ar-snap --tasks copy,chain,columns --n 8
    python -m dllm_decode.tools.probe models/dream-workload --tasks chain --n 16
    python -m dllm_decode.tools.probe runs/dream-snap --n 200 --device cuda    # on a GPU
    python -m dllm_decode.tools.probe models/dream-workload --tasks ladder --n 48 --gen-length 1024 --stop

``--stop`` reads where answers end instead, for a long answer that a decode must stop at the
right line: the probability of the final line's first token (the ``#`` of ``#### ANSWER``) where
that line starts, whether it is the likeliest token there, and its highest probability at the
line starts before (``--stop-lines K``: the last K of them), each in the same state as above.
``--first K`` reads only each answer's first K characters: a long answer's reading costs one
canvas per character, and its errors tend to start in the first lines.

A training run reads itself the same way as it goes with ``train --probe-every N`` (probe_log.jsonl).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm_decode.measure.evaluate import load_ar
from dllm_decode.measure.tasks import get_task, task_names

CONTEXT = 30        # characters of answer shown before a first wrong one


@dataclass
class Reading:
    task: str
    n: int
    nats_per_char: float
    wrong_share: float          # of answer characters (EOS included)
    whole: int                  # answers with no wrong character
    first_wrong: str            # '...context[expected->predicted]' of the first imperfect answer
    in_results: float = 0.0     # of the wrong characters, the share after an '=' on their line


def encoded_problems(tok, task: str, n: int, seed: int, eos: int):
    """The first `n` held-out problems of `task` as token ids: (prompt, answer with its EOS)."""
    for p in get_task(task).problems("test", n, seed):
        yield (tok(p.prompt, add_special_tokens=False)["input_ids"],
               tok(p.answer, add_special_tokens=False)["input_ids"] + [eos])


def after_equals(tok, answer: list[int]) -> Tensor:
    """(A,) bool: which tokens of `answer` follow an ``=`` on their line (a worked step's result
    and the line's end)."""
    out, seen = [], False
    for t in answer:
        ch = tok.decode([t])
        out.append(seen)
        seen = False if ch.endswith("\n") else seen or "=" in ch
    return torch.tensor(out, dtype=torch.bool)


def read_answers(tok, task: str, n: int, seed: int, eos: int, answer_logits, head: int | None = None) -> Reading:
    """The reading of the first `n` held-out problems of `task`; ``answer_logits(prompt, answer,
    at)`` gives the logits predicting the answer's tokens (its EOS included) at positions `at`.
    With `head`, only each answer's first `head` tokens are read (and counted)."""
    loss, chars, wrong, whole, results = 0.0, 0, 0, 0, 0
    first = ""
    for prompt, answer in encoded_problems(tok, task, n, seed, eos):
        with torch.no_grad():
            read = len(answer) if head is None else min(head, len(answer))
            logits = answer_logits(prompt, answer, range(read)).float()         # (A, V), A = read
        target = torch.tensor(answer[:read])
        miss = logits.argmax(-1) != target                                      # (A,)
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        chars += read
        wrong += int(miss.sum())
        results += int((miss & after_equals(tok, answer[:read])).sum())
        whole += int(not miss.any())
        if not first and miss.any():
            i = int(miss.nonzero()[0, 0])
            shown = tok.decode(target[max(0, i - CONTEXT):i].tolist())
            expected, got = tok.decode([int(target[i])]), tok.decode([int(logits[i].argmax())])
            first = f"...{shown}[{expected}->{got}]"
    return Reading(task, n, loss / chars, wrong / chars, whole, first, results / wrong if wrong else 0.0)


@dataclass
class StopReading:
    task: str
    n: int
    at_stop: float              # mean P(stop token) where the final line starts
    top_at_stop: int            # problems whose likeliest token there is the stop token
    earlier: float | None       # mean over problems of its highest P at the line starts read before (None: none)
    lines: int | None           # line starts read before the final one (None: all)


def line_starts(tok, answer: list[int]) -> list[int]:
    """Token positions where a line of `answer` begins: 0 and each one after a token ending in a newline."""
    return [0] + [i + 1 for i, t in enumerate(answer[:-1]) if tok.decode([t]).endswith("\n")]


def read_stops(tok, task: str, n: int, seed: int, eos: int, answer_logits, lines: int | None = None) -> StopReading:
    """Where an answer stops: the probability of its final line's first token (the ``#`` of
    ``#### ANSWER``, the stop token) at the start of that line, and the highest probability of
    the same token at the `lines` line starts before it (all when None), each read in the state
    ``answer_logits`` gives (``read_answers``), over the first `n` held-out problems of `task`. A
    model that stops by the content reads high at the stop and low before it; one that stops by
    length reads both alike."""
    at_stop, top, earlier = [], 0, []
    for prompt, answer in encoded_problems(tok, task, n, seed, eos):
        starts = line_starts(tok, answer[:-1])
        before = starts[:-1] if lines is None else starts[max(0, len(starts) - 1 - lines):-1]
        stop = answer[starts[-1]]
        with torch.no_grad():
            probs = answer_logits(prompt, answer, [*before, starts[-1]]).float().softmax(-1)  # (R, V)
        at_stop.append(float(probs[-1, stop]))
        top += int(probs[-1].argmax()) == stop
        if before:
            earlier.append(float(probs[:-1, stop].max()))
    return StopReading(task, n, sum(at_stop) / n, top, sum(earlier) / len(earlier) if earlier else None, lines)


def ar_logits(model):
    """``answer_logits(prompt, answer, at)`` of an autoregressive `model`: (len(at), V) logits
    predicting the answer tokens at positions `at`, each after the answer before it."""
    def answer_logits(prompt, answer, at):
        ids = torch.tensor([prompt + answer], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]              # (A, V): predicts answer
        return logits[torch.tensor(list(at), device=logits.device)].cpu()
    return answer_logits


def diffusion_logits(model, gen_length: int = 256, rows: int = 64):
    """``answer_logits(prompt, answer, at)`` of a diffusion checkpoint (a ``Denoiser``): the logits
    of the answer tokens at positions `at`, each in its left-to-right decoding state (module
    docstring), one canvas per position, `rows` canvases per forward. A block-causal model's
    canvases end with the block of the chunk's last position: nothing after it is seen, and a
    reading of answers of hundreds of tokens at a long gen-length gets several times cheaper."""
    mask, size = model.spec.mask_token_id, model.spec.block_size

    def answer_logits(prompt, answer, at):
        P, A = len(prompt), len(answer)
        at = torch.tensor(list(at))                                             # (R,)
        canvas = torch.full((len(at), P + max(gen_length, A)), mask, device=model.device)  # row r reads at[r]
        canvas[:, :P] = torch.tensor(prompt)
        before = torch.arange(A)[None, :] < at[:, None]                         # (R, A): row r shows answer[:at[r]]
        canvas[:, P:P + A] = torch.where(before, torch.tensor(answer), torch.tensor(mask)).to(canvas.device)
        out = []
        for s in range(0, len(at), rows):
            r = torch.arange(s, min(s + rows, len(at)), device=canvas.device)
            end = canvas.shape[1]
            if size:                    # blocks counted from the first position, as the decoder lays them
                end = min(end, (P + int(at[s:s + rows].max())) // size * size + size)
            out.append(model(canvas[s:s + rows, :end])[r - s, P + at[s:s + rows].to(canvas.device)])  # (r, V)
        return torch.cat(out).cpu()
    return answer_logits


def probe_task(model, tok, task: str, n: int, seed: int = 0) -> Reading:
    """Teacher-forced reading of an autoregressive `model` on the first `n` held-out problems of `task`."""
    return read_answers(tok, task, n, seed, tok.eos_token_id, ar_logits(model))


def probe_diffusion_task(model, tok, task: str, n: int, seed: int = 0, gen_length: int = 256,
                         rows: int = 64) -> Reading:
    """The reading of a diffusion checkpoint (a ``Denoiser``) on the first `n` held-out problems of
    `task`, each answer character in its left-to-right decoding state (module docstring)."""
    return read_answers(tok, task, n, seed, model.spec.eos_token_id, diffusion_logits(model, gen_length, rows))


def read_model(model, tok, tasks: list[str], n: int, seed: int = 0, gen_length: int = 256,
               stop: bool = False, lines: int | None = None, head: int | None = None
               ) -> list[Reading] | list[StopReading]:
    """The reading of `model` (an autoregressive ``LlamaForCausalLM`` or a LLaDA / Dream / SDAR
    ``Denoiser``) on each of `tasks`, in eval mode (with `stop`, where it stops: ``read_stops``;
    with `head`, each answer's first `head` tokens only); the caller's train/eval mode is restored."""
    from dllm_decode.models.denoiser import Denoiser

    diffusion = isinstance(model, Denoiser)
    logits = diffusion_logits(model, gen_length) if diffusion else ar_logits(model)
    eos = model.spec.eos_token_id if diffusion else tok.eos_token_id
    was_training = model.training
    model.eval()
    try:
        if stop:
            return [read_stops(tok, t, n, seed, eos, logits, lines) for t in tasks]
        return [read_answers(tok, t, n, seed, eos, logits, head) for t in tasks]
    finally:
        model.train(was_training)


def table(readings: list[Reading]) -> str:
    lines = ["| task | problems | nats / char | chars wrong | of them after `=` | answers with none wrong | "
             "first wrong (expected->predicted) |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in readings:
        shown = r.first_wrong.replace("\n", "\\n").replace("|", "\\|")
        results = f"{100 * r.in_results:.0f}%" if r.wrong_share else ""
        lines.append(f"| `{r.task}` | {r.n} | {r.nats_per_char:.3f} | {100 * r.wrong_share:.1f}% | {results} | "
                     f"{r.whole} / {r.n} | {f'`{shown}`' if shown else ''} |")
    return "\n".join(lines)


def stop_table(readings: list[StopReading]) -> str:
    window = "all" if readings[0].lines is None else f"the {readings[0].lines}"
    lines = ["| task | problems | P(stop) at the stop | stop the top choice there | "
             f"highest P(stop) at {window} line starts before |", "|---|---:|---:|---:|---:|"]
    for r in readings:
        earlier = "" if r.earlier is None else f"{r.earlier:.3f}"
        lines.append(f"| `{r.task}` | {r.n} | {r.at_stop:.3f} | {r.top_at_stop} / {r.n} | {earlier} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dllm_decode.tools.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a checkpoint folder (autoregressive, LLaDA, Dream or SDAR; a training run's --snapshot)")
    ap.add_argument("--tasks", default="workload", help="task names, comma-separated, or a named mix")
    ap.add_argument("--n", type=int, default=8, help="held-out problems per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda")
    ap.add_argument("--gen-length", type=int, default=256,
                    help="diffusion checkpoints: canvas positions after the prompt (at least the answer's)")
    ap.add_argument("--first", type=int, default=None, metavar="K",
                    help="read only each answer's first K tokens (a long answer's costly reading, where its "
                         "errors start)")
    ap.add_argument("--stop", action="store_true",
                    help="read where answers stop instead: P(stop) of the final line's first token (#) "
                         "at its start, against its highest P at the line starts before")
    ap.add_argument("--stop-lines", type=int, default=None, metavar="K",
                    help="with --stop: read the K line starts before the final one (default: all)")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error(f"--n must be at least 1, got {a.n}")
    if a.gen_length < 1:
        ap.error(f"--gen-length must be at least 1, got {a.gen_length}")
    if a.first is not None and (a.first < 1 or a.stop):
        ap.error(f"--first must be at least 1, without --stop; got {a.first}")
    if a.stop_lines is not None and (a.stop_lines < 0 or not a.stop):
        ap.error(f"--stop-lines must be at least 0, with --stop; got {a.stop_lines}")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        tasks = task_names(a.tasks)
        for t in tasks:
            get_task(t)
    except KeyError as e:
        ap.error(f"--tasks: {e.args[0]}")
    from dllm_decode.errors import CheckpointError
    from dllm_decode.models.loader import check_device
    from dllm_decode.tools.model_card import is_ar_checkpoint

    try:
        check_device(a.device, "--device")
    except CheckpointError as e:
        ap.error(str(e))

    if is_ar_checkpoint(Path(a.model)):
        model, tok = load_ar(a.model, device=a.device)
    else:
        from dllm_decode.models import load_model

        model, tok = load_model(a.model, device=a.device)
    readings = read_model(model, tok, tasks, a.n, a.seed, a.gen_length, a.stop, a.stop_lines, a.first)
    print(stop_table(readings) if a.stop else table(readings))


if __name__ == "__main__":
    main()
