"""Teacher-forced reading of an autoregressive checkpoint on held-out task problems, for a model
still in training: greedy decoding scores 0 on long answers until nearly every character is
right, so this says where it stands before then. Per task: the loss per answer character (the
answer and its EOS), the share of characters whose most likely prediction is wrong, how many
answers have no wrong character, and the first wrong character of the first such answer in its
context. (On a task that accepts several answers, such as ``case``, a character of another
valid answer counts as wrong: the reading compares with the one reference answer.)

    python -m dllm_decode.tools.probe runs/ar-snap --tasks copy,chain,columns --n 8
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def probe_task(model, tok, task: str, n: int, seed: int = 0) -> Reading:
    """Teacher-forced reading of `model` on the first `n` held-out problems of `task`."""
    eos = tok.eos_token_id
    loss, chars, wrong, whole = 0.0, 0, 0, 0
    first = ""
    for p in get_task(task).problems("test", n, seed):
        prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(p.answer, add_special_tokens=False)["input_ids"] + [eos]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()   # (A, V): predicts answer
        target = ids[0, len(prompt):]
        miss = logits.argmax(-1) != target                                      # (A,)
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        chars += len(answer)
        wrong += int(miss.sum())
        whole += int(not miss.any())
        if not first and miss.any():
            i = int(miss.nonzero()[0, 0])
            shown = tok.decode(target[max(0, i - CONTEXT):i].tolist())
            expected, got = tok.decode([int(target[i])]), tok.decode([int(logits[i].argmax())])
            first = f"...{shown}[{expected}->{got}]"
    return Reading(task, n, loss / chars, wrong / chars, whole, first)


def table(readings: list[Reading]) -> str:
    lines = ["| task | problems | nats / char | chars wrong | answers with none wrong | first wrong (expected->predicted) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in readings:
        shown = r.first_wrong.replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| `{r.task}` | {r.n} | {r.nats_per_char:.3f} | {100 * r.wrong_share:.1f}% | "
                     f"{r.whole} / {r.n} | {f'`{shown}`' if shown else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dllm_decode.tools.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an autoregressive checkpoint folder (a training run's --snapshot)")
    ap.add_argument("--tasks", default="workload", help="task names, comma-separated, or a named mix")
    ap.add_argument("--n", type=int, default=8, help="held-out problems per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error(f"--n must be at least 1, got {a.n}")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        tasks = task_names(a.tasks)
        for t in tasks:
            get_task(t)
    except KeyError as e:
        ap.error(f"--tasks: {e.args[0]}")
    model, tok = load_ar(a.model)
    model.eval()
    print(table([probe_task(model, tok, t, a.n, a.seed) for t in tasks]))


if __name__ == "__main__":
    main()
