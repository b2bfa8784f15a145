"""The slowfast plugin reproduces SlowFast sampling (code and paper variants) token for token at
T = 0 (float64) against tests/reference_slowfast.py, alone and in a padded batch, keeps every
engine invariant, and keeps its spans and phases when a recipe swaps its select_tokens slot."""


import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.models import build_random_model
from dllm_decode.testing import RandomLogitsModel, check_invariants
from reference_slowfast import slowfast_generate
from shipped import shipped_model_and_prompts

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]
REF_KEYS = {"explore_steps": "K", "window": "W"}


def _recipe(gen, block, batch, select=None, **params):
    data = {"policy": {"plugin": "slowfast", **params}, "score": "llada", "cache_policy": "none",
            "generation": {"gen_length": gen, "block_length": block, "batch_size": batch}}
    if select is not None:
        data["select_tokens"] = select
    return recipe_from_dict(data)


def _check(model, gen, block, batch, select=None, prompts=PROMPTS4, **params):
    out = Decoder(model, _recipe(gen, block, batch, select, **params)).generate(prompts[:batch], keep_states=True)
    ref_params = {REF_KEYS.get(k, k): v for k, v in params.items()}
    if select is not None:
        ref_params["select_threshold"] = select["threshold"]
    for j in range(batch):
        ref, nfe = slowfast_generate(model, prompts[j], mask_id=model.spec.mask_token_id, gen_length=gen,
                                     block_length=block, **ref_params)
        assert out.tokens[j] == ref, f"row {j}"
        assert out.rows[j].nfe == nfe, f"row {j}"
    return out


SETTINGS = [dict(), dict(variant="paper"), dict(explore_steps=2, tau_min=0.1),
            dict(window=3, stability=0.5, tau_high=0.6), dict(variant="paper", window=3, stability=2.0),
            dict(tau_min=0.05, explore_threshold=0.5, tau_high=0.7),
            dict(explore_steps=1, window=2)]                    # K < W: the never-settled fallback


def _id(p):
    return "-".join(f"{k}{v}" for k, v in p.items()) or "code-defaults"


@pytest.mark.parametrize("params", SETTINGS, ids=_id)
@pytest.mark.parametrize("gen,block", [(32, 32), (32, 16)])
@pytest.mark.parametrize("sharpness", [3.0, 8.0])
def test_matches_reference_on_stub_model(params, gen, block, sharpness):
    model = RandomLogitsModel(vocab_size=24, seed=gen + block, sharpness=sharpness)
    _check(model, gen, block, 1, **params)
    _check(model, gen, block, 4, **params)


@pytest.fixture(scope="module")
def tiny_models():
    """Both families: SlowFast runs on LLaDA and (its Dream port) on Dream's shifted logits."""
    return {fam: build_random_model(fam, vocab_size=32, d_model=32, n_layers=2, n_heads=4, mask_token_id=31,
                                    eos_token_id=1, pad_token_id=0, seed=3, dtype=torch.float64).eval()
            for fam in ("llada", "dream")}


@pytest.mark.parametrize("params", SETTINGS[:3], ids=_id)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_matches_reference_on_tiny_models(tiny_models, params, batch, family):
    params = {"tau_min": 0.05, **params}
    _check(tiny_models[family], 24, 24, batch, **params)


@pytest.fixture(scope="module")
def reference_llada64():
    """The shipped llada-reference in float64 with two held-out prompts (copy, repeat)."""
    return shipped_model_and_prompts("llada", ("copy", "repeat"))


@pytest.mark.parametrize("params", [dict(), dict(variant="paper")], ids=_id)
def test_matches_reference_on_llada_reference(reference_llada64, params):
    """On a trained model, where confidences mean something: the paper variant settles a span
    early and its accelerated stage commits many tokens in one forward."""
    model, prompts = reference_llada64
    out = _check(model, 96, 96, 2, prompts=prompts, **params)
    if params:
        phases = [r.phase for r in out.states[0].history]
        assert "explore" in phases and "accelerate" in phases
        assert max(int(r.committed[0].sum()) for r in out.states[0].history if r.phase == "accelerate") >= 2
    assert max(r.nfe for r in out.rows) < 96


def test_swapping_select_tokens_keeps_spans_and_phases():
    """select_tokens: threshold at tau_high is the code variant's own rule (>= 2 over tau, else
    the best), so swapping the slot must change nothing; another threshold must follow the
    reference with the swapped rule, spans and cycles still SlowFast's."""
    model = RandomLogitsModel(vocab_size=24, seed=7, sharpness=8.0)
    own = Decoder(model, _recipe(32, 32, 1)).generate(PROMPTS4[:1], keep_states=True)
    same = _check(model, 32, 32, 1, select={"plugin": "threshold", "threshold": 0.9})
    assert same.tokens == own.tokens
    assert [r.phase for r in same.states[0].history] == [r.phase for r in own.states[0].history]
    other = _check(model, 32, 32, 4, select={"plugin": "threshold", "threshold": 0.5})
    assert other.tokens != own.tokens[:1] * 4


@pytest.mark.parametrize("params", [dict(), dict(variant="paper")], ids=_id)
def test_invariants(params):
    check_invariants(RandomLogitsModel(vocab_size=40, seed=2),
                     {"policy": {"plugin": "slowfast", **params}, "score": "llada", "cache_policy": "none",
                      "generation": {"gen_length": 16, "block_length": 8}})


def test_variant_defaults_and_overrides():
    from dllm_decode.policies.slowfast import Options

    assert (Options().explore_steps, Options().tau_min, Options().tau_high) == (6, 0.3, 0.9)
    paper = Options(variant="paper")
    assert (paper.explore_steps, paper.tau_min, paper.tau_high, paper.min_parallel) == (8, 0.1, 0.85, 1)
    assert Options(variant="paper", tau_min=0.2).tau_min == 0.2
