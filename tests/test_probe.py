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
    assert len(rows) == 4 and rows[2].startswith("| `copy` | 4 | 0.000 | 0.0% |  | 4 / 4 |")


def test_the_wrong_characters_after_an_equals_sign_are_the_results_share():
    """A wrong character after an `=` on its line (a worked step's result) counts in the results'
    share of the wrong ones; one before the `=`, or on a line without one, does not."""
    from dllm_decode.tools.char_tokenizer import build_char_tokenizer
    from dllm_decode.tools.probe import encoded_problems, read_answers

    tok = build_char_tokenizer()
    V = len(tok)
    prompt, answer = next(encoded_problems(tok, "chain", 1, 0, tok.eos_token_id))
    text = tok.decode(answer[:-1])                   # 'from 068\nA*04: 068*04=272\n...'
    step = text.index("\n") + 1                      # a step line's first character
    result = text.index("=", step) + 1               # its result's first digit
    wrong = {0, step, result, result + 1}

    def answer_logits(prompt, ans, at):              # right everywhere but at `wrong`
        return torch.stack([F.one_hot(torch.tensor((ans[i] + (i in wrong)) % V), V).float() for i in at])

    r = read_answers(tok, "chain", 1, 0, tok.eos_token_id, answer_logits)
    assert r.wrong_share == 4 / len(answer) and r.whole == 0 and r.in_results == 0.5
    assert "| 50% |" in table([r])


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
    it gives the reading's loss and misses (the reading's canvases end with the block of their
    chunk's last character: in chunks of 5, most of them well before gen-length)."""
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


def _stop_probs(logits_at, tok, eos, task: str, n: int):
    """Per problem: P(stop token) at each line start of the answer, the final one last, every
    position read from its own single-row forward (``logits_at(prompt, answer_so_far)``)."""
    out = []
    for p in get_task(task).problems("test", n, 0):
        prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(p.answer, add_special_tokens=False)["input_ids"]
        text = tok.decode(answer)
        starts = [0] + [i + 1 for i, c in enumerate(text[:-1]) if c == "\n"]   # a character tokenizer
        assert text[starts[-1]:].startswith("####")
        stop = answer[starts[-1]]
        with torch.no_grad():
            out.append([float(logits_at(prompt, answer[:i]).float().softmax(-1)[stop]) for i in starts])
    return out


def test_the_stop_reading_is_the_final_line_start_against_the_line_starts_before():
    """``--stop`` reads P(``#``) where the final line starts and its highest value at the line
    starts before (all, or the last K): the same numbers as one prefix forward per line start."""
    from dllm_decode.tools.probe import ar_logits, read_stops

    model, tok = load_ar(str(AR))
    want = _stop_probs(lambda prompt, ans: model(input_ids=torch.tensor([prompt + ans])).logits[0, -1],
                       tok, tok.eos_token_id, "chain", 4)
    for lines in (None, 0, 1, 3):
        got = read_stops(tok, "chain", 4, 0, tok.eos_token_id, ar_logits(model), lines)
        assert got.at_stop == pytest.approx(sum(p[-1] for p in want) / 4, rel=1e-4)
        if lines == 0:
            assert got.earlier is None
            continue
        window = [p[:-1] if lines is None else p[max(0, len(p) - 1 - lines):-1] for p in want]
        assert got.earlier == pytest.approx(sum(max(w) for w in window) / 4, rel=1e-4)
    assert 0 <= got.top_at_stop <= 4 and got.lines == 3


@pytest.mark.parametrize("name", ["llada-reference", "dream-reference"])
def test_a_diffusion_stop_reading_is_the_left_to_right_state_at_the_stop(name):
    """For a diffusion checkpoint each line start is read with the answer before it revealed and
    masks to the end of a gen-length canvas, as the per-character reading does."""
    from dllm_decode.tools.probe import diffusion_logits, read_stops

    model, tok = load_model(MODELS / name)
    mask, eos, gen = model.spec.mask_token_id, model.spec.eos_token_id, 160   # chain answers: at most 154 with EOS

    def one(prompt, ans):
        x = prompt + ans + [mask] * (gen - len(ans))
        return model(torch.tensor([x]))[0, len(prompt) + len(ans)]

    want = _stop_probs(one, tok, eos, "chain", 3)
    got = read_stops(tok, "chain", 3, 0, eos, diffusion_logits(model, gen, rows=2))
    assert got.at_stop == pytest.approx(sum(p[-1] for p in want) / 3, rel=1e-4)
    assert got.earlier == pytest.approx(sum(max(p[:-1]) for p in want) / 3, rel=1e-4)


def test_the_stop_flag_prints_the_stop_table(capsys):
    main([str(AR), "--tasks", "copy,chain", "--n", "2", "--stop", "--stop-lines", "2"])
    rows = capsys.readouterr().out.splitlines()
    assert "highest P(stop) at the 2 line starts before" in rows[0] and len(rows) == 4
    assert rows[2].startswith("| `copy` | 2 | 1.000 | 2 / 2 |") and rows[3].startswith("| `chain` | 2 |")
    main([str(AR), "--tasks", "copy", "--n", "2", "--stop", "--stop-lines", "0"])
    assert capsys.readouterr().out.splitlines()[2].endswith("| 2 / 2 |  |")      # no line start read before


@pytest.mark.parametrize("argv", [["--stop-lines", "2"], ["--stop", "--stop-lines", "-1"]])
def test_a_stop_window_needs_the_stop_flag_and_a_count(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(AR), *argv])
    assert e.value.code == 2 and "--stop-lines must be at least 0, with --stop" in capsys.readouterr().err


def test_the_first_k_characters_are_the_full_readings_first_k(capsys):
    """``--first K`` reads each answer's first K characters only: the same misses there as a
    prefix forward per problem, and the whole reading once K covers every answer."""
    from dllm_decode.tools.probe import ar_logits, read_answers

    model, tok = load_ar(str(AR))
    eos, k = tok.eos_token_id, 6
    wrong, whole = 0, 0
    for p in get_task("chain").problems("test", 3, 0):
        prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(p.answer, add_special_tokens=False)["input_ids"] + [eos]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        miss = (logits.argmax(-1) != torch.tensor(answer))[:k]
        wrong, whole = wrong + int(miss.sum()), whole + int(not miss.any())
    got = read_answers(tok, "chain", 3, 0, eos, ar_logits(model), head=k)
    assert (got.wrong_share, got.whole) == (wrong / (3 * k), whole)
    assert read_answers(tok, "chain", 3, 0, eos, ar_logits(model), head=10_000) == probe_task(model, tok, "chain", 3)
    with pytest.raises(SystemExit):
        main([str(AR), "--first", "0"])
    assert "--first must be at least 1, without --stop" in capsys.readouterr().err
