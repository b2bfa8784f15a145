"""The klass plugin reproduces KLASS's LLaDA and Dream samplers token for token and forward for
forward at T = 0 (float64) against tests/reference_klass.py, on a stub model, tiny random LLaDA
and Dream models and the shipped reference models, alone and in a padded batch; both the
stability rule and the fallback fire; a wrong setting in the reference is caught; and the plugin
keeps every engine invariant."""

import pytest
import torch

from dllm_decode.models import ComputePlan
from dllm_decode.testing import ParityMismatch, RandomLogitsModel, ReferenceOutput, check_invariants, check_parity
from reference_klass import klass_dream_generate, klass_llada_generate
from shipped import shipped_model_and_prompts

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]
STUB = RandomLogitsModel(vocab_size=24, seed=11, sharpness=4.0)


def _recipe(gen, block, steps, **options):
    return {"choose_span": "llada", "policy": {"plugin": "klass", **options}, "cache_policy": "none",
            "generation": {"gen_length": gen, "block_length": block, "steps": steps, "dtype": "float64"}}


def _llada_ref(**options):
    def ref(model, prompt, recipe):
        g = recipe.generation
        tokens, nfe = klass_llada_generate(model, prompt, mask_id=model.spec.mask_token_id, gen_length=g.gen_length,
                                           block_length=g.block, steps=g.total_steps, **options)
        return ReferenceOutput(tokens, nfe)
    return ref


def _raw(model):
    """The model's own logits: next-token ones for a Dream checkpoint (the reference shifts them)."""
    if getattr(model.spec, "shift_logits", False):
        return lambda x: model(x, plan=ComputePlan(shift=False))
    return lambda x: model(x)


def _dream_ref(**options):
    def ref(model, prompt, recipe):
        tokens, nfe = klass_dream_generate(_raw(model), prompt, mask_id=model.spec.mask_token_id,
                                           gen_length=recipe.generation.gen_length,
                                           shift=getattr(model.spec, "shift_logits", False), **options)
        return ReferenceOutput(tokens, nfe)
    return ref


# (gen, block, steps, options): the official setting steps == gen_length with KLASS's defaults,
# thresholds loose enough for the stability rule to fire on these untrained models (LOOSE), longer
# and shorter histories, the strategies, and a schedule of two tokens per forward (which can
# outlast a block's steps: the documented one-token tail)
LOOSE = dict(conf_threshold=0.1, kl_threshold=0.5)
LLADA = [(16, 8, 16, {}),
         (16, 8, 16, LOOSE),
         (16, 8, 16, dict(conf_threshold=0.3, kl_threshold=0.05)),
         (24, 8, 24, dict(LOOSE, history_length=3)),
         (16, 16, 16, dict(LOOSE, history_length=1)),
         (16, 8, 16, dict(LOOSE, unmask_strategy="max_conf")),
         (16, 8, 16, dict(LOOSE, unmask_strategy="min_kl")),
         (16, 8, 8, LOOSE)]


def _id(case):
    gen, block, steps, opts = case
    return f"g{gen}b{block}s{steps}-" + "-".join(f"{k}{v}" for k, v in opts.items())


@pytest.mark.parametrize("case", LLADA, ids=_id)
@pytest.mark.parametrize("which", ["stub", "tiny-llada"])
def test_llada_variant_matches_reference(case, which, tiny_llada):
    model = STUB if which == "stub" else tiny_llada
    gen, block, steps, opts = case
    for batched in (False, True):
        check_parity(model, _recipe(gen, block, steps, **opts), _llada_ref(**opts), PROMPTS4, batched=batched)


DREAM = [{}, LOOSE, dict(LOOSE, history_length=3), dict(LOOSE, unmask_strategy="max_conf"),
         dict(top_p=0.5), dict(top_k=2)]      # the filters only rank the fallback


@pytest.mark.parametrize("opts", DREAM, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("which", ["stub", "tiny-dream"])
def test_dream_variant_matches_reference(opts, which, tiny_dream):
    model = STUB if which == "stub" else tiny_dream
    recipe = {"choose_span": "dream", "policy": {"plugin": "klass", "variant": "dream", **opts},
              "cache_policy": "none", "generation": {"gen_length": 16, "steps": 16, "dtype": "float64"}}
    for batched in (False, True):
        check_parity(model, recipe, _dream_ref(**opts), PROMPTS4, batched=batched)


def _commits_per_step(model, recipe, prompt):
    from dllm_decode.config import recipe_from_dict
    from dllm_decode.engine import Decoder

    out = Decoder(model, recipe_from_dict(recipe)).generate([prompt], keep_states=True)
    return [int(r.committed.sum()) for r in out.states[0].history]


def test_both_rules_fire_and_a_wrong_threshold_is_caught(tiny_llada):
    """On this setting some forwards commit several ready positions and others fall back to the
    schedule's single token; a reference with another KL threshold disagrees."""
    per_step = _commits_per_step(tiny_llada, _recipe(16, 8, 16, **LOOSE), PROMPTS4[0])
    assert max(per_step) > 1 and per_step.count(1) > 1 and len(per_step) < 16
    with pytest.raises(ParityMismatch):
        check_parity(tiny_llada, _recipe(16, 8, 16, **LOOSE), _llada_ref(conf_threshold=0.1, kl_threshold=0.05),
                     PROMPTS4)


def test_the_step_gating_and_the_comparison_differ_between_variants(tiny_llada):
    """The LLaDA variant forbids readiness at a block's first forwards and tests conf > c; the
    Dream variant neither: a reference of the other variant is caught."""
    with pytest.raises(ParityMismatch):      # two blocks: the second starts with a carried history
        check_parity(tiny_llada, _recipe(16, 8, 16, variant="dream", **LOOSE), _llada_ref(**LOOSE), PROMPTS4)


def test_llada_variant_matches_reference_on_llada_reference():
    """The shipped llada-reference, float64, held-out copy and case prompts, blocks of 32, KLASS's
    defaults (conf 0.9, KL 0.01, history 2): alone and as a padded batch."""
    model, prompts = shipped_model_and_prompts("llada", ("copy", "case"))
    result = check_parity(model, _recipe(96, 32, 96), _llada_ref(), prompts)
    assert all(row.nfe < 96 for row in result.rows)          # the stability rule fired


def test_dream_variant_matches_reference_on_dream_reference():
    """The shipped dream-reference, float64, held-out copy and case prompts, one block (Dream has
    none), the Dream variant's defaults."""
    model, prompts = shipped_model_and_prompts("dream", ("copy", "case"))
    recipe = {"choose_span": "llada", "policy": {"plugin": "klass", "variant": "dream"}, "cache_policy": "none",
              "generation": {"gen_length": 96, "steps": 96, "dtype": "float64"}}
    result = check_parity(model, recipe, _dream_ref(), prompts)
    assert all(row.nfe < 96 for row in result.rows)


@pytest.mark.parametrize("opts", [dict(), dict(variant="dream", top_p=0.9), dict(LOOSE, unmask_strategy="random")])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_invariants(opts, temperature):
    check_invariants(RandomLogitsModel(vocab_size=40, seed=2),
                     {"choose_span": "llada", "policy": {"plugin": "klass", **opts}, "cache_policy": "none",
                      "generation": {"gen_length": 16, "block_length": 8, "steps": 16, "temperature": temperature}})


def test_a_schedule_longer_than_the_block_is_refused():
    from dllm_decode.errors import RecipeError

    with pytest.raises(RecipeError, match="klass"):
        check_invariants(STUB, _recipe(16, 8, 32))


@pytest.mark.parametrize("cache", [{"plugin": "kv_block", "mode": "dual"}, {"plugin": "dllm_cache"}])
def test_invariants_under_a_cache(tiny_llada, cache):
    """A cached forward queries only part of the canvas: the positions it leaves out keep their
    history, and every invariant holds."""
    check_invariants(tiny_llada, {**_recipe(16, 8, 16, **LOOSE), "cache_policy": cache})
