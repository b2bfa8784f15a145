"""The d2cache plugin reproduces d2Cache over vanilla decoding (tests/reference_d2cache.py,
re-derived from Kamichanw/d2Cache) token for token and forward for forward at T = 0 (float64),
through the engine, each prompt alone and in a left-padded batch, on tiny random LLaDA / Dream
models and the shipped reference models; the subsets really are partial and change tokens, a
reference with another setting is caught, and every composition keeps the invariants."""

import pytest

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import RecipeError
from dllm_decode.models import ComputePlan
from dllm_decode.plugins import get_plugin_manager
from dllm_decode.policy import resolve
from dllm_decode.testing import ParityMismatch, ReferenceOutput, check_invariants, check_parity
from batch_feeds import decodes_as_alone, what_finished_rows_fed
from reference_d2cache import d2cache_generate
from reference_forward import weights
from shipped import shipped_model_and_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


def _recipe(gen, block, **options):
    return {"choose_span": "llada", "policy": {"plugin": "d2cache", **options},
            "generation": {"gen_length": gen, "block_length": block, "steps": gen, "dtype": "float64"}}


def _ref(**options):
    def ref(model, prompt, recipe):
        g = recipe.generation
        return ReferenceOutput(*d2cache_generate(weights(model), prompt, mask_id=model.spec.mask_token_id,
                                                 gen_length=g.gen_length, block_length=g.block,
                                                 shift=model.spec.shift_logits, **options))
    return ref


# (gen, block, options): a small current_k so the ranking matters, d2Cache's defaults (every mask
# chosen at these lengths), inflation, plain confidence order, blocks no smaller than current_k
# (the code's semi-autoregressive setting), Dream's top-p and the other confidences
SMALL = dict(current_k=4, sigma=3.0, rollout_p=0.3)
CASES = [(24, 24, SMALL),
         (16, 16, {}),
         (24, 24, dict(current_k=6, inflate_w=3, rollout_p=0.2, decode_sigma=None)),
         (24, 8, dict(SMALL, inflate_w=4)),
         (24, 24, dict(SMALL, alg="entropy", top_p=0.9)),
         (24, 12, dict(SMALL, alg="topk_margin", num_transfer_tokens=2))]


def _id(case):
    gen, block, opts = case
    return f"g{gen}b{block}-" + ("-".join(f"{k}{v}" for k, v in opts.items()) or "defaults")


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_matches_reference(family, case, tiny_pair):
    gen, block, opts = case
    for batched in (False, True):
        check_parity(tiny_pair[family], _recipe(gen, block, **opts), _ref(**opts), PROMPTS4, batched=batched)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_matches_reference_on_the_shipped_model(family):
    """The shipped reference models, float64, held-out copy and case prompts, one block of 64,
    current_k 16: alone and as a padded batch."""
    model, prompts = shipped_model_and_prompts(family, ("copy", "case"))
    opts = dict(current_k=16)
    for batched in (False, True):
        check_parity(model, _recipe(64, 64, **opts), _ref(**opts), prompts, batched=batched)


def test_subsets_are_partial_and_change_tokens(tiny_pair, monkeypatch):
    """After the first forward every forward feeds a minority of the canvas, and the reused K/V
    change tokens against the same sampler without a cache."""
    widths = []
    subset = ComputePlan.subset.__func__

    def spy(cls, positions, **kw):
        widths.append(int(positions.sum(1).max()))
        return subset(cls, positions, **kw)

    monkeypatch.setattr(ComputePlan, "subset", classmethod(spy))
    for family in ("llada", "dream"):
        recipe = _recipe(24, 24, **SMALL)
        recipe["generation"]["batch_size"] = 4
        cached = Decoder(tiny_pair[family], recipe_from_dict(recipe)).generate(PROMPTS4).tokens
        none = Decoder(tiny_pair[family], recipe_from_dict({**recipe, "cache_policy": "none"})).generate(PROMPTS4).tokens
        assert cached != none, family
    assert widths and max(widths) < 30 // 2


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_wrong_reference_is_caught(family, tiny_pair):
    for wrong in (dict(rollout_p=0.1), dict(current_k=5), dict(inflate_w=2), dict(decode_sigma=5.0)):
        with pytest.raises(ParityMismatch):
            check_parity(tiny_pair[family], _recipe(24, 24, **SMALL), _ref(**{**SMALL, **wrong}), PROMPTS4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_invariants(family, tiny_pair):
    """Small blocks (where the span, not the finished block, places the search window) and
    several tokens per step; the certainty-prior selection and the score also work with any
    other cache or none."""
    check_invariants(tiny_pair[family], _recipe(16, 4, current_k=6, inflate_w=2, num_transfer_tokens=2), PROMPTS4)
    check_invariants(tiny_pair[family], {**_recipe(16, 8), "cache_policy": {"plugin": "kv_block"}}, PROMPTS4)


def test_recipe_checks():
    with pytest.raises(RecipeError, match="score"):
        resolve(recipe_from_dict({"policy": "llada", "cache_policy": "d2cache"}), get_plugin_manager())
    with pytest.raises(RecipeError, match="cfg_scale"):
        resolve(recipe_from_dict({**_recipe(16, 16), "generation": {"gen_length": 16, "cfg_scale": 1.0}}),
                get_plugin_manager())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_finished_row_feeds_nothing(family):
    """Rows stopped at EOS while others decode: a finished row recomputes neither its last tokens
    nor a rollout nucleus, and every row decodes as it does alone."""
    from dllm_decode.config import load_recipe

    model, prompts = shipped_model_and_prompts(family, ("copy", "repeat", "case", "repeat"), seed=3)
    recipe = load_recipe("d2cache" if family == "llada" else "dream-d2cache",
                         ["generation.gen_length=64", "generation.block_length=64", "generation.steps=64",
                          "generation.eos.stop=true", f"generation.batch_size={len(prompts)}",
                          "generation.dtype=float64"])
    steps, fed, _ = what_finished_rows_fed(model, recipe, prompts)
    assert steps >= 1, "no row finished before the others"
    assert fed == 0
    assert decodes_as_alone(model, recipe, prompts)
