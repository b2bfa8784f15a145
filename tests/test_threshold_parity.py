"""The threshold plugin reproduces Fast-dLLM's threshold and factor decoding token for token
at T = 0 (float64), batch 1 and a padded batch of 4, and keeps every engine invariant."""

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.testing import RandomLogitsModel, check_invariants
from reference_fastdllm import _commit_count_factor, fastdllm_generate
from shipped import shipped_model_and_prompts

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


def _recipe(gen, block, batch, **select):
    return recipe_from_dict({"choose_span": "llada", "score": "llada", "cache_policy": "none",
                             "select_tokens": {"plugin": "threshold", **select},
                             "generation": {"gen_length": gen, "block_length": block, "steps": gen,
                                            "batch_size": batch}})


def _check(model, gen, block, batch, **select):
    prompts = PROMPTS4[:batch]
    ref, ref_nfe = fastdllm_generate(model, prompts, mask_id=model.spec.mask_token_id, pad_id=0,
                                     gen_length=gen, block_length=block,
                                     threshold=select.get("threshold") if select.get("mode") != "factor" else None,
                                     factor=select.get("factor") if select.get("mode") == "factor" else None)
    out = Decoder(model, _recipe(gen, block, batch, **select)).generate(prompts)
    assert out.tokens == ref.tolist()
    if batch == 1:
        # batched, the reference holds every row at a block until all rows finish it; the
        # engine lets each row move on, so only a single row's NFE is comparable
        assert out.rows[0].nfe == ref_nfe
    return ref_nfe


SETTINGS = [dict(mode="threshold", threshold=t) for t in (0.9, 0.5, 0.2, 1.0)] + \
           [dict(mode="factor", factor=f) for f in (0.5, 1.0, 2.0, 4.0)]


@pytest.mark.parametrize("select", SETTINGS, ids=lambda s: f"{s['mode']}-{list(s.values())[1]}")
@pytest.mark.parametrize("gen,block", [(16, 16), (16, 4), (24, 8)])
@pytest.mark.parametrize("batch", [1, 4])
def test_matches_reference_on_stub_model(select, gen, block, batch):
    model = RandomLogitsModel(vocab_size=24, seed=gen + block, sharpness=4.0)
    _check(model, gen, block, batch, **select)


@pytest.mark.parametrize("select", [SETTINGS[0], SETTINGS[2], SETTINGS[5], SETTINGS[7]],
                         ids=["thr0.9", "thr0.2", "factor1", "factor4"])
@pytest.mark.parametrize("batch", [1, 4])
def test_matches_reference_on_tiny_llada(tiny_llada, select, batch):
    _check(tiny_llada, 16, 8, batch, **select)


def test_threshold_one_is_one_token_per_step_and_low_threshold_is_faster():
    """Pins the top-1 fallback (nothing reaches 1.0, yet every step commits one token) and shows
    the check can fail: a lower threshold needs fewer forwards."""
    model = RandomLogitsModel(vocab_size=24, seed=5, sharpness=4.0)
    assert _check(model, 16, 16, 1, mode="threshold", threshold=1.0) == 16
    assert _check(model, 16, 16, 1, mode="threshold", threshold=0.2) < 16


def test_factor_quirk_at_the_last_rank():
    """Failing exactly at the last rank still commits every token (reference behaviour)."""
    assert _commit_count_factor([0.99, 0.99, 0.1], 1.0) == 3
    assert _commit_count_factor([0.99, 0.1, 0.99, 0.99], 1.0) == 1 + 0  # fails at rank 1 -> 1
    from dllm_decode.policies.threshold import factor_count

    for conf in ([0.99, 0.99, 0.1], [0.99, 0.1, 0.05, 0.01], [0.99, 0.9, 0.8, 0.1, 0.01], [0.3]):
        c = torch.tensor([conf + [float("-inf")] * 2], dtype=torch.float64)
        assert int(factor_count(c, 1.0)) == _commit_count_factor(sorted(conf, reverse=True), 1.0)


@pytest.mark.parametrize("select", SETTINGS[:2] + SETTINGS[5:6])
def test_invariants(select):
    model = RandomLogitsModel(vocab_size=40, seed=2)
    check_invariants(model, {"choose_span": "llada", "score": "llada", "cache_policy": "none",
                             "select_tokens": {"plugin": "threshold", **select},
                             "generation": {"gen_length": 16, "block_length": 8, "steps": 16}})


@pytest.mark.parametrize("select", [SETTINGS[0], SETTINGS[5]], ids=["thr0.9", "factor1"])
def test_matches_reference_on_llada_reference(select):
    """The shipped llada-reference in float64 on held-out copy and case prompts, blocks of 32."""
    model, prompts = shipped_model_and_prompts("llada", ("copy", "case"))
    out = Decoder(model, _recipe(96, 32, 2, **select)).generate(prompts)
    for j, prompt in enumerate(prompts):
        alone, nfe = fastdllm_generate(model, [prompt], mask_id=model.spec.mask_token_id, pad_id=model.spec.pad_token_id,
                                       gen_length=96, block_length=32,
                                       threshold=select.get("threshold") if select["mode"] == "threshold" else None,
                                       factor=select.get("factor") if select["mode"] == "factor" else None)
        assert out.tokens[j] == alone[0].tolist()
        assert out.rows[j].nfe == nfe < 96
