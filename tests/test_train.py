"""The training script: batches have LLaDA's SFT layout, the loss masks only the answer, runs
are reproducible from the seed, and every family writes a checkpoint its loader reads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllm_decode.measure.tasks import get_task
from dllm_decode.tools.char_tokenizer import build_char_tokenizer
from dllm_decode.tools.train import Batcher, TrainConfig, diffusion_loss, main, stage_log, train

MODELS = Path(__file__).resolve().parents[1] / "models"


def _tiny(family, out, seed=0, steps=3, **kw):
    return TrainConfig(family=family, out=str(out), steps=steps, batch_size=4, d_model=16, n_layers=1,
                       n_heads=2, mlp_hidden=32, canvas=(80,), canvas_weights=(1.0,), warmup=1, seed=seed,
                       log_every=1, **kw)


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


def _first_stage(name: str) -> tuple[dict, dict]:
    """(first stage's training.json, the checkpoint's own) of shipped checkpoint `name`: the
    first stage's command and log are what a rerun checks (train.py: _earlier_stages)."""
    from dllm_decode.tools.model_card import training_stages

    meta = json.loads((MODELS / name / "training.json").read_text())
    return training_stages(meta, name)[0][1], meta


def _assert_same_losses(ours: list[dict], log: list[dict], label: str) -> None:
    """A rerun's loss log against the shipped one: same steps and learning rates, losses within
    1e-3 (another CPU or a GPU may round differently; other data or masks would miss by far more)."""
    for mine, theirs in zip(ours, log):
        assert (mine["step"], mine["lr"]) == (theirs["step"], theirs["lr"])
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-3), (label, mine, theirs)


@pytest.mark.parametrize("name", ["llada-reference", "dream-reference", "ar-reference"])
def test_shipped_training_command_reproduces_its_first_steps(tmp_path, name):
    """The command that trained a shipped checkpoint (its first stage, when it was trained in
    stages), rerun for its first 26 steps, logs the shipped losses: the same data, masks,
    initialisation and schedule. (The rerun of the whole command, and its accuracy, are in the
    model card.)"""
    shipped = MODELS / name
    first, meta = _first_stage(name)
    log = _log(shipped, "loss_log.jsonl" if first is meta else stage_log(1))
    cfg = dict(first["config"], out=str(tmp_path / name), stop_after=26)
    train(TrainConfig(**cfg), progress=False)
    ours = _log(tmp_path / name)
    assert [line["step"] for line in ours] == [0, 25]
    _assert_same_losses(ours, log, name)


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

    for family in ("llada", "dream", "sdar", "fast_dllm_v2"):
        out = train(_tiny(family, tmp_path / family, steps=1), progress=False)
        model, tok = load_model(out)
        assert model.spec.family == family and tok.mask_token_id == model.spec.mask_token_id
        assert model.spec.shift_logits == (family in ("dream", "fast_dllm_v2"))
        assert model.spec.block_size == (4 if family in ("sdar", "fast_dllm_v2") else None)
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


def test_end_rows_put_the_block_at_the_answers_end_and_keep_the_other_draws():
    """end=1: every row reveals its answer up to a block start 0 to 40 positions before the
    answer's end, masks that position, part of the next 31 and everything after; end=0 draws
    exactly as before, and a row's place and weight follow its own answer length."""
    from dllm_decode.tools.train import mask_canvas

    P, G, eos = 5, 160, 2
    ids = torch.full((200, P + G), 9)
    length = torch.randint(1, 120, (200,), generator=torch.Generator().manual_seed(1))
    for r, n in enumerate(length.tolist()):
        ids[r, P + n:] = eos                     # an answer of n tokens, then EOS padding
    masked, weight = mask_canvas(ids, P, eos_id=eos, eps=1e-3, gen=torch.Generator().manual_seed(0),
                                 mix=(0.6, 0.2, 0.2), full=0.5, end=1.0)
    assert not masked[:, :P].any()
    starts = []
    for row, n, w in zip(masked[:, P:], length.tolist(), weight):
        s = int(row.long().argmax())             # the first masked position: the block's start
        starts.append(n - s)
        assert max(0, n - 40) <= s <= n
        assert row[s + 32:].all() and not row[:s].any()
        assert torch.isclose(w, torch.tensor(G / int(row.sum()), dtype=w.dtype))
    assert len(set(starts)) > 30                 # the place before the end varies by row
    in_block = masked[:, P:].float()
    assert 0 < in_block.mean() < 1

    def draw(end):
        return mask_canvas(ids, P, eos, 1e-3, torch.Generator().manual_seed(3), (0.6, 0.2, 0.2), 0.2, end)
    a, b = draw(0.0), draw(1e-9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_frontier_rows_reveal_a_prefix_and_mask_the_rest_and_keep_the_other_draws():
    """frontier=1: every row reveals its answer before a frontier 0 to the answer's length and masks
    everything from it on, EOS padding included, weighted G / #masked; the frontier takes every
    place, not only block boundaries; frontier=0 draws exactly as before."""
    from dllm_decode.tools.train import mask_canvas

    P, G, eos = 5, 160, 2
    ids = torch.full((400, P + G), 9)
    length = torch.randint(1, 120, (400,), generator=torch.Generator().manual_seed(1))
    for r, n in enumerate(length.tolist()):
        ids[r, P + n:] = eos
    masked, weight = mask_canvas(ids, P, eos_id=eos, eps=1e-3, gen=torch.Generator().manual_seed(0),
                                 mix=(0.2, 0.6, 0.2), full=0.2, end=0.2, frontier=1.0)
    assert not masked[:, :P].any()
    fronts = set()
    for row, n, w in zip(masked[:, P:], length.tolist(), weight):
        f = int(row.long().argmax())             # the first masked position
        assert 0 <= f <= n and row[f:].all() and not row[:f].any()
        assert torch.isclose(w, torch.tensor(G / (G - f), dtype=w.dtype))
        fronts.add(f)
    assert {f % 8 for f in fronts} == set(range(8)) and 0 in fronts

    def draw(frontier):
        return mask_canvas(ids, P, eos, 1e-3, torch.Generator().manual_seed(3), (0.6, 0.2, 0.2), 0.2, 0.2,
                           frontier)
    a, b = draw(0.0), draw(1e-9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = draw(0.5)                                # about half the rows change, the others keep their draw
    changed = (a[0] != c[0]).any(1).float().mean()
    assert 0.3 < changed < 0.7


@pytest.mark.parametrize("change, message", [
    *[c for key, flag in (("end_rows", "--end-rows"), ("frontier_rows", "--frontier-rows")) for c in (
        ({key: 1.5}, f"{flag} 1.5"),
        ({key: -0.1}, f"{flag} -0.1"),
        ({"family": "ar", key: 0.2}, "family 'ar' has no such rows"))],
])
def test_bad_row_shares_fail_before_training(tmp_path, change, message):
    from dataclasses import asdict

    cfg = {**asdict(_tiny("dream", tmp_path / "x")), **change}
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**cfg), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key, share, flag, sentence", [
    ("end_rows", 0.2, "--end-rows 0.2", "0.20 of the rows instead place a semi-autoregressive block"),
    ("frontier_rows", 0.5, "--frontier-rows 0.5", "0.50 of the rows instead reveal the answer up to a frontier"),
])
def test_row_shares_are_in_the_reproduction_flags_and_the_card(key, share, flag, sentence):
    from dataclasses import asdict

    from dllm_decode.tools.model_card import full_mask_sentence, train_flags

    cfg = asdict(TrainConfig(family="dream", **{key: share}))
    assert flag in train_flags(cfg)
    assert sentence in full_mask_sentence(cfg)
    assert flag.split()[0] not in train_flags(asdict(TrainConfig(family="dream")))
    assert full_mask_sentence(asdict(TrainConfig(family="dream"))) == ""


def _weights(d):
    return load_file(str(Path(d) / "model.safetensors"))


def _load_state(out):
    """The state dict of a diffusion model folder, as its loader builds it (the names it trains under)."""
    from dllm_decode.models import load_model
    return load_model(out)[0].state_dict()


def _same_log(a, b):
    """Loss logs equal but for the wall-clock seconds."""
    strip = [{k: v for k, v in x.items() if k != "seconds"} for x in _log(a)]
    return strip == [{k: v for k, v in x.items() if k != "seconds"} for x in _log(b)]


@pytest.mark.parametrize("family", ["llada", "ar", "sdar", "fast_dllm_v2"])
def test_resumed_run_reaches_the_uninterrupted_weights_bit_for_bit(tmp_path, family):
    """Stopped by --stop-after and resumed, or resumed from a periodic checkpoint, a run ends at
    exactly the weights and loss log of the same run left alone."""
    from dllm_decode.tools.train import resume

    cfg = {**_tiny(family, tmp_path / "whole", steps=7).__dict__, "checkpoint_every": 2}
    whole = train(TrainConfig(**cfg), progress=False)
    assert torch.load(whole / "checkpoint.pt", weights_only=True)["progress"]["step"] == 6   # the last periodic one
    stopped = train(TrainConfig(**{**cfg, "out": str(tmp_path / "stopped"), "stop_after": 3}), progress=False)
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["progress"]["step"] == 3
    assert any(not torch.equal(v, _weights(whole)[k]) for k, v in _weights(stopped).items())
    resume(stopped, progress=False)
    shutil.copytree(whole, tmp_path / "again")      # resume the whole run from its step-6 checkpoint
    (tmp_path / "again" / "model.safetensors").unlink()
    resume(tmp_path / "again", progress=False)
    for other in (stopped, tmp_path / "again"):
        ours = _weights(other)
        assert all(torch.equal(v, ours[k]) for k, v in _weights(whole).items())
        assert _same_log(whole, other) and len(_log(other)) == 7


def test_resume_in_stages_and_a_different_seed_differs(tmp_path):
    """Two interruptions in a row still land on the same weights; the check can fail: the same
    resume path with another seed does not."""
    from dllm_decode.tools.train import resume

    cfg = _tiny("llada", tmp_path / "whole", steps=5).__dict__
    whole = _weights(train(TrainConfig(**cfg), progress=False))
    run = train(TrainConfig(**{**cfg, "out": str(tmp_path / "r"), "stop_after": 1}), progress=False)
    resume(run, stop_after=3, progress=False)
    with pytest.raises(ValueError, match="already at step 3"):
        resume(run, stop_after=2, progress=False)
    resume(run, progress=False)
    assert all(torch.equal(v, _weights(run)[k]) for k, v in whole.items())
    other = train(TrainConfig(**{**cfg, "out": str(tmp_path / "o"), "seed": 1, "stop_after": 2}), progress=False)
    resume(other, progress=False)
    assert any(not torch.equal(v, _weights(other)[k]) for k, v in whole.items())


def test_resume_without_a_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(SystemExit, match=f"train: --resume {tmp_path}: no checkpoint.pt"):
        main(["--resume", str(tmp_path), "--no-progress"])


def test_a_refused_configuration_is_one_line_and_writes_nothing(tmp_path):
    """The command line turns a configuration check's refusal into one error line (not a
    traceback) before any folder is made."""
    with pytest.raises(SystemExit, match="train: --end-rows .* family 'ar' has no such rows"):
        main(["--family", "ar", "--out", str(tmp_path / "r"), "--end-rows", "0.5", "--steps", "2", "--no-progress"])
    assert not (tmp_path / "r").exists()


def test_workload_batches_hold_one_task_and_fill_the_token_budget():
    """--batch-by-task: every row of a batch is one task; --batch-tokens sizes the batch from the
    task's longest prompt and canvas; the canvas is one the task's longest answer fits."""
    tok = build_char_tokenizer()
    cfg = TrainConfig(family="llada", out="unused", tasks=("echo", "series"), batch_by_task=True,
                      batch_tokens=4096, canvas=(256, 1024), canvas_weights=(1.0, 1.0))
    b, rng = Batcher(cfg, tok), __import__("random").Random(0)
    seen = set()
    for _ in range(12):
        ids, att, P = b.task_batch(rng)
        text = tok.decode(ids[0, :P].tolist(), skip_special_tokens=True)
        task, prefix = ("echo", "echo: ") if text.startswith("echo") else ("series", "from ")
        seen.add((task, ids.shape[1] - P))
        assert all(tok.decode(r[:P].tolist(), skip_special_tokens=True).startswith(prefix) for r in ids)
        width = get_task(task).max_prompt_tokens + ids.shape[1] - P
        assert ids.shape[0] == 4096 // width
    assert {g for t, g in seen if t == "series"} == {1024}          # 900-token answers: only 1024 fits
    assert {g for t, g in seen if t == "echo"} == {256, 1024}
    with pytest.raises(ValueError, match="--canvas 256 is too short for task 'series'"):
        Batcher(TrainConfig(**{**cfg.__dict__, "canvas": (256,), "canvas_weights": (1.0,)}), tok)


def test_task_groups_mix_their_tasks_and_never_another_group():
    """--task-groups: a batch draws one group, mixes its tasks row by row and is sized by the
    group's longest task; a group of one task is a one-task batch; bad groups are refused."""
    tok = build_char_tokenizer()
    cfg = TrainConfig(family="ar", out="unused", tasks=("copy", "chain", "series"), batch_by_task=True,
                      batch_tokens=8192, task_groups=(0, 0, 1))
    b, rng = Batcher(cfg, tok), __import__("random").Random(0)
    kinds = []
    for _ in range(16):
        ids, att, P = b.task_batch(rng)
        rows = [tok.decode(r[:P].tolist(), skip_special_tokens=True) for r in ids]
        names = {"series" if "until over" in r else "copy" if r.startswith("copy: ") else "chain" for r in rows}
        kinds.append(names)
        assert names <= {"copy", "chain"} or names == {"series"}
        group = ("series",) if names == {"series"} else ("copy", "chain")
        width = max(get_task(t).max_prompt_tokens for t in group) + max(get_task(t).max_answer_tokens
                                                                         for t in group) + 1
        assert ids.shape[0] == 8192 // width
    assert {"copy", "chain"} in kinds and {"series"} in kinds
    with pytest.raises(ValueError, match="task_groups has 2 entries for 3 tasks"):
        Batcher(TrainConfig(**{**cfg.__dict__, "task_groups": (0, 1)}), tok)
    with pytest.raises(ValueError, match="needs --batch-by-task"):
        Batcher(TrainConfig(**{**cfg.__dict__, "batch_by_task": False}), tok)


def test_bf16_autocast_trains_deterministically_and_differs_from_float32(tmp_path):
    cfg = {**_tiny("ar", tmp_path / "a").__dict__, "tasks": ("echo", "chain"), "batch_by_task": True,
           "max_length": 2048}
    a = _weights(train(TrainConfig(**{**cfg, "autocast": "bf16"}), progress=False))
    b = _weights(train(TrainConfig(**{**cfg, "autocast": "bf16", "out": str(tmp_path / "b")}), progress=False))
    c = _weights(train(TrainConfig(**{**cfg, "out": str(tmp_path / "c")}), progress=False))
    assert all(v.dtype == torch.float32 for v in a.values())         # master weights stay float32
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert any(not torch.equal(v, c[k]) for k, v in a.items())


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_init_from_an_ar_checkpoint_carries_its_weights(tmp_path, family):
    """A diffusion model started from an AR checkpoint holds every AR tensor (under its own
    names; Dream's q/k/v biases at zero) and, on one token, where attention cannot see further,
    gives the AR model's logits (Dream's shifted logit at the first position is its own)."""
    from transformers import LlamaForCausalLM

    from dllm_decode.models import load_model
    from dllm_decode.tools.adapt import _rename

    ar = train(_tiny("ar", tmp_path / "ar", steps=2), progress=False)
    cfg = {**_tiny(family, tmp_path / family, steps=0).__dict__, "init": str(ar)}
    if family == "dream":
        with pytest.raises(ValueError, match="--n-kv-heads 2"):      # Dream's default is n_heads // 2
            train(TrainConfig(**cfg), progress=False)
        cfg["n_kv_heads"] = 2
    out = train(TrainConfig(**cfg), progress=False)
    arw, ours = _weights(ar), _weights(out)
    assert all(torch.equal(v, ours[_rename(k, family)]) for k, v in arw.items())
    assert all(not v.any() for k, v in ours.items() if k.endswith("_proj.bias"))
    model, _ = load_model(out)
    ar_model = LlamaForCausalLM.from_pretrained(str(ar)).eval()
    x = torch.tensor([[7], [30]])
    with torch.no_grad():
        want = ar_model(input_ids=x).logits
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert json.loads((out / "training.json").read_text())["init"]["config"]["family"] == "ar"


def test_model_card_flags_rebuild_a_workload_config():
    """The command a model card prints for a run with the new options parses back to the run's
    configuration (switches named bare, canvas odds kept; checkpoint cadence left out)."""
    from dataclasses import asdict

    from dllm_decode.measure.tasks import WORKLOAD_MIX
    from dllm_decode.tools.model_card import train_flags
    from dllm_decode.tools.train import _config, _parser

    cfg = TrainConfig(family="dream", out="x", tasks=WORKLOAD_MIX, batch_by_task=True, batch_tokens=4096,
                      autocast="bf16", max_length=2048, n_kv_heads=6, canvas=(256, 1024),
                      canvas_weights=(1.0, 3.0), lr=1e-3, steps=100, loss_weight="cart", cart_p=0.25, compile=True)
    flags = train_flags(asdict(cfg)).split()
    again = _config(_parser().parse_args(["--family", "dream", "--out", "x"] + flags))
    assert asdict(again) == asdict(cfg)
    assert "--checkpoint-minutes" not in train_flags(asdict(TrainConfig(checkpoint_minutes=10)))


def test_model_card_flags_name_a_device_but_its_cpu_check_does_not():
    """A run trained on a GPU prints `--device cuda` in its training command (the command must
    rebuild its config), and the card's CPU check of its first steps leaves the device out."""
    from dataclasses import asdict

    from dllm_decode.tools.model_card import train_flags
    from dllm_decode.tools.train import _config, _parser

    cfg = TrainConfig(family="ar", out="x", device="cuda", steps=10)
    flags = train_flags(asdict(cfg))
    assert asdict(_config(_parser().parse_args(["--family", "ar", "--out", "x"] + flags.split()))) == asdict(cfg)
    assert "--device" not in train_flags(asdict(cfg), device=False)
    assert "--device" not in train_flags(asdict(TrainConfig(steps=10)))


WORKLOAD_MODELS = ("ar-workload", "dream-workload", "fast-dllm-v2-workload")


def test_workload_models_share_their_first_stage():
    """The Dream and Fast-dLLM v2 workload models were adapted from the shipped AR workload model:
    their first stage is its command and its loss log, so one rerun of it checks all three."""
    ar, _ = _first_stage("ar-workload")
    ar_log = (MODELS / "ar-workload" / "loss_log.jsonl").read_text()
    for name in WORKLOAD_MODELS[1:]:
        first, meta = _first_stage(name)
        assert {**first["config"], "out": None} == {**ar["config"], "out": None}, name
        assert (MODELS / name / stage_log(1)).read_text() == ar_log, name
        assert meta["config"]["family"] == name.removesuffix("-workload").replace("-", "_")


@pytest.mark.slow
def test_gpu_trained_workload_command_reproduces_its_first_steps_on_cpu(tmp_path):
    """The AR workload model was trained on a GPU (bfloat16 autocast). Its command rerun on this
    CPU for its first 11 steps (about ten minutes: 65,536-token batches) logs the shipped losses
    at steps 0 and 10 within the rounding `--check` allows between machines: the same data,
    initialisation and schedule on other kernels."""
    first, _ = _first_stage("ar-workload")
    log = _log(MODELS / "ar-workload")
    cfg = dict(first["config"], out=str(tmp_path / "ar"), device="cpu", threads=2, stop_after=11)
    train(TrainConfig(**cfg), progress=False)
    ours = _log(tmp_path / "ar")
    assert [line["step"] for line in ours] == [0, 10]
    _assert_same_losses(ours, log, "ar-workload")


@pytest.mark.slow
def test_cpu_trained_workload_stage_reproduces_its_first_steps(tmp_path):
    """fast-dllm-v2-workload's own stage was trained on two CPU threads from the shipped AR workload
    model. Its command rerun for its first 26 steps (one to three minutes) logs the shipped losses
    at steps 0 and 25, as its model card's check command does."""
    from dllm_decode.tools.train import check_log

    name = "fast-dllm-v2-workload"
    meta = json.loads((MODELS / name / "training.json").read_text())
    assert meta["config"]["init"] == "models/ar-workload" and meta["config"]["device"] == "cpu"
    # without the run's readings, as the card's command (they draw no random numbers, and take minutes)
    cfg = dict(meta["config"], out=str(tmp_path / "stage"), init=str(MODELS / "ar-workload"), stop_after=26,
               probe_every=0)
    train(TrainConfig(**cfg), progress=False)
    ours = _log(tmp_path / "stage")
    assert [line["step"] for line in ours] == [0, 25]
    _assert_same_losses(ours, _log(MODELS / name), name)
    assert check_log(tmp_path / "stage", MODELS / name) == (2, None)


def test_sigterm_writes_a_checkpoint_that_resumes_to_the_same_weights(tmp_path):
    """A run killed with SIGTERM (what `kill PID` sends) checkpoints the step it was at and
    exits; resumed, it reaches the weights of a run never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    from dllm_decode.tools.train import resume

    flags = ["--family", "llada", "--steps", "5000", "--batch-size", "4", "--d-model", "16", "--n-layers", "1",
             "--n-heads", "2", "--mlp-hidden", "32", "--canvas", "80", "--warmup", "1", "--log-every", "1",
             "--no-progress"]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dllm_decode.tools.train", *flags, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run / "loss_log.jsonl"
    deadline = time.monotonic() + 120
    while (not log.exists() or log.read_text().count("\n") < 3) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    # not 0: a script's `train ... && next` must not go on; stderr says how to continue
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert f"--resume {run}" in proc.stderr.read().decode()
    step = torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["step"]
    assert 3 <= step < 5000 and not (run / "model.safetensors").exists()
    resume(run, stop_after=step + 2, progress=False)
    main(flags + ["--out", str(tmp_path / "whole"), "--stop-after", str(step + 2)])
    ours, whole = _weights(run), _weights(tmp_path / "whole")
    assert all(torch.equal(v, ours[k]) for k, v in whole.items())
    assert _same_log(run, tmp_path / "whole")


def test_a_signal_during_the_final_save_waits_for_the_whole_model_folder(tmp_path, monkeypatch):
    """SIGINT arriving while the finished run writes its weights (a deadline landing on the last
    step) neither interrupts the save nor leaves the weights without their training.json."""
    import os
    import signal

    import dllm_decode.tools.train as train_mod

    real = train_mod._write_model

    def write_and_be_interrupted(model, out, *args):
        os.kill(os.getpid(), signal.SIGINT)     # delivered now, between the weights and the record
        real(model, out, *args)

    monkeypatch.setattr(train_mod, "_write_model", write_and_be_interrupted)
    try:
        out = train(_tiny("ar", tmp_path / "run", steps=2), progress=False)
    except KeyboardInterrupt:       # caught here, or pytest would take it for the user's and stop
        pytest.fail("the signal interrupted the final save")
    assert json.loads((out / "training.json").read_text())["config"]["steps"] == 2
    assert (out / "model.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads a GPU run's checkpoint on a machine without one")
def test_a_gpu_runs_checkpoint_snapshots_on_a_machine_without_a_gpu(tmp_path):
    """A checkpoint whose run trained with --device cuda becomes a model folder here too (the
    weights are copied on the CPU); its record keeps the device the run trained on."""
    run = tmp_path / "run"
    train(TrainConfig(**{**_tiny("llada", run).__dict__, "steps": 4, "checkpoint_every": 2, "stop_after": 2}),
          progress=False)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"]["device"] = "cuda"
    torch.save(state, run / "checkpoint.pt")
    main(["--snapshot", str(run), "--out", str(tmp_path / "snap"), "--no-progress"])
    meta = json.loads((tmp_path / "snap" / "training.json").read_text())
    assert meta["config"]["device"] == "cuda" and meta["snapshot"]["step"] == 2 and "device_name" not in meta
    got = _load_state(tmp_path / "snap")
    assert set(got) == set(state["model"]) and all(torch.equal(got[k], v) for k, v in state["model"].items())


@pytest.mark.parametrize("family", ["ar", "llada"])
def test_snapshot_writes_the_checkpoint_weights_as_a_loadable_model(tmp_path, family):
    """--snapshot: a run stopped at a checkpoint becomes a model folder with exactly the
    checkpoint's weights and the step, loadable by the family's loader; the run is untouched."""
    run = tmp_path / "run"
    cfg = {**_tiny(family, run).__dict__, "steps": 4, "checkpoint_every": 2, "stop_after": 2}
    train(TrainConfig(**cfg), progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    main(["--snapshot", str(run), "--out", str(tmp_path / "snap"), "--no-progress"])
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    meta = json.loads((tmp_path / "snap" / "training.json").read_text())
    assert meta["snapshot"]["step"] == state["progress"]["step"] == 2
    if family == "ar":
        from dllm_decode.measure.evaluate import load_ar
        model, _ = load_ar(str(tmp_path / "snap"))
    else:
        from dllm_decode.models import load_model
        model, _ = load_model(tmp_path / "snap")
    got = model.state_dict()
    assert set(got) == set(state["model"])
    assert all(torch.equal(got[k], v) for k, v in state["model"].items())
    assert (run / "checkpoint.pt").read_bytes() == before
    logged = [json.loads(x)["step"] for x in (tmp_path / "snap" / "loss_log.jsonl").read_text().splitlines()]
    assert logged == [0, 1]                       # the steps the checkpoint holds, for a later stage
    with pytest.raises(SystemExit, match="needs --out"):
        main(["--snapshot", str(run)])


def _cart_by_hand(masked, att, p):
    """Dream's CART weight written out position by position: 1/2 * sum over revealed i != n of
    p (1-p)^(|n-i|-1), for masked n; 0 elsewhere."""
    B, L = masked.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for n in range(L):
            if not masked[b, n]:
                continue
            out[b, n] = sum(0.5 * p * (1 - p) ** (abs(n - i) - 1)
                            for i in range(L) if i != n and att[b, i] and not masked[b, i])
    return out


def test_cart_weight_follows_dreams_formula():
    from dllm_decode.tools.train import cart_weight

    g = torch.Generator().manual_seed(0)
    masked = torch.rand(3, 30, generator=g) < 0.5
    att = torch.ones(3, 30, dtype=torch.long)
    att[1, :4] = 0                    # left padding is not context
    for p in (0.3, 0.7):
        assert torch.allclose(cart_weight(masked, att, p).double(), _cart_by_hand(masked, att, p), atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):     # as train --autocast bf16 computes them
            assert torch.allclose(cart_weight(masked, att, p).double(), _cart_by_hand(masked, att, p), atol=1e-6)
    # a token between two revealed neighbours weighs most, one with none revealed nothing
    row = torch.tensor([[False, True, False, True, True, True]])
    w = cart_weight(row, torch.ones(1, 6), 0.3)[0]
    assert w[1] > w[3] > w[4] and w[0] == 0


def test_cart_loss_weighs_the_same_masks_by_their_context():
    """--loss-weight cart draws the same masks (mdlm and cart losses agree token by token up to
    their weights) and trains a run that differs from the 1/t one."""
    tok = build_char_tokenizer()
    ids, att, P = Batcher(_tiny("dream", "unused"), tok).next(80)
    logits = torch.randn(ids.shape[0], ids.shape[1], len(tok))

    class Fixed(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            self.seen = x
            return logits

    def loss(kind):
        m = Fixed()
        value = diffusion_loss(m, ids, att, P, tok.mask_token_id, tok.eos_token_id, 1e-3,
                               torch.Generator().manual_seed(0), loss_weight=kind)
        return value, m.seen

    (mdlm, seen_a), (cart, seen_b) = loss("mdlm"), loss("cart")
    assert torch.equal(seen_a, seen_b)
    masked = seen_b == tok.mask_token_id
    ce = torch.nn.functional.cross_entropy(logits[masked], ids[masked], reduction="none").double()
    w = _cart_by_hand(masked, att, 0.3)[masked]
    assert torch.isclose(cart.double(), (ce * w).sum() / (ids.shape[0] * (ids.shape[1] - P)), rtol=1e-5)
    assert not torch.isclose(cart, mdlm)


def test_cart_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(ValueError, match="family 'ar'"):
        train(TrainConfig(**{**_tiny("ar", tmp_path / "a").__dict__, "loss_weight": "cart"}), progress=False)
    with pytest.raises(ValueError, match="--cart-p 1.5"):
        train(TrainConfig(**{**_tiny("dream", tmp_path / "d").__dict__, "loss_weight": "cart", "cart_p": 1.5}),
              progress=False)


def test_model_card_says_when_a_stage_weighs_tokens_by_context():
    """A later stage trained with --loss-weight cart is described as such (with its p), a stage
    that goes back to 1/t says so, and an unchanged one says nothing about weights."""
    from dataclasses import asdict

    from dllm_decode.tools.model_card import later_stage_sentence

    base = asdict(TrainConfig(family="dream", steps=10))
    cart = {**base, "loss_weight": "cart", "cart_p": 0.25}
    assert "CART" in later_stage_sentence(1, cart, base) and "p = 0.25" in later_stage_sentence(1, cart, base)
    assert "1/t again" in later_stage_sentence(2, base, cart)
    assert "CART" not in later_stage_sentence(1, base, base) and "1/t" not in later_stage_sentence(1, base, base)
    assert "1/t" not in later_stage_sentence(1, {**base, "cart_p": 0.5}, base)   # p alone means nothing under 1/t
    annealed = {**base, "attention_anneal": 300}
    assert "causal to full over its first 300 steps" in later_stage_sentence(1, annealed, base)
    assert "causal" not in later_stage_sentence(2, base, annealed)      # each stage's own


def test_model_card_names_the_canvas_odds_and_a_stage_that_changes_them():
    """The card gives the canvases' odds (per task batch: among the canvases its answers fit), and
    a later stage that draws other canvases, or the same ones with other odds, says so."""
    from dataclasses import asdict

    from dllm_decode.tools.model_card import canvas_sentence, later_stage_sentence

    base = asdict(TrainConfig(family="dream", steps=10))
    assert "96/128/256 tokens, drawn per batch with odds 6:2.5:1.5;" in canvas_sentence(base)
    stage = {**base, "canvas": [256, 512, 1024], "canvas_weights": [6.0, 1.0, 1.0], "batch_by_task": True}
    assert "odds 6:1:1 among those the batch's answers fit" in canvas_sentence(stage)
    assert "drawn" not in canvas_sentence({**base, "canvas": [256], "canvas_weights": [1.0]})
    assert "odds 6:1:1" in later_stage_sentence(1, stage, base)
    assert "odds 3:2:2" in later_stage_sentence(1, {**stage, "canvas_weights": [3, 2, 2]}, stage)
    assert "canvas" not in later_stage_sentence(1, stage, {**stage, "seed": 5})


@pytest.mark.slow
@pytest.mark.parametrize("anneal", [0, 3])
def test_compiled_training_follows_the_eager_run(tmp_path, anneal):
    """--compile trains the same model: the loss log of a compiled run matches the eager run's
    within --check's cross-machine tolerance, and its checkpoint loads as an eager one; with
    --attention-anneal too, whose steps pass a new attention mask each and switch to full
    attention (no plan) part-way (slow: the compilation takes tens of seconds on a CPU)."""
    from dllm_decode.tools.train import check_log

    eager = train(_tiny("dream", tmp_path / "eager", steps=5, attention_anneal=anneal), progress=False)
    compiled = train(_tiny("dream", tmp_path / "compiled", steps=5, attention_anneal=anneal, compile=True),
                     progress=False)
    n, mismatch = check_log(compiled, eager)
    assert n == 5 and mismatch is None
    assert set(_weights(compiled)) == set(_weights(eager))
    assert json.loads((compiled / "training.json").read_text())["config"]["compile"] is True


@pytest.mark.parametrize("family", ["dream", "ar", "sdar", "fast_dllm_v2"])
def test_probe_every_reads_the_run_as_it_goes_and_leaves_its_weights_alone(tmp_path, family):
    """--probe-every logs the left-to-right reading before the first step, every N steps and at
    the end; the weights and loss log are those of the same run without it, and the last reading
    is the one tools.probe gives of the written model."""
    from dataclasses import asdict

    from dllm_decode.measure.evaluate import load_ar
    from dllm_decode.tools.model_card import train_flags
    from dllm_decode.tools.probe import read_model
    from dllm_decode.tools.train import _config, _parser

    cfg = _tiny(family, tmp_path / "plain", steps=5).__dict__
    plain = train(TrainConfig(**cfg), progress=False)
    probed = train(TrainConfig(**{**cfg, "out": str(tmp_path / "probed"), "probe_every": 2, "probe_n": 2,
                                  "probe_tasks": ("copy", "chain")}), progress=False)
    assert all(torch.equal(v, _weights(probed)[k]) for k, v in _weights(plain).items())
    assert _same_log(plain, probed)
    lines = _log(probed, "probe_log.jsonl")
    assert [(x["steps"], x["task"]) for x in lines] == [(s, t) for s in (0, 2, 4, 5) for t in ("copy", "chain")]
    assert lines[0] != lines[-2]                    # the reading moved as it trained
    if family == "ar":
        model, tok = load_ar(str(probed))
    else:
        from dllm_decode.models import load_model
        model, tok = load_model(probed)
    for line, r in zip(lines[-2:], read_model(model, tok, ["copy", "chain"], 2, gen_length=80)):
        assert (line["task"], line["n"], line["whole"]) == (r.task, r.n, r.whole)
        assert line["wrong_share"] == round(r.wrong_share, 5)
        assert line["nats_per_char"] == pytest.approx(r.nats_per_char, rel=1e-4)
    assert "probe" not in train_flags(asdict(TrainConfig(**{**cfg, "probe_every": 2, "probe_n": 3})))
    a = _config(_parser().parse_args(["--out", "x", "--probe-every", "3", "--probe-tasks", "chain,copy"]))
    assert (a.probe_every, a.probe_n, a.probe_tasks) == (3, 8, ("chain", "copy"))


def test_a_resumed_run_keeps_its_readings_and_reads_on(tmp_path):
    """Readings up to the checkpoint stay (the one taken at its step too), later ones are
    dropped and taken again: the log is the uninterrupted run's. A snapshot of the checkpoint
    carries the readings it covers."""
    from dllm_decode.tools.train import resume

    cfg = {**_tiny("llada", tmp_path / "whole", steps=5).__dict__, "probe_every": 2, "probe_n": 1,
           "probe_tasks": ("copy",)}
    whole = train(TrainConfig(**cfg), progress=False)
    stopped = train(TrainConfig(**{**cfg, "out": str(tmp_path / "stopped"), "stop_after": 4}), progress=False)
    assert [x["steps"] for x in _log(stopped, "probe_log.jsonl")] == [0, 2, 4]   # 4: read at the checkpoint
    with (stopped / "probe_log.jsonl").open("a") as f:      # a reading past the checkpoint is dropped
        f.write(json.dumps({"steps": 5, "task": "copy"}) + "\n")
    main(["--snapshot", str(stopped), "--out", str(tmp_path / "snap")])
    assert _log(tmp_path / "snap", "probe_log.jsonl") == _log(whole, "probe_log.jsonl")[:3]
    resume(stopped, progress=False)
    assert _log(stopped, "probe_log.jsonl") == _log(whole, "probe_log.jsonl")
    assert [x["steps"] for x in _log(whole, "probe_log.jsonl")] == [0, 2, 4, 5]


@pytest.mark.parametrize("change, message", [
    ({"probe_every": -1}, "--probe-every -1"),
    ({"probe_every": 2, "probe_n": 0}, "--probe-n 0"),
    ({"probe_every": 2, "probe_tasks": ("nope",)}, "nope"),
])
def test_bad_probe_settings_fail_before_training(tmp_path, change, message):
    with pytest.raises((ValueError, KeyError), match=message):
        train(TrainConfig(**{**_tiny("llada", tmp_path / "x").__dict__, **change}), progress=False)
    assert not (tmp_path / "x" / "loss_log.jsonl").exists()


def test_anneal_attend_opens_a_growing_share_of_the_non_causal_pairs():
    """Step s of N attends causally (by RoPE position: a left-padding query sees the first real
    token) plus a share (s + 1) / N of the other pairs, the same draw for every row and for a rerun
    of the step; from step N - 1 on, full attention (None)."""
    from dllm_decode.tools.train import anneal_attend

    L = 200
    att = torch.ones(2, L, dtype=torch.long)
    att[1, :5] = 0                                                    # row 1: 5 left pads
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)                # key after query, row 0
    for step, n in ((0, 10), (4, 10), (8, 10)):
        a = anneal_attend(att, step, n, seed=3)
        assert a.shape == (2, L, L) and a.dtype == torch.bool
        assert a[0][~upper].all()                                     # causal pairs always open
        share = a[0][upper].float().mean().item()
        assert abs(share - (step + 1) / n) < 0.01                     # ~20,000 pairs
        assert torch.equal(a, anneal_attend(att, step, n, seed=3))
        assert not torch.equal(a, anneal_attend(att, step, n, seed=4))
        assert a[1, :5, 5].all()                                      # pads see the first real token
        assert a[1, 5:, 5:][~upper[5:, 5:]].all()                     # the real tokens' causal pairs
    assert anneal_attend(att, 9, 10, seed=3) is None and anneal_attend(att, 50, 10, seed=3) is None


def test_an_annealed_dream_starts_as_its_ar_model(tmp_path):
    """Dream adapted from AR weights, attending causally (a share near 0), gives the AR model's
    logits one position on (its shifted head), on a left-padded row too: what the annealing
    starts from. With full attention it does not."""
    from transformers import LlamaForCausalLM

    from dllm_decode.models import ComputePlan, load_model
    from dllm_decode.tools.train import anneal_attend

    ar = train(_tiny("ar", tmp_path / "ar", steps=3), progress=False)
    cfg = {**_tiny("dream", tmp_path / "dream", steps=0).__dict__, "init": str(ar), "n_kv_heads": 2}
    model, tok = load_model(train(TrainConfig(**cfg), progress=False))
    ar_model = LlamaForCausalLM.from_pretrained(str(ar)).eval()
    text = tok("a = 17\nb = a + 26\n", add_special_tokens=False)["input_ids"] + [tok.mask_token_id] * 4
    n = len(text)
    ids = torch.tensor([text, [tok.pad_token_id] * 3 + text[:-3]])
    att = torch.ones_like(ids)
    att[1, :3] = 0
    causal = anneal_attend(att, 0, 10 ** 9, seed=0)
    assert torch.equal(causal[0], torch.ones(n, n, dtype=torch.bool).tril())   # the draw opened nothing
    with torch.no_grad():
        want = ar_model(input_ids=ids[:1]).logits                             # (1, n, V)
        got = model(ids, attention_mask=att, plan=ComputePlan(attend=causal))
        full = model(ids, attention_mask=att)
    torch.testing.assert_close(got[0, 1:], want[0, :-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1, 4:], want[0, :n - 4], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full[0, 1:], want[0, :-1], rtol=1e-4, atol=1e-5)


def test_an_annealed_run_resumes_bit_for_bit_and_differs_from_one_without(tmp_path):
    from dllm_decode.tools.model_card import train_flags
    from dllm_decode.tools.train import _config, _parser, resume
    from dataclasses import asdict

    cfg = {**_tiny("dream", tmp_path / "whole", steps=5).__dict__, "attention_anneal": 4}
    whole = train(TrainConfig(**cfg), progress=False)
    stopped = train(TrainConfig(**{**cfg, "out": str(tmp_path / "stopped"), "stop_after": 2}), progress=False)
    resume(stopped, progress=False)
    assert all(torch.equal(v, _weights(stopped)[k]) for k, v in _weights(whole).items())
    assert _same_log(whole, stopped)
    plain = train(TrainConfig(**{**cfg, "out": str(tmp_path / "plain"), "attention_anneal": 0}), progress=False)
    assert any(not torch.equal(v, _weights(plain)[k]) for k, v in _weights(whole).items())
    assert "--attention-anneal 4" in train_flags(asdict(TrainConfig(**cfg)))
    assert _config(_parser().parse_args(["--out", "x", "--attention-anneal", "7"])).attention_anneal == 7


@pytest.mark.parametrize("family, mlp", [("dream", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
                                         ("llada", ("ff_proj", "up_proj", "ff_out"))])
def test_mlp_lr_scale_zero_keeps_the_mlp_weights_and_trains_the_rest(tmp_path, family, mlp):
    """--mlp-lr-scale 0 holds every MLP matrix at its starting value (LLaDA's names and Qwen2's)
    while attention moves; 1 keeps the optimizer's two groups, so earlier checkpoints resume."""
    from dllm_decode.tools.char_tokenizer import build_char_tokenizer
    from dllm_decode.tools.train import build, optimizer

    cfg = TrainConfig(**{**_tiny(family, tmp_path / "frozen").__dict__, "mlp_lr_scale": 0.0})
    start = {k: v.detach().clone() for k, v in build(cfg, build_char_tokenizer()).state_dict().items()}
    ours = _load_state(train(cfg, progress=False))
    frozen = [k for k in ours if any(f".0.{m}." in k for m in mlp)]       # the one layer's
    assert len(frozen) == 3 and all(torch.equal(ours[k], start[k]) for k in frozen)
    moved = [k for k in ours if k not in frozen and ours[k].dim() >= 2]      # attention, embeddings, the head
    assert len(moved) >= 5 and all(not torch.equal(ours[k], start[k]) for k in moved)
    assert len(optimizer(TrainConfig(**_tiny(family, "x").__dict__), build(cfg, build_char_tokenizer())).param_groups) == 2


def test_mlp_lr_scale_resumes_bit_for_bit_and_reaches_the_card(tmp_path):
    """The MLP group's share survives a checkpoint (a resumed run ends at the uninterrupted
    weights), a share of 0.5 trains otherwise than 1, and the card's command repeats the flag."""
    from dataclasses import asdict

    from dllm_decode.tools.model_card import train_flags
    from dllm_decode.tools.train import _config, _parser, resume

    cfg = {**_tiny("dream", tmp_path / "whole", steps=5).__dict__, "mlp_lr_scale": 0.5}
    whole = train(TrainConfig(**cfg), progress=False)
    stopped = train(TrainConfig(**{**cfg, "out": str(tmp_path / "stopped"), "stop_after": 2}), progress=False)
    resume(stopped, progress=False)
    assert all(torch.equal(v, _weights(stopped)[k]) for k, v in _weights(whole).items())
    plain = train(TrainConfig(**{**cfg, "out": str(tmp_path / "plain"), "mlp_lr_scale": 1.0}), progress=False)
    assert any(not torch.equal(v, _weights(plain)[k]) for k, v in _weights(whole).items())
    assert "--mlp-lr-scale 0.5" in train_flags(asdict(TrainConfig(**cfg)))
    assert _config(_parser().parse_args(["--out", "x", "--mlp-lr-scale", "0.25"])).mlp_lr_scale == 0.25
    with pytest.raises(ValueError, match="--mlp-lr-scale -1"):
        train(TrainConfig(**{**cfg, "out": str(tmp_path / "bad"), "mlp_lr_scale": -1.0}), progress=False)


@pytest.mark.parametrize("change, message", [
    ({"family": "ar", "attention_anneal": 3}, "family 'ar' does not attend bidirectionally"),
    ({"family": "sdar", "attention_anneal": 3}, "family 'sdar' does not attend bidirectionally"),
    ({"attention_anneal": -1}, "--attention-anneal -1"),
    ({"family": "sdar", "mask_mix": (0.5, 0.5, 0.0)}, "family 'sdar' masks each block by its own scheme"),
    ({"family": "fast_dllm_v2", "full_mask": 0.2}, "family 'fast_dllm_v2' masks each block by its own scheme"),
    ({"family": "fast_dllm_v2", "block_size": 0}, "--block-size 0"),
    ({"family": "fast_dllm_v2", "loss_weight": "cart"}, "family 'fast_dllm_v2' has no such loss"),
    ({"fit_canvas": True}, "a 'llada' model fills a whole generation canvas"),
    ({"family": "ar", "fit_canvas": True}, "a 'ar' model pads nothing"),
])
def test_settings_the_family_cannot_take_fail_before_training(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**{**_tiny("llada", tmp_path / "x").__dict__, **change}), progress=False)
    assert not (tmp_path / "x" / "loss_log.jsonl").exists()


# ---- refusals that lose nothing (a mistaken command must not replace or corrupt a run folder) ----

TINY = ["--family", "llada", "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--mlp-hidden", "32",
        "--steps", "2", "--batch-size", "2", "--canvas", "80", "--warmup", "1", "--log-every", "1",
        "--threads", "1", "--no-progress"]


def _files(d):
    """A folder's files and contents, but its lock (it names whichever process holds it)."""
    return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file() and p.name != "train.lock"}


def test_out_refuses_a_run_or_model_folder_and_checks_everything_before_writing(tmp_path):
    """--out naming a finished or stopped run (or a model) is refused, folder untouched; a refused
    configuration writes nothing, not even an earlier stage's log; --init X --out X still trains
    a later stage in place, as _earlier_stages allows."""
    full, stopped = tmp_path / "full", tmp_path / "st"
    main([*TINY, "--out", str(full)])
    main([*TINY, "--out", str(stopped), "--stop-after", "1"])
    for d, extra in ((full, ["--seed", "7"]), (stopped, ["--seed", "9", "--stop-after", "1"])):
        before = _files(d)
        with pytest.raises(SystemExit, match=f"--out {d} already holds"):
            main([*TINY, "--out", str(d), *extra])
        assert _files(d) == before
    with pytest.raises(SystemExit, match="--task-weights has 2 entries"):
        main([*TINY, "--out", str(tmp_path / "B"), "--init", str(full), "--task-weights", "1,2"])
    assert not (tmp_path / "B").exists()
    main([*TINY, "--out", str(full), "--init", str(full), "--seed", "3", "--steps", "1"])
    assert json.loads((full / "training.json").read_text())["init"]["config"]["steps"] == 2


def test_snapshot_refuses_to_replace_a_model_and_names_its_flag(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "st"
    main([*TINY, "--out", str(full)])
    main([*TINY, "--out", str(stopped), "--stop-after", "1"])
    before = _files(full)
    with pytest.raises(SystemExit, match=f"--out {full} already holds"):
        main(["--snapshot", str(stopped), "--out", str(full)])
    assert _files(full) == before
    with pytest.raises(SystemExit, match="train: --snapshot .*nowhere: no checkpoint.pt"):
        main(["--snapshot", str(tmp_path / "nowhere"), "--out", str(tmp_path / "snap")])


def test_resume_refuses_a_finished_run(tmp_path):
    """A finished run keeps its last periodic checkpoint; resuming it would retrain its end."""
    out = tmp_path / "r"
    main([*TINY, "--out", str(out), "--steps", "3", "--checkpoint-every", "1"])
    before = _files(out)
    for extra in ([], ["--stop-after", "2"]):
        with pytest.raises(SystemExit, match=f"--resume {out}: the run already finished at step 3"):
            main(["--resume", str(out), "--no-progress", *extra])
    assert _files(out) == before


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path):
    """One writer per run folder: a second --resume while the first runs is refused."""
    from dllm_decode.tools.train import _Lock
    from dllm_decode.tools.train_state import save_checkpoint

    out = tmp_path / "r"
    main([*TINY, "--out", str(out), "--steps", "3", "--stop-after", "1"])
    before = _files(out)
    held = _Lock(out)          # another open file description: flock refuses it like another process
    try:
        with pytest.raises(SystemExit, match=f"{out} is in use by another process \\(PID \\d+\\)"):
            main(["--resume", str(out), "--no-progress"])
        assert _files(out) == before
    finally:
        held.release()
    main(["--resume", str(out), "--no-progress"])        # free again once released
    assert (out / "model.safetensors").exists()
    import inspect
    assert "getpid" in inspect.getsource(save_checkpoint)   # each writer's temporary file is its own


def test_resume_refuses_flags_it_would_ignore(tmp_path):
    out = tmp_path / "r"
    main([*TINY, "--out", str(out), "--stop-after", "1"])
    before = _files(out)
    with pytest.raises(SystemExit, match="--steps, --lr would be ignored"):
        main(["--resume", str(out), "--steps", "10", "--lr", "0.5", "--no-progress"])
    assert _files(out) == before


def test_check_log_pairs_the_steps_both_logs_hold(tmp_path):
    """A rerun logging every 2nd step matches the log of every step; no shared step is no match."""
    from dllm_decode.tools.train import check_log

    every = tmp_path / "every"
    main([*TINY, "--out", str(every), "--steps", "4"])
    second = tmp_path / "second"
    main([*TINY, "--out", str(second), "--steps", "4", "--log-every", "2", "--check", str(every)])
    n, mismatch = check_log(second, every)
    assert mismatch is None and n == 3             # steps 0, 2 and the last, 3
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "loss_log.jsonl").write_text('{"step": 99, "loss": 1.0, "lr": 0.1}\n')
    n, mismatch = check_log(tmp_path / "none", every)
    assert n == 0 and "nothing to compare" in mismatch


def test_a_canvas_without_room_for_eos_fails_before_training(tmp_path):
    """copy's answers run to 70 tokens: a canvas of 70 leaves no room for EOS, refused up front
    (without --batch-by-task too), and layout refuses an answer that fills its canvas."""
    tok = build_char_tokenizer()
    b = Batcher(_tiny("llada", tmp_path, tasks=("repeat",)), tok)
    with pytest.raises(ValueError, match="do not fit canvas 3"):
        b.layout([([1, 2], [5, 6, 7])], 3)
    with pytest.raises(SystemExit, match="train: --canvas 70 is too short for task 'copy'"):
        main([*TINY, "--out", str(tmp_path / "c"), "--canvas", "70,200", "--tasks", "copy"])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-1"], "--steps -1"), (["--stop-after", "-1"], "--stop-after -1"),
    (["--full-mask", "2"], "--full-mask 2"), (["--task-weights", "1,-1,1"], "--task-weights"),
    (["--task-weights", "0,0,0"], "--task-weights"), (["--max-length", "50"], "--max-length 50"),
    (["--batch-size", "0"], "--batch-size 0"), (["--log-every", "0"], "--log-every 0"),
    (["--mask-mix", "1,0"], "--mask-mix has 2 entries"), (["--canvas-weights", "0"], "--canvas-weights"),
    (["--n-heads", "3"], "--n-heads 3"), (["--threads", "-1"], "--threads -1"),
    (["--tasks", "bogus"], "--tasks: unknown task 'bogus'"), (["--warmup", "-1"], "--warmup -1"),
    (["--lr", "-0.1"], "--lr -0.1"), (["--checkpoint-every", "-2"], "--checkpoint-every -2"),
])
def test_impossible_values_fail_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(SystemExit, match="train: " + message.replace("(", "\\(")):
        main([*TINY, "--out", str(tmp_path / "r"), *flags])
    assert not (tmp_path / "r").exists()


def test_unreadable_inputs_are_one_line_naming_the_flag(tmp_path):
    """A corrupt checkpoint, an --init folder without its loss log, a --check folder without a
    record: one line each, before training, and no --out folder left behind."""
    out = tmp_path / "r"
    main([*TINY, "--out", str(out), "--stop-after", "1"])
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=f"train: --resume {out}: .*checkpoint.pt does not load"):
        main(["--resume", str(out), "--no-progress"])
    full = tmp_path / "full"
    main([*TINY, "--out", str(full)])
    (full / "loss_log.jsonl").unlink()
    with pytest.raises(SystemExit, match=f"train: --init {full}: no loss_log.jsonl"):
        main([*TINY, "--out", str(tmp_path / "s2"), "--init", str(full)])
    assert not (tmp_path / "s2").exists()
    with pytest.raises(SystemExit, match="train: --check .*nowhere: no training.json"):
        main([*TINY, "--out", str(tmp_path / "c"), "--check", str(tmp_path / "nowhere")])
    assert not (tmp_path / "c").exists()
