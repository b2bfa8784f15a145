"""REPR-ALIGN in training (train --repr-align): the frozen teacher gives the AR model's hidden
states (checked against transformers' LlamaForCausalLM), the term added to the loss is the
formula written out position by position, and an aligned run resumes bit for bit."""
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dllm_decode.models import ComputePlan, build_random_model, load_model
from dllm_decode.tools.train import TrainConfig, _init_record, _teacher, diffusion_loss, mask_canvas, resume, train


def _tiny(family, out, steps=3, **kw):
    return TrainConfig(family=family, out=str(out), steps=steps, batch_size=4, d_model=16, n_layers=2,
                       n_heads=2, mlp_hidden=32, canvas=(80,), canvas_weights=(1.0,), warmup=1, log_every=1, **kw)


def _ar(tmp_path) -> Path:
    return train(_tiny("ar", tmp_path / "ar"), progress=False)


def _dream(tmp_path, ar, name="dream", **kw) -> TrainConfig:
    return _tiny("dream", tmp_path / name, init=str(ar), n_kv_heads=2, **kw)


def _weights(d):
    return load_file(str(Path(d) / "model.safetensors"))


def test_hidden_states_are_the_residual_stream_before_the_final_norm():
    model = build_random_model("llada", vocab_size=40, d_model=32, n_layers=3, n_heads=4, mask_token_id=39,
                               eos_token_id=1, pad_token_id=0, seed=1, dtype=torch.float64).eval()
    ids = torch.randint(2, 39, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model.execute(ids, None, ComputePlan(hidden=True))
    assert len(out.hidden) == 3 and out.hidden[0].shape == (2, 9, 32)
    torch.testing.assert_close(out.logits, model(ids), rtol=0, atol=0)
    head = F.linear(model.final_norm()(out.hidden[-1]), model.head_weight())
    torch.testing.assert_close(head, out.logits, rtol=1e-12, atol=1e-12)
    assert model(ids, plan=ComputePlan()).shape == out.logits.shape and model.execute(ids).hidden is None
    with pytest.raises(ValueError, match="hidden"):
        ComputePlan(hidden=True, keys="store")


def test_the_teacher_gives_the_ar_models_hidden_states(tmp_path):
    """The teacher (the AR weights in Dream's layout, reading causally) gives LlamaForCausalLM's
    hidden states layer by layer, on a left-padded row too."""
    from transformers import LlamaForCausalLM

    from dllm_decode.tools.char_tokenizer import build_char_tokenizer
    from dllm_decode.tools.train import causal_attend

    ar = _ar(tmp_path)
    cfg = _dream(tmp_path, ar)
    teacher = _teacher(cfg, build_char_tokenizer(), _init_record(cfg))
    assert not any(p.requires_grad for p in teacher.parameters())
    hf = LlamaForCausalLM.from_pretrained(str(ar)).eval()
    ids = torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids, dtype=torch.bool)
    att[1, :4] = False
    pos = (att.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        got = teacher.execute(ids, att, ComputePlan(attend=causal_attend(att), hidden=True)).hidden
        want = hf(input_ids=ids, attention_mask=att.long(), position_ids=pos, output_hidden_states=True).hidden_states
    assert len(got) == 2
    torch.testing.assert_close(got[0][att], want[1][att], rtol=1e-5, atol=1e-5)
    # transformers applies the final norm to its last entry
    torch.testing.assert_close(teacher.final_norm()(got[1])[att], want[2][att], rtol=1e-5, atol=1e-5)


def test_the_alignment_term_is_one_minus_the_mean_cosine_before_each_masked_token(tmp_path):
    """diffusion_loss with a teacher adds `align` x (1 - cosine), averaged over every layer and
    every position whose next token is masked; the teacher side from LlamaForCausalLM (its last
    layer's output before the final norm, by a hook), the masks redrawn from the same seed."""
    from transformers import LlamaForCausalLM

    ar = _ar(tmp_path)
    cfg = _dream(tmp_path, ar, steps=0)
    model, tok = load_model(train(cfg, progress=False))
    model = model.float().train()
    hf = LlamaForCausalLM.from_pretrained(str(ar)).eval()
    teacher = _teacher(cfg, tok, _init_record(cfg))
    text = tok("B*03: 043*03=129\nC*02: 129*02=258\n", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([text, [tok.pad_token_id] * 3 + text[:-3]])
    att = ids != tok.pad_token_id
    P = 6
    args = (ids, att, P, tok.mask_token_id, tok.eos_token_id, 1e-3)

    def loss(**kw):
        return diffusion_loss(model, *args, torch.Generator().manual_seed(5), (0.4, 0.6, 0.0), **kw)

    with torch.no_grad():
        term = (loss(teacher=teacher, align=2.0) - loss()) / 2.0
        masked, _ = mask_canvas(ids, P, tok.eos_token_id, 1e-3, torch.Generator().manual_seed(5), (0.4, 0.6, 0.0))
        noisy = torch.where(masked, tok.mask_token_id, ids)
        student = model.execute(noisy, att, ComputePlan(hidden=True)).hidden
        last = []
        hook = hf.model.layers[-1].register_forward_hook(lambda m, i, o: last.append(o[0] if isinstance(o, tuple) else o))
        pos = (att.long().cumsum(1) - 1).clamp(min=0)
        want_hidden = hf(input_ids=ids, attention_mask=att.long(), position_ids=pos, output_hidden_states=True).hidden_states
        hook.remove()
    taught = [want_hidden[1], last[0]]
    sims = [F.cosine_similarity(student[l][b, p - 1], taught[l][b, p - 1], dim=0)
            for b in range(2) for p in range(P, ids.shape[1]) if masked[b, p] for l in range(2)]
    assert len(sims) > 10
    by_hand = 1 - torch.stack(sims).mean()
    assert 0.01 < float(by_hand) < 1.5
    torch.testing.assert_close(term, by_hand, rtol=1e-4, atol=1e-5)


def test_an_aligned_run_resumes_bit_for_bit_and_differs_from_one_without(tmp_path):
    from dllm_decode.tools.model_card import adaptation_sentence, train_flags
    from dllm_decode.tools.train import _config, _parser

    ar = _ar(tmp_path)
    cfg = _dream(tmp_path, ar, name="whole", steps=5, repr_align=5.0)
    whole = train(cfg, progress=False)
    stopped = train(TrainConfig(**{**asdict(cfg), "out": str(tmp_path / "stopped"), "stop_after": 2}), progress=False)
    resume(stopped, progress=False)
    assert all(torch.equal(v, _weights(stopped)[k]) for k, v in _weights(whole).items())
    log = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                     for x in (Path(d) / "loss_log.jsonl").read_text().splitlines()]
    assert log(whole) == log(stopped)
    plain = train(TrainConfig(**{**asdict(cfg), "out": str(tmp_path / "plain"), "repr_align": 0.0}), progress=False)
    assert any(not torch.equal(v, _weights(plain)[k]) for k, v in _weights(whole).items())
    assert all(a["loss"] > b["loss"] for a, b in zip(log(whole)[:1], log(plain)[:1]))   # the same batch, plus the term
    assert "--repr-align 5.0" in train_flags(asdict(cfg))
    assert _config(_parser().parse_args(["--out", "x", "--repr-align", "2"])).repr_align == 2.0
    assert "5 times one minus the cosine" in adaptation_sentence(asdict(cfg))
    assert adaptation_sentence(asdict(TrainConfig())) == ""


def test_a_resumed_aligned_run_needs_its_teacher(tmp_path):
    ar = _ar(tmp_path)
    moved = shutil.copytree(ar, tmp_path / "ar-copy")
    cfg = _dream(tmp_path, moved, steps=4, repr_align=1.0, stop_after=2)
    stopped = train(cfg, progress=False)
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match="ar-copy"):
        resume(stopped, progress=False)


@pytest.mark.parametrize("change, message", [
    ({"family": "llada"}, "family 'llada' is not adapted that way"),
    ({"repr_align": -1.0}, "--repr-align -1.0"),
    ({"init": None}, "--init must name an AR checkpoint"),
    ({"compile": True}, "--compile does not compile"),
])
def test_bad_alignment_settings_fail_before_training(tmp_path, change, message):
    ar = _ar(tmp_path)
    cfg = {**asdict(_dream(tmp_path, ar, name="x", repr_align=1.0)), **change}
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**cfg), progress=False)
    assert not (tmp_path / "x").exists()


def test_alignment_to_a_diffusion_checkpoint_is_refused(tmp_path):
    ar = _ar(tmp_path)
    dream = train(_dream(tmp_path, ar, steps=1), progress=False)
    with pytest.raises(ValueError, match="AR checkpoint"):
        train(_tiny("dream", tmp_path / "y", init=str(dream), n_kv_heads=2, repr_align=1.0), progress=False)
    assert not (tmp_path / "y").exists()
