"""The dkv_cache plugin reproduces dKV-Cache-Decode's LLaDA and Dream loops (tests/reference_dkv.py,
re-derived from horseee/dKV-Cache) token for token and forward for forward at T = 0 (float64),
through the engine, each prompt alone and in a left-padded batch, on tiny random LLaDA / Dream
models and the shipped reference models; a refresh every step gives exactly the tokens of no
cache, the cache changes tokens otherwise, a reference with another refresh interval or without
the Dream code's first cached set is caught, and every recipe composition keeps the invariants."""

import pytest

import reference_dkv
from dllm_decode.testing import ParityMismatch, ReferenceOutput, check_invariants, check_parity
from reference_dkv import dkv_dream_generate, dkv_llada_generate
from reference_forward import weights
from batch_feeds import decodes_as_alone, narrow_after_a_stop
from shipped import shipped_model_and_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


def _llada_recipe(gen, block, steps, interval):
    return {"policy": "llada", "cache_policy": {"plugin": "dkv_cache", "refresh_interval": interval},
            "generation": {"gen_length": gen, "block_length": block, "steps": steps, "dtype": "float64"}}


def _dream_recipe(gen, steps, interval, alg="entropy"):
    return {"policy": {"plugin": "dream", "alg": alg},
            "cache_policy": {"plugin": "dkv_cache", "refresh_interval": interval},
            "generation": {"gen_length": gen, "steps": steps, "dtype": "float64"}}


def _llada_ref(interval):
    def ref(model, prompt, recipe):
        g = recipe.generation
        return ReferenceOutput(*dkv_llada_generate(weights(model), prompt, mask_id=model.spec.mask_token_id,
                                                   gen_length=g.gen_length, block_length=g.block,
                                                   steps=g.total_steps, cache_reloading_step=interval))
    return ref


def _dream_ref(interval, alg="entropy"):
    def ref(model, prompt, recipe):
        g = recipe.generation
        return ReferenceOutput(*dkv_dream_generate(weights(model), prompt, mask_id=model.spec.mask_token_id,
                                                   gen_length=g.gen_length, steps=g.total_steps,
                                                   cache_steps=interval, alg=alg))
    return ref


# (gen, block, steps, refresh interval): the second step of a block full, refreshes inside blocks,
# one block, two tokens per step
LLADA = [(24, 8, 24, 2), (24, 8, 24, 3), (24, 24, 24, 8), (24, 8, 12, 3), (32, 16, 16, 4)]


@pytest.mark.parametrize("case", LLADA, ids=lambda c: "g{}b{}s{}r{}".format(*c))
def test_llada_matches_reference(case, tiny_pair):
    gen, block, steps, interval = case
    for batched in (False, True):
        check_parity(tiny_pair["llada"], _llada_recipe(gen, block, steps, interval), _llada_ref(interval), PROMPTS4,
                     batched=batched)


# (gen, steps, refresh interval, alg): fewer steps than tokens make the first step commit, so the
# Dream code's first cached set (the last column recomputed once more) shows
DREAM = [(24, 24, 3, "entropy"), (24, 12, 3, "entropy"), (24, 12, 8, "maskgit_plus"), (24, 8, 4, "topk_margin"),
         (16, 16, 2, "maskgit_plus")]


@pytest.mark.parametrize("case", DREAM, ids=lambda c: "g{}s{}r{}-{}".format(*c))
def test_dream_matches_reference(case, tiny_pair):
    gen, steps, interval, alg = case
    for batched in (False, True):
        check_parity(tiny_pair["dream"], _dream_recipe(gen, steps, interval, alg), _dream_ref(interval, alg), PROMPTS4,
                     batched=batched)


def test_llada_matches_reference_on_llada_reference():
    """The shipped llada-reference, float64, held-out copy and case prompts, blocks of 32, a
    refresh every 4 steps: alone and as a padded batch."""
    model, prompts = shipped_model_and_prompts("llada", ("copy", "case"))
    for batched in (False, True):
        check_parity(model, _llada_recipe(64, 32, 64, 4), _llada_ref(4), prompts, batched=batched)


def test_dream_matches_reference_on_dream_reference():
    """The shipped dream-reference, float64, held-out copy and case prompts, two tokens per step
    on average, a refresh every 4 steps: alone and as a padded batch."""
    model, prompts = shipped_model_and_prompts("dream", ("copy", "case"))
    for batched in (False, True):
        check_parity(model, _dream_recipe(64, 32, 4), _dream_ref(4), prompts, batched=batched)


def test_refresh_every_step_is_exact_and_caching_changes_tokens(tiny_pair):
    from dllm_decode.config import recipe_from_dict
    from dllm_decode.engine import Decoder

    def tokens(model, recipe):
        recipe["generation"]["batch_size"] = 4
        return Decoder(model, recipe_from_dict(recipe)).generate(PROMPTS4).tokens

    for family, recipe in (("llada", lambda r: _llada_recipe(24, 8, 24, r)), ("dream", lambda r: _dream_recipe(24, 12, r))):
        none = tokens(tiny_pair[family], {**recipe(1), "cache_policy": "none"})
        assert tokens(tiny_pair[family], recipe(1)) == none, family
        assert tokens(tiny_pair[family], recipe(4)) != none, family


def test_a_wrong_reference_is_caught(tiny_pair, monkeypatch):
    """Another refresh interval in the reference, and (Dream) a first cached set built like the
    later ones, both disagree with the plugin."""
    with pytest.raises(ParityMismatch):
        check_parity(tiny_pair["llada"], _llada_recipe(24, 24, 24, 3), _llada_ref(4), PROMPTS4)
    with pytest.raises(ParityMismatch):
        check_parity(tiny_pair["dream"], _dream_recipe(24, 12, 3), _dream_ref(4), PROMPTS4)
    shift_un = reference_dkv._shift_un
    monkeypatch.setattr(reference_dkv, "_shift_un", lambda nonmask, wrap: shift_un(nonmask, 0))
    with pytest.raises(ParityMismatch):
        check_parity(tiny_pair["dream"], _dream_recipe(24, 12, 8), _dream_ref(8), PROMPTS4)


@pytest.mark.parametrize("family,threshold", [("llada", 0.12), ("dream", 0.2)])
def test_rows_refreshing_apart_keep_the_invariants(family, threshold, tiny_pair):
    """Threshold decoding ends blocks at different steps per row, so one forward holds rows that
    refresh and rows that reuse, fed as subsets of different sizes: every row still decodes what
    it decodes alone, under guidance too."""
    from dllm_decode.config import recipe_from_dict
    from dllm_decode.engine import Decoder

    recipe = {"choose_span": "llada", "score": "llada", "select_tokens": {"plugin": "threshold", "threshold": threshold},
              "cache_policy": {"plugin": "dkv_cache", "refresh_interval": 3},
              "generation": {"gen_length": 24, "block_length": 8, "steps": 24, "dtype": "float64"}}
    check_invariants(tiny_pair[family], recipe, PROMPTS4)
    state = Decoder(tiny_pair[family], recipe_from_dict({**recipe, "generation": {**recipe["generation"], "batch_size": 4}})
                    ).generate(PROMPTS4, keep_states=True).states[0]
    assert any(len(set(r.span[:, 0].tolist())) > 1 for r in state.history), "rows never sat in different blocks"
    recipe["generation"]["cfg_scale"] = 1.0
    check_invariants(tiny_pair[family], recipe, PROMPTS4)


def test_a_finished_row_does_not_widen_the_subset():
    """Rows stopped at EOS under the threshold rule sit in different blocks: a finished row neither
    refreshes nor queries (its span moved as it finished, which made it refresh the whole canvas in
    the rows left's steps), and every row decodes as it does alone."""
    from dllm_decode.config import load_recipe

    model, prompts = shipped_model_and_prompts("llada", ("copy", "repeat", "case", "repeat"), seed=3)
    recipe = load_recipe("dkv-cache", ["generation.gen_length=64", "generation.steps=64", "generation.eos.stop=true",
                                       f"generation.batch_size={len(prompts)}", "generation.dtype=float64",
                                       "select_tokens={plugin: threshold, threshold: 0.9}"])
    assert narrow_after_a_stop(model, recipe, prompts) >= 1
    assert decodes_as_alone(model, recipe, prompts)
