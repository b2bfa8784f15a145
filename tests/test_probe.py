"""tools.probe: the teacher-forced reading lines each answer character up with the logit that
predicts it (the shipped AR model copies without a wrong character and knows nothing of the
workload tasks); a diffusion checkpoint is read in its left-to-right decoding states, the same
numbers as one canvas per character built and read one at a time (for a block-causal model, one
that ends with the character's block); bad flags are one error line."""

from pathlib import Path

import pytest

from dllm_decode.measure.evaluate import load_ar
import torch
import torch.nn.functional as F

from dllm_decode.measure.tasks import get_task
from dllm_decode.models import load_model
from dllm_decode.tools.probe import main, probe_diffusion_task, probe_task, table

MODELS = Path(__file__).resolve().parents[1] / "models"
AR = MODELS / "ar-reference"


def test_a_learned_task_reads_clean_and_an_unlearned_one_does_not():
    model, tok = load_ar(str(AR))
    copy = probe_task(model, tok, "copy", 4)
    chain = probe_task(model, tok, "chain", 4)
    assert (copy.wrong_share, copy.whole, copy.first_wrong) == (0.0, 4, "") and copy.nats_per_char < 0.01
    assert chain.wrong_share > 0.5 and chain.whole == 0 and chain.nats_per_char > 2
    assert chain.first_wrong.endswith("]") and "->" in chain.first_wrong
    rows = table([copy, chain]).splitlines()
    assert len(rows) == 4 and rows[2].startswith("| `copy` | 4 | 0.000 | 0.0% | 4 / 4 |")


def _one_at_a_time(model, tok, task: str, canvas_end) -> tuple[float, int, int]:
    """Loss, misses and characters of the first 2 held-out problems of `task`, each answer
    character read from its own canvas: the prompt, the answer before it, and masks up to
    ``canvas_end(prompt_length, i, answer_length)``."""
    mask, eos = model.spec.mask_token_id, model.spec.eos_token_id
    loss, wrong, chars = 0.0, 0, 0
    for p in get_task(task).problems("test", 2, 0):
        prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(p.answer, add_special_tokens=False)["input_ids"] + [eos]
        P = len(prompt)
        for i, want in enumerate(answer):
            x = prompt + answer[:i] + [mask] * (canvas_end(P, i, len(answer)) - P - i)
            with torch.no_grad():
                row = model(torch.tensor([x]))[0, P + i].float()
            loss += F.cross_entropy(row[None], torch.tensor([want])).item()
            wrong += int(row.argmax()) != want
            chars += 1
    return loss, wrong, chars


@pytest.mark.parametrize("name", ["llada-reference", "dream-reference"])
def test_a_diffusion_reading_is_each_character_in_its_left_to_right_state(name):
    """One canvas per character, built and read one at a time: prompt, the answer so far, masks to
    the end of a gen-length canvas. The batched reading gives the same loss and misses, and the
    small models, which learned `copy` and not `chain`, read them as the AR model does."""
    model, tok = load_model(MODELS / name)
    gen = 96
    for task in ("copy", "chain"):
        loss, wrong, chars = _one_at_a_time(model, tok, task, lambda P, i, A: P + max(gen, A))
        got = probe_diffusion_task(model, tok, task, 2, gen_length=gen, rows=7)
        assert got.wrong_share == wrong / chars
        assert got.nats_per_char == pytest.approx(loss / chars, rel=1e-5)
    copy = probe_diffusion_task(model, tok, "copy", 2, gen_length=gen)
    chain = probe_diffusion_task(model, tok, "chain", 2, gen_length=gen)
    assert copy.whole == 2 and copy.wrong_share == 0.0
    assert chain.whole == 0 and chain.wrong_share > 0.3 and "->" in chain.first_wrong


def test_a_block_causal_reading_is_each_character_in_its_block_decode_state():
    """SDAR decodes block by block: a character's state is the prompt, the answer before it and
    masks to the end of its block (blocks counted from the first position, as SDAR's generate.py
    lays the canvas), with no position after that block. Built that way one character at a time,
    it gives the reading's loss and misses, though the reading's canvases run to gen-length."""
    model, tok = load_model(MODELS / "sdar-reference")
    size = model.spec.block_size
    for task in ("copy", "chain"):
        loss, wrong, chars = _one_at_a_time(model, tok, task, lambda P, i, A: (P + i) // size * size + size)
        got = probe_diffusion_task(model, tok, task, 2, gen_length=96, rows=5)
        assert got.wrong_share == wrong / chars
        assert got.nats_per_char == pytest.approx(loss / chars, rel=1e-5)
        assert (got.whole == 2) if task == "copy" else (got.whole == 0 and got.wrong_share > 0.3)


@pytest.mark.parametrize("argv, message", [(["--n", "0"], "--n must be at least 1"),
                                           (["--gen-length", "0"], "--gen-length must be at least 1"),
                                           (["--tasks", "copy,nope"], "unknown task 'nope'"),
                                           (["--device", "nope"], "--device 'nope': not a torch device")])
def test_bad_flags_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(AR), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_device_flag_reads_the_same(capsys):
    """``--device cpu`` names the default: the same table as without the flag."""
    main([str(AR), "--tasks", "copy", "--n", "2"])
    plain = capsys.readouterr().out
    main([str(AR), "--tasks", "copy", "--n", "2", "--device", "cpu"])
    assert capsys.readouterr().out == plain and "| `copy` | 2 |" in plain
