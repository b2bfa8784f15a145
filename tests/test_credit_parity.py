"""The credit plugin reproduces dInfer's credit decoding token for token and forward for forward at
T = 0 (float64 models) against tests/reference_credit.py, on a stub model, a tiny random LLaDA
and the shipped llada-reference, alone and in a padded batch; the credit changes what is decoded
and a wrong setting in the reference is caught; the plugin keeps every engine invariant."""

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.testing import ParityMismatch, RandomLogitsModel, ReferenceOutput, check_invariants, check_parity
from reference_credit import credit_generate
from shipped import shipped_model_and_prompts

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]
STUB = RandomLogitsModel(vocab_size=24, seed=11, sharpness=4.0)


def _recipe(gen, block, **options):
    return {"choose_span": "llada", "policy": {"plugin": "credit", **options}, "cache_policy": "none",
            "generation": {"gen_length": gen, "block_length": block, "steps": gen, "dtype": "float64"}}


def _ref(**options):
    def ref(model, prompt, recipe):
        g = recipe.generation
        tokens, nfe = credit_generate(model, prompt, mask_id=model.spec.mask_token_id, gen_length=g.gen_length,
                                      block_length=g.block, **options)
        return ReferenceOutput(tokens, nfe)
    return ref


# dInfer's defaults, thresholds at which parallel commits happen on these untrained models, a
# strong credit, no decay, credit off (dInfer's plain threshold decoder), float64 confidences
SETTINGS = [{}, dict(threshold=0.3), dict(threshold=0.2, credit_alpha=2.0, boost_gamma=1.0),
            dict(threshold=0.2, decay_beta=1.0), dict(threshold=0.2, credit_alpha=0.0),
            dict(threshold=0.2, use_float64=True)]


def _id(opts):
    return "-".join(f"{k}{v}" for k, v in opts.items()) or "defaults"


@pytest.mark.parametrize("opts", SETTINGS, ids=_id)
@pytest.mark.parametrize("gen,block", [(16, 8), (24, 24)])
@pytest.mark.parametrize("which", ["stub", "tiny-llada"])
def test_matches_reference(opts, gen, block, which, tiny_llada):
    model = STUB if which == "stub" else tiny_llada
    for batched in (False, True):
        check_parity(model, _recipe(gen, block, **opts), _ref(**opts), PROMPTS4, batched=batched)


def test_credit_changes_the_tokens_and_a_wrong_alpha_is_caught(tiny_llada):
    """Credit really reweights the candidates here (so parity is not that of a plain threshold
    decoder), and a reference with another credit weight disagrees."""
    opts = dict(threshold=0.2, credit_alpha=2.0, boost_gamma=1.0)

    def tokens(**o):
        return Decoder(tiny_llada, recipe_from_dict(_recipe(24, 24, **o))).generate(PROMPTS4).tokens

    assert tokens(**opts) != tokens(**dict(opts, credit_alpha=0.0))
    with pytest.raises(ParityMismatch):
        check_parity(tiny_llada, _recipe(24, 24, **opts), _ref(**dict(opts, credit_alpha=1.0)), PROMPTS4)


def test_below_the_threshold_near_ties_are_committed_together():
    """dInfer's rule: with nothing at the threshold, the best and every confidence within 1e-5 of it
    (Fast-dLLM's rule would commit the best alone)."""
    from dllm_decode.policies.credit import Options, select_tokens
    from dllm_decode.state import Candidates

    conf = torch.tensor([[0.5, 0.5 - 5e-6, 0.49, float("-inf")], [0.95, 0.91, 0.2, 0.899]], dtype=torch.float32)
    cand = Candidates(tokens=torch.zeros(2, 4, dtype=torch.long), confidence=conf, eligible=conf > float("-inf"))
    got = select_tokens(candidates=cand, options=Options())
    assert got.tolist() == [[True, True, False, False], [True, True, False, False]]


def test_matches_reference_on_llada_reference():
    """The shipped llada-reference, float64, held-out copy and case prompts, blocks of 32, dInfer's
    defaults: alone and as a padded batch."""
    model, prompts = shipped_model_and_prompts("llada", ("copy", "case"))
    result = check_parity(model, _recipe(96, 32), _ref(), prompts)
    assert all(row.nfe < 96 for row in result.rows)


@pytest.mark.parametrize("opts", [{}, dict(threshold=0.3, decay_beta=0.5)])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("span", ["llada", "dream", "slowfast"])
def test_invariants(opts, temperature, span):
    check_invariants(RandomLogitsModel(vocab_size=40, seed=2),
                     {"choose_span": span, "policy": {"plugin": "credit", **opts}, "cache_policy": "none",
                      "generation": {"gen_length": 16, "block_length": 8, "steps": 16, "temperature": temperature}})


@pytest.mark.parametrize("cache", [{"plugin": "kv_block", "mode": "dual"}, {"plugin": "dllm_cache"}])
def test_invariants_under_a_cache(tiny_llada, cache):
    check_invariants(tiny_llada, {**_recipe(16, 8, threshold=0.3), "cache_policy": cache})
