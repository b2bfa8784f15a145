"""The localleap plugin reproduces LocalLeap's LLaDA loop token for token and forward for forward
at T = 0 (float64 models) against tests/reference_localleap.py, on a stub model, tiny random
LLaDA and Dream models and the shipped reference models, alone and in a padded batch; the
relaxation near anchors changes what is decoded and a wrong radius in the reference is caught;
the plugin keeps every engine invariant."""

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.models import ComputePlan
from dllm_decode.testing import ParityMismatch, RandomLogitsModel, ReferenceOutput, check_invariants, check_parity
from reference_localleap import localleap_generate
from shipped import shipped_model_and_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]
STUB = RandomLogitsModel(vocab_size=24, seed=11, sharpness=4.0)


def _recipe(gen, block, **options):
    return {"choose_span": "llada", "score": "llada", "select_tokens": {"plugin": "localleap", **options},
            "cache_policy": "none",
            "generation": {"gen_length": gen, "block_length": block, "steps": gen, "dtype": "float64"}}


def _raw(model):
    """The model's own logits: next-token ones for a Dream checkpoint (the reference shifts them)."""
    if getattr(model.spec, "shift_logits", False):
        return lambda x: model(x, plan=ComputePlan(shift=False))
    return lambda x: model(x)


def _ref(**options):
    def ref(model, prompt, recipe):
        g = recipe.generation
        tokens, nfe = localleap_generate(_raw(model), prompt, mask_id=model.spec.mask_token_id,
                                         gen_length=g.gen_length, block_length=g.block,
                                         shift=getattr(model.spec, "shift_logits", False), **options)
        return ReferenceOutput(tokens, nfe)
    return ref


# Per model: the code's defaults (the stub's confidences reach them; the tiny models' stay
# below 0.3); thresholds at which anchors and their neighbours fire; no radius (anchors relax
# only themselves); a radius of one; a radius wider than a block; a relaxed threshold above the
# anchor one; the relaxation off (Fast-dLLM's rule)
STUB_SETTINGS = [{}, dict(threshold=0.95, relaxed_threshold=0.6), dict(threshold=0.95, relaxed_threshold=0.6, radius=0),
                 dict(threshold=0.97, relaxed_threshold=0.5, radius=1),
                 dict(threshold=0.97, relaxed_threshold=0.5, radius=12), dict(threshold=0.8, relaxed_threshold=0.95),
                 dict(threshold=0.9, relaxed_threshold=None)]
TINY_SETTINGS = [{}, dict(threshold=0.17, relaxed_threshold=0.13), dict(threshold=0.17, relaxed_threshold=0.13, radius=0),
                 dict(threshold=0.18, relaxed_threshold=0.1, radius=1),
                 dict(threshold=0.18, relaxed_threshold=0.1, radius=12), dict(threshold=0.15, relaxed_threshold=0.19),
                 dict(threshold=0.16, relaxed_threshold=None)]
CASES = [(which, opts) for which, settings in (("stub", STUB_SETTINGS), ("tiny-llada", TINY_SETTINGS),
                                               ("tiny-dream", TINY_SETTINGS)) for opts in settings]


def _id(case):
    which, opts = case
    return which + "-" + ("-".join(f"{k}{v}" for k, v in opts.items()) or "defaults")


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("gen,block", [(16, 8), (24, 24)])
def test_matches_reference(case, gen, block, tiny_llada, tiny_dream):
    which, opts = case
    model = {"stub": STUB, "tiny-llada": tiny_llada, "tiny-dream": tiny_dream}[which]
    for batched in (False, True):
        check_parity(model, _recipe(gen, block, **opts), _ref(**opts), PROMPTS4, batched=batched)


def _decode(model, recipe):
    out = Decoder(model, recipe_from_dict(recipe)).generate(PROMPTS4)
    return [row.nfe for row in out.rows], out.tokens


def test_the_relaxation_fires_and_a_wrong_radius_is_caught(tiny_llada):
    """Near anchors the relaxed threshold commits more per forward than the plain threshold rule
    (so parity is not that of Fast-dLLM's rule), and a reference with another radius disagrees."""
    opts = dict(threshold=0.17, relaxed_threshold=0.13, radius=2)
    leap_nfe, leap_tokens = _decode(tiny_llada, _recipe(24, 24, **opts))
    plain_nfe, plain_tokens = _decode(tiny_llada, _recipe(24, 24, **dict(opts, relaxed_threshold=None)))
    assert sum(leap_nfe) < sum(plain_nfe) and leap_tokens != plain_tokens
    with pytest.raises(ParityMismatch):
        check_parity(tiny_llada, _recipe(24, 24, **opts), _ref(**dict(opts, radius=1)), PROMPTS4)


def test_the_rule_on_hand_made_confidences():
    """Row 0: an anchor at column 2 (0.95) relaxes columns 0..4 with radius 2: 0.8 at column 4 is
    in, 0.8 at column 5 is not. Row 1: no anchor, so nothing but the best (0.6) passes 0.9.
    Row 2: the relaxed threshold holds up to the anchor's own column only with radius 0."""
    from dllm_decode.policies.localleap import Options, select_tokens
    from dllm_decode.state import Candidates

    ninf = float("-inf")
    conf = torch.tensor([[0.1, 0.7, 0.95, ninf, 0.8, 0.8, 0.2],
                         [0.6, 0.8, 0.5, 0.3, ninf, 0.85, 0.2],
                         [0.92, 0.8, ninf, ninf, ninf, ninf, 0.91]], dtype=torch.float64)
    cand = Candidates(tokens=torch.zeros(3, 7, dtype=torch.long), confidence=conf, eligible=conf > ninf)
    got = select_tokens(candidates=cand, options=Options(threshold=0.9, relaxed_threshold=0.75, radius=2))
    assert got.tolist() == [[False, False, True, False, True, False, False],
                            [False, False, False, False, False, True, False],
                            [True, True, False, False, False, False, True]]
    got0 = select_tokens(candidates=cand, options=Options(threshold=0.9, relaxed_threshold=0.75, radius=0))
    assert got0[2].tolist() == [True, False, False, False, False, False, True]
    # a confidence a hair under the threshold is not rounded up to it
    just = torch.tensor([[0.95, ninf, 0.8999999999, ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf, 0.89999999]],
                        dtype=torch.float64)
    cand = Candidates(tokens=torch.zeros(1, 12, dtype=torch.long), confidence=just, eligible=just > ninf)
    assert select_tokens(candidates=cand, options=Options(relaxed_threshold=0.9, radius=1))[0, 11].item() is False


SHIPPED = [{}, dict(threshold=0.99999, relaxed_threshold=0.5)]


@pytest.mark.parametrize("opts", SHIPPED, ids=lambda o: _id(("shipped", o)))
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_matches_reference_on_the_shipped_models(family, opts):
    """The shipped llada-reference and dream-reference (the latter's logits shifted as Dream's
    samplers shift them), float64, held-out case / add / listops prompts, blocks of 32, the code's
    defaults and a setting with many relaxed commits: alone and as a padded batch. The relaxation
    changes the forwards against Fast-dLLM's plain rule here."""
    model, prompts = shipped_model_and_prompts(family, ("case", "add", "listops"))
    result = check_parity(model, _recipe(96, 32, **opts), _ref(**opts), prompts)
    plain = Decoder(model, recipe_from_dict({**_recipe(96, 32, **dict(opts, relaxed_threshold=None)),
                                             "generation": {**_recipe(96, 32)["generation"], "batch_size": 3}}))
    assert [r.nfe for r in result.rows] != [r.nfe for r in plain.generate(prompts).rows]


@pytest.mark.parametrize("opts", [{}, dict(threshold=0.3, relaxed_threshold=0.1, radius=3)])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("span", ["llada", "dream", "slowfast"])
def test_invariants(opts, temperature, span):
    check_invariants(RandomLogitsModel(vocab_size=40, seed=2),
                     {"choose_span": span, "score": "llada", "select_tokens": {"plugin": "localleap", **opts},
                      "cache_policy": "none",
                      "generation": {"gen_length": 16, "block_length": 8, "steps": 16, "temperature": temperature}})


@pytest.mark.parametrize("cache", [{"plugin": "kv_block", "mode": "dual"}, {"plugin": "dllm_cache"}])
def test_invariants_under_a_cache(tiny_llada, cache):
    check_invariants(tiny_llada, {**_recipe(16, 8, threshold=0.3, relaxed_threshold=0.1), "cache_policy": cache})
