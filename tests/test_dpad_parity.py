"""The dpad plugin reproduces DPad's suffix dropout (Crys-Chen/DPad ``llada/generate_dropout.py``
and the Dream port ``dream/model/generation_utils_block.py``) token for token and forward for
forward at T = 0 (float64) against tests/reference_dpad.py, through the engine, alone and in a
left-padded batch: both samplers, LLaDA's schedule and the threshold rule, with no cache and with
the prefix / dual KV cache, on tiny random LLaDA and Dream models and on the shipped reference
models. The dropout really narrows the forward, a reference with another setting is caught, and
the plugin keeps every engine invariant."""

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.testing import ParityMismatch, ReferenceOutput, check_invariants, check_parity
from reference_dpad import dpad_generate
from batch_feeds import decodes_as_alone, narrow_after_a_stop
from shipped import shipped_model_and_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


def _recipe(gen, block, steps, dpad, threshold=None, family="llada"):
    if family == "dream":
        first = dpad.get("kv_cache", "none") != "none"       # Fast-dLLM's cached Dream sampler
        slots = {"policy": {"plugin": "dream", "alg": "confidence_threshold", "threshold": threshold,
                            "first_token": first}}
    else:
        select = "llada" if threshold is None else {"plugin": "threshold", "threshold": threshold}
        slots = {"choose_span": "llada", "score": "llada", "select_tokens": select}
    return {**slots, "cache_policy": {"plugin": "dpad", **dpad},
            "generation": {"gen_length": gen, "block_length": block, "steps": steps, "dtype": "float64"}}


def _ref(threshold=None, family=None, **dpad):
    def ref(model, prompt, recipe):
        g = recipe.generation
        tokens, nfe = dpad_generate(model, prompt, gen_length=g.gen_length, block_length=g.block,
                                    steps=g.total_steps, threshold=threshold, seed=g.seed,
                                    sampler_family=family, **dpad)
        return ReferenceOutput(tokens, nfe)
    return ref


GAUSS = dict(window=16, sigma=2.0, scale=2.0)
UNIFORM = dict(sampler="uniform", window=8, preserved=3)
# (threshold, dpad options): the schedule and the threshold rule, both samplers, the sliding
# window (uniform, preserved >= window) and each cache
LLADA = [(None, GAUSS), (0.3, GAUSS), (None, UNIFORM), (0.3, dict(UNIFORM, preserved=8)),
         (0.3, dict(GAUSS, kv_cache="prefix")), (0.3, dict(GAUSS, kv_cache="dual")),
         (None, dict(UNIFORM, kv_cache="prefix")), (None, dict(GAUSS, sigma=4.0, kv_cache="dual"))]


def _id(case):
    thr, opts = case
    return f"thr{thr}-" + "-".join(f"{k}{v}" for k, v in opts.items())


@pytest.mark.parametrize("case", LLADA, ids=_id)
def test_llada_matches_reference(case, tiny_llada):
    threshold, opts = case
    for batched in (False, True):
        check_parity(tiny_llada, _recipe(24, 8, 24, opts, threshold), _ref(threshold, **opts), PROMPTS4,
                     batched=batched)


@pytest.mark.parametrize("opts", [GAUSS, UNIFORM, dict(GAUSS, kv_cache="prefix"), dict(GAUSS, kv_cache="dual")],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_dream_matches_reference(opts, tiny_dream):
    recipe = _recipe(24, 8, 24, opts, 0.3, family="dream")
    for batched in (False, True):
        check_parity(tiny_dream, recipe, _ref(0.3, family="dream", **opts), PROMPTS4, batched=batched)


def test_the_dropout_narrows_the_forward_and_a_wrong_setting_is_caught(tiny_llada):
    """Most of the suffix is left out of the forward; a reference drawing with another sigma, or
    keeping the whole suffix, disagrees; keeping the whole suffix is LLaDA's plain loop."""
    long = _recipe(48, 8, 48, dict(window=40, sigma=4.0))
    flops = [Decoder(tiny_llada, recipe_from_dict(r)).generate([PROMPTS4[0]], keep_states=True).states[0].counters["flops"]
             for r in (long, {**long, "cache_policy": "none"})]
    assert flops[0] < 0.75 * flops[1]
    recipe = _recipe(24, 8, 24, GAUSS)
    plain = Decoder(tiny_llada, recipe_from_dict({**recipe, "cache_policy": "none"})).generate(PROMPTS4)
    with pytest.raises(ParityMismatch):
        check_parity(tiny_llada, recipe, _ref(**dict(GAUSS, sigma=1.0)), PROMPTS4)
    keep_all = dict(sampler="uniform", window=8, preserved=24)
    assert Decoder(tiny_llada, recipe_from_dict(_recipe(24, 8, 24, keep_all))).generate(PROMPTS4).rows[0].tokens \
        == plain.rows[0].tokens
    with pytest.raises(ParityMismatch):
        check_parity(tiny_llada, recipe, _ref(**keep_all), PROMPTS4)


def test_llada_matches_reference_on_llada_reference():
    """The shipped llada-reference, float64, held-out copy and case prompts, blocks of 32,
    threshold 0.9 (the +Parallel+DPad setting), the Gaussian sampler over a 64-position window;
    with no cache and with the prefix cache."""
    model, prompts = shipped_model_and_prompts("llada", ("copy", "case"))
    opts = dict(window=64, sigma=4.0, scale=2.0)
    for cache in ("none", "prefix"):
        o = dict(opts, kv_cache=cache)
        check_parity(model, _recipe(96, 32, 96, o, 0.9), _ref(0.9, **o), prompts)


def test_dream_matches_reference_on_dream_reference():
    """The shipped dream-reference, float64, blocks of 32 (DPad needs a suffix), Dream's
    confidence_threshold 0.9, the Gaussian sampler."""
    model, prompts = shipped_model_and_prompts("dream", ("copy", "case"))
    opts = dict(window=64, sigma=4.0, scale=2.0)
    check_parity(model, _recipe(96, 32, 96, opts, 0.9, family="dream"), _ref(0.9, family="dream", **opts), prompts)


def test_a_window_longer_than_the_generation(tiny_llada):
    """The code asserts window <= gen_length; here a longer window only spreads the keep
    probabilities wider, and its first positions are the ones used."""
    opts = dict(window=40, sigma=2.0)
    check_parity(tiny_llada, _recipe(24, 8, 24, opts, 0.3), _ref(0.3, **opts), PROMPTS4)


@pytest.mark.parametrize("opts", [GAUSS, dict(UNIFORM, kv_cache="prefix"), dict(GAUSS, kv_cache="dual")],
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_invariants(tiny_llada, opts, temperature):
    recipe = _recipe(16, 4, 16, dict(opts, window=8), 0.5)
    recipe["generation"].update(temperature=temperature, eos={"stop": True})
    check_invariants(tiny_llada, recipe)
    check_invariants(tiny_llada, {**recipe, "select_tokens": "llada"})


def test_a_finished_row_does_not_widen_the_feed():
    """The shipped recipe stops rows at EOS. A finished row keeps its prompt alone: the rows left
    keep their suffix dropout (before, the set a row drew as it finished was the whole canvas, and
    every later step fed all of it), and every row decodes as it does alone."""
    from dllm_decode.config import load_recipe

    model, prompts = shipped_model_and_prompts("llada", ("copy", "repeat", "case", "repeat"), seed=3)
    recipe = load_recipe("dpad", ["generation.gen_length=128", f"generation.batch_size={len(prompts)}",
                                  "generation.dtype=float64"])
    assert narrow_after_a_stop(model, recipe, prompts) >= 3
    assert decodes_as_alone(model, recipe, prompts)
