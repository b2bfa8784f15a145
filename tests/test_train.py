"""The training script: batches have LLaDA's SFT layout, the loss masks only the answer, runs
are reproducible from the seed, and every family writes a checkpoint its loader reads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllm_decode.tools.char_tokenizer import build_char_tokenizer
from dllm_decode.tools.train import Batcher, TrainConfig, diffusion_loss, main, stage_log, train

MODELS = Path(__file__).resolve().parents[1] / "models"


def _tiny(family, out, seed=0, steps=3):
    return TrainConfig(family=family, out=str(out), steps=steps, batch_size=4, d_model=16, n_layers=1,
                       n_heads=2, mlp_hidden=32, canvas=(80,), canvas_weights=(1.0,), warmup=1, seed=seed,
                       log_every=1)


def test_batch_layout_left_padded_prompt_then_answer_then_eos():
    tok = build_char_tokenizer()
    b = Batcher(_tiny("llada", "unused"), tok)
    ids, att, P = b.next(80)
    assert ids.shape == (4, P + 80) and att[:, P:].all()
    for row, m in zip(ids, att):
        first = int(m.long().argmax())
        assert not m[:first].any() and (row[:first] == tok.pad_token_id).all()
        text = tok.decode(row[first:].tolist(), skip_special_tokens=False)
        prompt, rest = text[:P - first], text[P - first:]
        assert prompt.endswith("\n") and "#### " in rest
        tail = row[P:].tolist()
        k = tail.index(tok.eos_token_id)
        assert all(t == tok.eos_token_id for t in tail[k:])   # EOS padding to the canvas end


def test_loss_only_sees_masked_answer_positions():
    """Changing the logits of prompt positions must not change the loss."""
    tok = build_char_tokenizer()
    ids, att, P = Batcher(_tiny("llada", "unused"), tok).next(80)
    base = torch.randn(ids.shape[0], ids.shape[1], len(tok))

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x, attention_mask=None):
            return self.logits

    l1 = diffusion_loss(Fixed(base), ids, att, P, tok.mask_token_id, tok.eos_token_id, 1e-3, torch.Generator().manual_seed(0))
    other = base.clone()
    other[:, :P] = torch.randn_like(other[:, :P]) * 10
    l2 = diffusion_loss(Fixed(other), ids, att, P, tok.mask_token_id, tok.eos_token_id, 1e-3, torch.Generator().manual_seed(0))
    assert torch.isfinite(l1) and l1 == l2
    other[:, P:] += 5 * torch.randn_like(other[:, P:])
    l3 = diffusion_loss(Fixed(other), ids, att, P, tok.mask_token_id, tok.eos_token_id, 1e-3, torch.Generator().manual_seed(0))
    assert l3 != l1


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = train(_tiny("llada", tmp_path / "a"), progress=False)
    b = train(_tiny("llada", tmp_path / "b"), progress=False)
    c = train(_tiny("llada", tmp_path / "c", seed=1), progress=False)
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "loss_log.jsonl").read_text().count("\n") == 3


def _log(d, name="loss_log.jsonl"):
    return [json.loads(line) for line in (Path(d) / name).read_text().splitlines()]


@pytest.mark.parametrize("name", ["llada-reference", "dream-reference", "ar-reference"])
def test_shipped_training_command_reproduces_its_first_steps(tmp_path, name):
    """The command that trained a shipped checkpoint (its first stage, when it was trained in
    stages), rerun for its first 26 steps, logs the shipped losses: the same data, masks,
    initialisation and schedule. (The rerun of the whole command, and its accuracy, are in the
    model card.)"""
    shipped = MODELS / name
    meta = first = json.loads((shipped / "training.json").read_text())
    while "init" in first:      # the first stage's command and log (train.py: _earlier_stages)
        first = first["init"]
    log = _log(shipped, "loss_log.jsonl" if first is meta else stage_log(1))
    cfg = dict(first["config"], out=str(tmp_path / name), stop_after=26)
    train(TrainConfig(**cfg), progress=False)
    ours = _log(tmp_path / name)
    assert [line["step"] for line in ours] == [0, 25]
    for mine, theirs in zip(ours, log):
        assert (mine["step"], mine["lr"]) == (theirs["step"], theirs["lr"])
        # another CPU may round differently; other data or masks would miss by far more
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-3), (name, mine, theirs)


def test_check_flag_compares_loss_logs(tmp_path, capsys):
    flags = ["--family", "llada", "--steps", "3", "--batch-size", "4", "--d-model", "16", "--n-layers", "1",
             "--n-heads", "2", "--mlp-hidden", "32", "--canvas", "80", "--warmup", "1", "--no-progress"]
    main(flags + ["--out", str(tmp_path / "a")])
    main(flags + ["--out", str(tmp_path / "b"), "--stop-after", "1", "--check", str(tmp_path / "a")])
    assert "matches" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="differs"):
        main(flags + ["--out", str(tmp_path / "c"), "--seed", "1", "--check", str(tmp_path / "a")])


def test_init_starts_from_the_checkpoint_and_keeps_its_record(tmp_path):
    """A second stage begins at the first stage's weights (not a fresh initialisation), and its
    training.json keeps the first stage's config and loss log."""
    a = train(_tiny("llada", tmp_path / "a"), progress=False)
    b = train(TrainConfig(**{**_tiny("llada", tmp_path / "b", seed=1, steps=0).__dict__, "init": str(a)}),
              progress=False)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fresh = load_file(str(train(_tiny("llada", tmp_path / "c", steps=0), progress=False) / "model.safetensors"))
    assert any(not torch.equal(wa[k], fresh[k]) for k in wa)     # three steps moved the weights
    record = json.loads((b / "training.json").read_text())["init"]
    assert record["config"] == json.loads((a / "training.json").read_text())["config"]
    assert _log(b, stage_log(1)) == _log(a) and len(_log(a)) == 3
    # a third stage carries both earlier logs
    c = train(TrainConfig(**{**_tiny("llada", tmp_path / "c3", seed=2, steps=1).__dict__, "init": str(b)}),
              progress=False)
    assert _log(c, stage_log(1)) == _log(a) and _log(c, stage_log(2)) == _log(b)
    assert json.loads((c / "training.json").read_text())["init"]["init"]["config"]["seed"] == 0


def test_init_refuses_another_family_or_size(tmp_path):
    a = train(_tiny("llada", tmp_path / "a", steps=1), progress=False)
    with pytest.raises(ValueError, match="family 'llada'.*'dream'"):
        train(TrainConfig(**{**_tiny("dream", tmp_path / "b").__dict__, "init": str(a)}), progress=False)
    with pytest.raises(ValueError, match="d_model 16.*32"):
        train(TrainConfig(**{**_tiny("llada", tmp_path / "c").__dict__, "d_model": 32, "init": str(a)}),
              progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()   # refused before writing


def test_check_compares_a_first_stage_rerun_with_the_first_stage_log(tmp_path, capsys):
    flags = ["--family", "llada", "--steps", "3", "--batch-size", "4", "--d-model", "16", "--n-layers", "1",
             "--n-heads", "2", "--mlp-hidden", "32", "--canvas", "80", "--warmup", "1", "--no-progress"]
    main(flags + ["--out", str(tmp_path / "s1")])
    main(flags + ["--out", str(tmp_path / "s2"), "--init", str(tmp_path / "s1"), "--seed", "1", "--lr", "1e-3"])
    main(flags + ["--out", str(tmp_path / "r1"), "--stop-after", "2", "--check", str(tmp_path / "s2")])
    assert "matches" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"loss_log\.stage1\.jsonl"):   # another seed misses stage 1's log
        main(flags + ["--out", str(tmp_path / "r2"), "--seed", "2", "--check", str(tmp_path / "s2")])
    main(flags + ["--out", str(tmp_path / "r3"), "--init", str(tmp_path / "s1"), "--seed", "1", "--lr", "1e-3",
                  "--stop-after", "1", "--check", str(tmp_path / "s2")])
    assert "matches" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no stage"):       # two stages cannot match a one-stage run
        main(flags + ["--out", str(tmp_path / "r4"), "--init", str(tmp_path / "s1"), "--check", str(tmp_path / "s1")])


def test_each_family_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from dllm_decode.models import load_model

    for family in ("llada", "dream"):
        out = train(_tiny(family, tmp_path / family, steps=1), progress=False)
        model, tok = load_model(out)
        assert model.spec.family == family and tok.mask_token_id == model.spec.mask_token_id
        assert model.spec.shift_logits == (family == "dream")
    out = train(_tiny("ar", tmp_path / "ar", steps=1), progress=False)
    ar = AutoModelForCausalLM.from_pretrained(str(out))
    assert ar.config.model_type == "llama" and ar.config.vocab_size == len(build_char_tokenizer())


def test_block_rows_mask_like_semi_autoregressive_decoding():
    """mix (0, 1, 0): each row reveals a block-aligned prefix, partly masks one block and masks
    everything after it; the prompt never."""
    from dllm_decode.tools.train import mask_canvas

    P, G = 7, 64
    ids = torch.full((32, P + G), 9)
    masked, weight = mask_canvas(ids, P, eos_id=2, eps=1e-3, gen=torch.Generator().manual_seed(0), mix=(0, 1, 0))
    assert not masked[:, :P].any()
    for row, w in zip(masked[:, P:], weight):
        cols = row.nonzero().flatten().tolist()
        assert cols, "a block row always masks the suffix after its block"
        first = cols[0]
        start = first - first % 8
        assert not row[:start].any()
        assert row[start + 32:].all() or row[start + 8:].all()
        assert torch.isclose(w, torch.tensor(G / len(cols), dtype=w.dtype))


def test_full_rows_mask_the_whole_answer_and_keep_the_other_draws():
    """full=1: every row masks all of its answer and part of its EOS padding (the state the
    first answer commit of low-confidence decoding sees); full=0 draws exactly as before."""
    from dllm_decode.tools.train import mask_canvas

    P, G, eos = 5, 48, 2
    ids = torch.full((64, P + G), 9)
    ids[:, P + 20:] = eos                       # a 20-token answer, then EOS padding
    masked, weight = mask_canvas(ids, P, eos_id=eos, eps=1e-3, gen=torch.Generator().manual_seed(0),
                                 mix=(1, 0, 0), full=1.0)
    assert not masked[:, :P].any() and masked[:, P:P + 20].all()
    pad = masked[:, P + 20:].float().mean(1)
    assert 0 < pad.mean() < 1 and pad.std() > 0     # the padding share varies by row
    assert torch.allclose(weight, G / masked.sum(1).float())

    def draw(full):
        return mask_canvas(ids, P, eos, 1e-3, torch.Generator().manual_seed(3), (0.6, 0.2, 0.2), full)
    a, b = draw(0.0), draw(1e-9)    # a share too small to pick any row changes nothing drawn before it
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
