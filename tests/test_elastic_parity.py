"""The elastic_cache plugin reproduces Elastic-Cache (VILA-Lab/Elastic-Cache ``llada/generate.py``
with ``llada/model/modeling_llada.py``, and the Dream port) token for token, forward for forward
and layer refresh for layer refresh at T = 0 (float64) against tests/reference_elastic.py,
through the engine, alone and in a left-padded batch, on tiny random LLaDA and Dream models and
on the shipped reference models; the drift test really switches rows at different layers; the
answer up to the first EOS matches with the EOS rule on; a wrong gamma in the reference is
caught; and the plugin keeps every engine invariant."""

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.models import build_random_model
from dllm_decode.testing import ParityMismatch, ReferenceOutput, check_invariants, check_parity
from batch_feeds import decodes_as_alone, what_finished_rows_fed
from reference_elastic import elastic_generate
from shipped import shipped_model_and_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


@pytest.fixture(scope="module")
def tiny_dream():
    return build_random_model("dream", vocab_size=32, d_model=32, n_layers=3, n_heads=4, mask_token_id=31,
                              eos_token_id=1, pad_token_id=0, seed=4, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def tiny_llada3():
    """Three layers, so that a switch can happen before the last one."""
    return build_random_model("llada", vocab_size=32, d_model=32, n_layers=3, n_heads=4, mask_token_id=31,
                              eos_token_id=1, pad_token_id=0, seed=3, dtype=torch.float64).eval()


def _recipe(gen, threshold, eos="ban", **opts):
    eos_opts = {"ban": True} if eos == "ban" else {"stop": True}
    return {"choose_span": {"plugin": "elastic_cache", **opts}, "score": "llada",
            "select_tokens": {"plugin": "threshold", "threshold": threshold},
            "cache_policy": {"plugin": "elastic_cache", **opts},
            "generation": {"gen_length": gen, "steps": gen, "dtype": "float64", "eos": eos_opts}}


def _ref(threshold, eos="ban", recomputed=None, **opts):
    def ref(model, prompt, recipe):
        ids = recipe.generation.eos.ids or [model.spec.eos_token_id]
        tokens, nfe, layers = elastic_generate(model, prompt, gen_length=recipe.generation.gen_length,
                                               threshold=threshold, eos_ids=ids if eos != "ban" else (),
                                               banned=ids if eos == "ban" else (), **opts)
        if recomputed is not None:
            recomputed.append(layers)
        return ReferenceOutput(tokens, nfe)
    return ref


# (threshold, options): the code's defaults with a window shorter than the generation, gammas
# that never / sometimes / always switch, more tracked tokens, and no block caching
CASES = [(0.9, dict(window_length=4)), (0.3, dict(window_length=4, gamma=0.99)),
         (0.3, dict(window_length=6, gamma=0.999, track_num=2)), (0.3, dict(window_length=4, gamma=1.0)),
         (0.5, dict(window_length=4, gamma=0.0)), (0.3, dict(window_length=4, gamma=0.99, block_caching=False))]


def _id(case):
    thr, opts = case
    return f"thr{thr}-" + "-".join(f"{k}{v}" for k, v in opts.items())


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_matches_reference(case, family, tiny_llada3, tiny_dream):
    model = tiny_llada3 if family == "llada" else tiny_dream
    threshold, opts = case
    for batched in (False, True):
        check_parity(model, _recipe(16, threshold, **opts), _ref(threshold, **opts), PROMPTS4, batched=batched)


def test_rows_switch_at_their_own_layers_and_a_wrong_gamma_is_caught(tiny_llada3):
    """At gamma 0.99 rows switch to a full recompute at different layers and forwards, and the
    engine's count of layers recomputed in full equals the reference's, row by row; a reference
    with another gamma disagrees."""
    opts = dict(window_length=4, gamma=0.99)
    counts: list[int] = []
    out = Decoder(tiny_llada3, recipe_from_dict({**_recipe(16, 0.3, **opts),
                                                 "generation": {**_recipe(16, 0.3)["generation"], "batch_size": 4}})
                  ).generate(PROMPTS4, keep_states=True)
    engine = out.states[0].counters["elastic_full_layers"]
    check_parity(tiny_llada3, _recipe(16, 0.3, **opts), _ref(0.3, recomputed=counts, **opts), PROMPTS4)
    assert engine == sum(counts)
    n_forwards = sum(r.nfe for r in out.rows)
    assert 3 * 4 < engine < 3 * n_forwards          # more than the first forwards, less than all
    with pytest.raises(ParityMismatch):
        check_parity(tiny_llada3, _recipe(16, 0.3, **opts), _ref(0.3, window_length=4, gamma=0.5), PROMPTS4)


def _answer(tokens, eos_ids):
    first = next((j for j, t in enumerate(tokens) if t in eos_ids), len(tokens))
    return tokens[:first + 1]


@pytest.mark.parametrize("family,eos", [("llada", 7), ("dream", 28)])
def test_the_answer_up_to_the_first_eos_matches_with_eos_stop(family, eos, tiny_llada3, tiny_dream):
    """With an EOS id these untrained models do produce, the window stops at the row's first
    decoded EOS, as in the code; the code then leaves the later masks while the engine's eos.stop
    fills them, and an EOS decoded later before it ends the answer earlier here (the code goes on
    decoding after it), so the answers are compared up to the first EOS."""
    model = tiny_llada3 if family == "llada" else tiny_dream
    opts = dict(window_length=4, gamma=0.99)
    gen = {**_recipe(16, 0.3)["generation"], "batch_size": 4, "eos": {"stop": True, "ids": [eos]}}
    rows = Decoder(model, recipe_from_dict({**_recipe(16, 0.3, **opts), "generation": gen})).generate(PROMPTS4).rows
    cut = 0
    for prompt, row in zip(PROMPTS4, rows):
        ref, _, _ = elastic_generate(model, prompt, gen_length=16, threshold=0.3, eos_ids=[eos], **opts)
        assert _answer(row.tokens, [eos]) == _answer(ref, [eos])
        cut += len(_answer(row.tokens, [eos])) < 16
    assert cut >= 2


def test_matches_reference_on_llada_reference():
    """The shipped llada-reference, float64, held-out copy and case prompts, 96 positions, the
    code's defaults (window 16, gamma 0.9, one tracked token per layer, threshold 0.9), EOS banned
    for an exact comparison of the whole canvas; then the answers with EOS on."""
    model, prompts = shipped_model_and_prompts("llada", ("copy", "case"))
    check_parity(model, _recipe(96, 0.9), _ref(0.9), prompts)
    eos = [model.spec.eos_token_id, model.spec.eot_token_id]
    recipe = recipe_from_dict({**_recipe(96, 0.9, eos="stop"),
                               "generation": {**_recipe(96, 0.9, eos="stop")["generation"], "batch_size": 2}})
    for prompt, row in zip(prompts, Decoder(model, recipe).generate(prompts).rows):
        ref, _, _ = elastic_generate(model, prompt, gen_length=96, threshold=0.9, eos_ids=eos)
        assert _answer(row.tokens, eos) == _answer(ref, eos)


def test_matches_reference_on_dream_reference():
    """The shipped dream-reference, float64, the code's defaults, EOS banned."""
    model, prompts = shipped_model_and_prompts("dream", ("copy", "case"))
    check_parity(model, _recipe(96, 0.9), _ref(0.9), prompts)


def test_guidance_is_refused(tiny_llada3):
    from dllm_decode.errors import RecipeError

    recipe = _recipe(16, 0.9)
    recipe["generation"]["cfg_scale"] = 1.0
    with pytest.raises(RecipeError, match="elastic_cache"):
        Decoder(tiny_llada3, recipe_from_dict(recipe))


@pytest.mark.parametrize("opts", [dict(window_length=4), dict(window_length=3, gamma=0.99, block_caching=False)],
                         ids=["defaults", "switching"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_invariants(tiny_llada3, opts, temperature):
    recipe = _recipe(16, 0.5, eos="stop", **opts)
    recipe["generation"]["temperature"] = temperature
    check_invariants(tiny_llada3, recipe)
    check_invariants(tiny_llada3, {**recipe, "choose_span": "llada", "select_tokens": "llada",
                                   "generation": {**recipe["generation"], "block_length": 8}})


# --------------------------------------------------------------------------- ties among the tracked

def _scale_model(kind):
    """The slow invariant run's tiny float64 models (tests/test_invariants_scale.py ``model``)."""
    return build_random_model(kind, vocab_size=48, d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=4 if kind == "llada" else 2, mask_token_id=47, eos_token_id=1,
                              pad_token_id=0, seed=3, dtype=torch.float64).eval()


def _gen(gen_length=4, block_length=1, steps=4, temperature=0.0):
    return {"gen_length": gen_length, "block_length": block_length, "steps": steps, "temperature": temperature,
            "seed": 0, "cfg_scale": 0.0, "dtype": "float64", "eos": {"stop": False, "deprioritize": False, "ban": False}}


def _el(**opts):
    return {"plugin": "elastic_cache", "window_length": 1, "gamma": 0.0, "track_num": 2, "block_caching": True, **opts}


_LLADA = {"plugin": "llada", "remasking": "low_confidence"}
#: counterexamples of the slow invariant run (and a Dream one of the same shape): a 1-token prompt
#: leaves fewer unmasked keys than track_num, so zero-mass masks fill the tracked set, and topk's
#: order among those ties depends on the row's length and place in the padded batch
TIES = {
    "cache_policy": ("llada", {"policy": _LLADA, "cache_policy": _el(), "generation": _gen()}, [[2], [2, 2]]),
    "threshold": ("llada", {"policy": _LLADA, "select_tokens": {"plugin": "threshold", "mode": "threshold",
                                                                "threshold": 0.9},
                            "choose_span": _el(), "cache_policy": _el(), "generation": _gen()}, [[2], [2, 2]]),
    "llada-sampled": ("llada", {"policy": _LLADA, "cache_policy": _el(), "generation": _gen(temperature=1.0)},
                      [[43], [2, 2]]),
    "dream": ("dream", {"policy": {"plugin": "dream", "alg": "confidence_threshold", "threshold": 0.0},
                        "choose_span": _el(window_length=2, track_num=3, block_caching=False),
                        "cache_policy": _el(window_length=2, track_num=3, block_caching=False),
                        "generation": _gen(gen_length=8, block_length=4, steps=4)}, [[2], [2, 2]]),
}


@pytest.mark.parametrize("case", list(TIES))
def test_tracked_ties_are_batch_invariant(case):
    """Fewer unmasked keys than track_num: the masks (their attention zeroed, as in the code) tie
    for the remaining tracked places; a row tracks the same ones alone and left-padded."""
    kind, data, prompts = TIES[case]
    check_invariants(_scale_model(kind), data, prompts)


def test_tracked_ties_match_reference(tiny_llada3):
    """The reference breaks the same ties in column order: a 1-token prompt with three tracked
    tokens per layer and no refresh (the tracked masks' fresh K/V are what the window reads)."""
    opts = dict(window_length=2, gamma=0.0, track_num=3)
    prompts = [[20], [5, 9, 11, 3], [7]]
    for batched in (False, True):
        check_parity(tiny_llada3, _recipe(12, 0.3, **opts), _ref(0.3, **opts), prompts, batched=batched)


# --------------------------------------------------------------------------- Dream's schedule in the window

def test_dream_schedule_in_the_sliding_window_is_refused_past_the_step_budget():
    """Dream's linspace schedule restarts at every new span and may commit nothing until its
    last step; the window starts a new span whenever its first mask is decoded, so a request
    takes up to gen_length x steps-per-block steps (the slow run's plugin:elastic_cache:choose_span
    counterexample: 8 x 6 = 48 > the default cap 32, found as a budget error mid-request). The
    recipe is refused up front; with the budget raised to the bound it finishes within it, and
    the rules that commit at every step are accepted as they are."""
    from dllm_decode.errors import RecipeError

    m = _scale_model("llada")
    policy = {"plugin": "dream", "alg": "origin", "first_token": False, "threshold": 0.0}
    window = _el(track_num=1, block_caching=False)
    data = {"policy": policy, "choose_span": window, "generation": {**_gen(gen_length=8, block_length=8, steps=6),
                                                                     "batch_size": 1}}
    with pytest.raises(RecipeError, match=r"dream.*origin.*elastic_cache.*8 x 6 = 48.*generation\.max_steps \(32"):
        Decoder(m, recipe_from_dict(data))
    for alg in ("origin", "maskgit_plus"):
        raised = {**data, "policy": {**policy, "alg": alg}, "generation": {**data["generation"], "max_steps": 48}}
        row = Decoder(m, recipe_from_dict(raised)).generate([[2]]).rows[0]
        assert m.spec.mask_token_id not in row.tokens and row.nfe <= 48
    for ok in ({**policy, "alg": "confidence_threshold"}, {**policy, "first_token": True}):
        check_invariants(m, {**data, "policy": ok}, [[2], [2, 2]])
    # four steps per block: at most 4 x gen_length, the default cap
    check_invariants(m, {**data, "generation": {**data["generation"], "steps": 4}}, [[2], [2, 2]])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_finished_row_feeds_nothing_and_never_switches(family):
    """Rows stopped at EOS while others decode: a finished row feeds none of its tracked or last
    tokens and is not drift-tested (its switch sent the whole batch full width), and every row
    decodes as it does alone."""
    from dllm_decode.config import load_recipe

    model, prompts = shipped_model_and_prompts(family, ("copy", "repeat", "case", "repeat"), seed=3)
    recipe = load_recipe("elastic-cache", ["generation.gen_length=64", "generation.steps=64",
                                           f"generation.batch_size={len(prompts)}", "generation.dtype=float64"])
    steps, fed, switched = what_finished_rows_fed(model, recipe, prompts)
    assert steps >= 1, "no row finished before the others"
    assert (fed, switched) == (0, 0)
    assert decodes_as_alone(model, recipe, prompts)
