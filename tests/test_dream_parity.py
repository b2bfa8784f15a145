"""The dream plugin reproduces Dream's sampler and Fast-dLLM's Dream block sampler token for token
at T = 0 (float64) against tests/reference_dream.py, on a stub model and a tiny Dream-format
model (shifted logits), alone and in a padded batch, and keeps every engine invariant."""

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.models.loader import load_tokenizer
from dllm_decode.models import ComputePlan
from dllm_decode.testing import RandomLogitsModel, check_invariants
from reference_dream import dream_block_generate, dream_generate
from shipped import MODELS, shipped_model_and_prompts

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


def _recipe(gen, steps, batch, block=None, **params):
    return recipe_from_dict({"policy": {"plugin": "dream", **params}, "cache_policy": "none",
                             "generation": {"gen_length": gen, "steps": steps, "batch_size": batch,
                                            "block_length": block}})


def _raw(model):
    if getattr(model.spec, "shift_logits", False):
        return lambda x: model(x, plan=ComputePlan(shift=False))
    return lambda x: model(x)


def _decode(model, gen, steps, batch, block=None, **params):
    out = Decoder(model, _recipe(gen, steps, batch, block, **params)).generate(PROMPTS4[:batch], keep_states=True)
    return out


STUB = RandomLogitsModel(vocab_size=24, seed=11, sharpness=4.0)


def _setup(which, tiny_dream, case):
    """The model under test and a copy of the case to pop parameters from."""
    return (STUB if which == "stub" else tiny_dream), dict(case)

ORIGINAL = [dict(alg="entropy", steps=16), dict(alg="maskgit_plus", steps=8), dict(alg="topk_margin", steps=4),
            dict(alg="entropy", steps=8, top_p=0.9), dict(alg="maskgit_plus", steps=16, top_k=5)]


@pytest.mark.parametrize("case", ORIGINAL, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("which", ["stub", "dream"])
def test_original_sampler_matches_reference(case, batch, which, tiny_dream):
    model, case = _setup(which, tiny_dream, case)
    steps = case.pop("steps")
    out = _decode(model, 16, steps, batch, **case)
    for j in range(batch):
        ref, nfe, _ = dream_generate(_raw(model), PROMPTS4[j], mask_id=model.spec.mask_token_id, gen_length=16,
                                     steps=steps, shift=which == "dream", **case)
        assert out.tokens[j] == ref
        assert out.rows[j].nfe == nfe


def test_first_step_commits_nothing_when_steps_equal_gen_length():
    """The pinned quirk: int(G * (1 - s/t)) = int(0.999) = 0 at the first of G steps, and the
    last step takes the two that remain."""
    out = _decode(STUB, 16, 16, 1, alg="maskgit_plus")
    per_step = [int(r.committed.sum()) for r in out.states[0].history]
    _, _, ref = dream_generate(_raw(STUB), PROMPTS4[0], mask_id=STUB.spec.mask_token_id, gen_length=16,
                               steps=16, alg="maskgit_plus")
    assert per_step == ref
    assert per_step[0] == 0 and per_step[-1] == 2 and len(per_step) == 16


BLOCK = [dict(alg="entropy", steps=16, block=8), dict(alg="maskgit_plus", steps=8, block=4),
         dict(alg="confidence_threshold", threshold=0.5, steps=16, block=8),
         dict(alg="confidence_threshold", threshold=0.9, steps=16, block=16)]


@pytest.mark.parametrize("case", BLOCK, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("which", ["stub", "dream"])
def test_fastdllm_block_sampler_matches_reference(case, batch, which, tiny_dream):
    model, case = _setup(which, tiny_dream, case)
    steps, block = case.pop("steps"), case.pop("block")
    out = _decode(model, 16, steps, batch, block=block, first_token=True, **case)
    for j in range(batch):
        ref, nfe = dream_block_generate(_raw(model), PROMPTS4[j], mask_id=model.spec.mask_token_id,
                                        gen_length=16, steps=steps, block_length=block,
                                        alg=case["alg"], threshold=case.get("threshold"),
                                        shift=which == "dream")
        assert out.tokens[j] == ref
        assert out.rows[j].nfe == nfe


def test_entropy_and_margin_orders_differ_from_probability():
    """The confidence kinds are really different orders (the parity tests could not tell a
    plugin that ignored `alg` otherwise)."""
    outs = {alg: _decode(STUB, 16, 8, 4, alg=alg).tokens for alg in ("maskgit_plus", "topk_margin", "entropy")}
    assert len({str(v) for v in outs.values()}) > 1


@pytest.mark.parametrize("params", [dict(alg="entropy"), dict(alg="origin"), dict(alg="maskgit_plus", alg_temp=0.5),
                                    dict(alg="confidence_threshold", first_token=True)])
def test_invariants(params):
    # origin and alg_temp draw positions at random even at T = 0: from each row's own noise, so
    # the batch check holds for them too
    check_invariants(RandomLogitsModel(vocab_size=40, seed=2),
                     {"policy": {"plugin": "dream", **params}, "cache_policy": "none",
                      "generation": {"gen_length": 16, "block_length": 8, "steps": 8}})


def test_first_token_needs_two_steps_per_block():
    from dllm_decode.errors import RecipeError

    with pytest.raises(RecipeError, match="first_token needs at least 2 steps per block"):
        Decoder(STUB, _recipe(16, 2, 1, block=8, first_token=True))


@pytest.mark.parametrize("case", [dict(alg="entropy", steps=48), dict(alg="maskgit_plus", steps=96, block=32,
                                                                      first_token=True)],
                         ids=["entropy-48", "block32-first-token"])
def test_matches_reference_on_dream_reference(case):
    """The shipped dream-reference in float64 on held-out copy and case prompts."""
    model, prompts = shipped_model_and_prompts("dream", ("copy", "case"))
    case = dict(case)
    steps, block = case.pop("steps"), case.pop("block", None)
    out = Decoder(model, _recipe(96, steps, 2, block, **case)).generate(prompts)
    for j, prompt in enumerate(prompts):
        if block is None:
            ref, nfe, _ = dream_generate(_raw(model), prompt, mask_id=model.spec.mask_token_id, gen_length=96,
                                         steps=steps, shift=True, alg=case["alg"])
        else:
            ref, nfe = dream_block_generate(_raw(model), prompt, mask_id=model.spec.mask_token_id, gen_length=96,
                                            steps=steps, block_length=block, alg=case["alg"], shift=True)
        assert out.tokens[j] == ref
        assert out.rows[j].nfe == nfe
    tok = load_tokenizer(MODELS / "dream-reference")
    assert "####" in tok.decode(out.tokens[0])      # a trained model, not noise
