"""The cache plugins (kv_block, dllm_cache, slowfast_tail) reproduce the reference loops of
tests/reference_caches.py token for token at T = 0 (float64), row by row inside a padded batch
of 4, on tiny random LLaDA / Dream models and on the shipped reference models; refresh-every-step
settings give exactly the tokens of no cache; every recipe's cache x policy pair keeps the
engine invariants, alone and in a padded batch."""

from pathlib import Path

import pytest
import torch

from dllm_decode.config import load_recipe, recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import InputError, RecipeError
from dllm_decode.models import build_random_model
from dllm_decode.plugins import get_plugin_manager
from dllm_decode.policy import resolve
from dllm_decode.testing import RandomLogitsModel, check_invariants
from batch_feeds import decodes_as_alone, steps
from reference_caches import DllmCacheRow, GuidedCacheRow, fastdllm_cached_generate
from reference_forward import weights
from reference_llada import llada_generate
from reference_slowfast import slowfast_generate
from shipped import shipped_model_and_prompts

ROOT = Path(__file__).resolve().parents[1]
RANDOM_PROMPTS = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


def _tiny(family, seed=4):
    return build_random_model(family, vocab_size=48, d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=4 if family == "llada" else 2, mask_token_id=47,
                              eos_token_id=1, pad_token_id=0, seed=seed, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def shipped():
    out = {}
    for family in ("llada", "dream"):
        out[family] = shipped_model_and_prompts(family, ("copy", "repeat", "case", "repeat"), seed=3)
    return out


MODELS = {"tiny-llada": lambda s: (_tiny("llada"), RANDOM_PROMPTS),
          "tiny-dream": lambda s: (_tiny("dream"), RANDOM_PROMPTS),
          "llada-reference": lambda s: s["llada"], "dream-reference": lambda s: s["dream"]}


def _decode(model, data, prompts):
    data = {**data, "generation": {**data["generation"], "batch_size": len(prompts), "dtype": "float64"}}
    return Decoder(model, recipe_from_dict(data)).generate(prompts)


# ----------------------------------------------------------------------------- Fast-dLLM
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("gen,block,threshold", [(24, 8, 0.9), (24, 8, 0.3), (16, 16, 0.5)])
def test_kv_block_matches_fastdllm(name, mode, gen, block, threshold, shipped):
    model, prompts = MODELS[name](shipped)
    dream = model.spec.family == "dream"
    if dream:   # Fast-dLLM's Dream block sampler: forced first token, then the threshold rule
        slots = {"policy": {"plugin": "dream", "alg": "confidence_threshold", "threshold": threshold,
                            "first_token": True}}
    else:
        slots = {"choose_span": "llada", "score": "llada",
                 "select_tokens": {"plugin": "threshold", "threshold": threshold}}
    data = {**slots, "cache_policy": {"plugin": "kv_block", "mode": mode},
            "generation": {"gen_length": gen, "block_length": block, "steps": gen}}
    out = _decode(model, data, prompts)
    W = weights(model)
    for j, prompt in enumerate(prompts):
        ref, nfe = fastdllm_cached_generate(W, prompt, mask_id=model.spec.mask_token_id, gen_length=gen,
                                            block_length=block, threshold=threshold, mode=mode,
                                            shift=dream, first_token=dream)
        assert out.tokens[j] == ref, f"row {j}"
        assert out.rows[j].nfe == nfe, f"row {j}"


def test_kv_block_is_approximate_and_prefix_differs_from_dual():
    """Not vacuous: on a tiny random model, stale K/V change tokens, and the two modes differ."""
    model = _tiny("llada")
    base = {"choose_span": "llada", "score": "llada", "select_tokens": {"plugin": "threshold", "threshold": 0.5},
            "generation": {"gen_length": 24, "block_length": 8, "steps": 24}}
    outs = {m: _decode(model, {**base, "cache_policy": c}, RANDOM_PROMPTS).tokens
            for m, c in (("none", "none"), ("prefix", {"plugin": "kv_block", "mode": "prefix"}),
                         ("dual", {"plugin": "kv_block", "mode": "dual"}))}
    assert outs["prefix"] != outs["none"] and outs["dual"] != outs["none"] and outs["dual"] != outs["prefix"]


def test_kv_block_finished_rows_do_not_stretch_the_feed(shipped):
    """A row that has stopped (EOS) gets an empty window: once one row is left, its dual steps feed
    its block alone (a finished row's moved span had made them feed the whole canvas), and every
    row decodes the tokens it decodes alone."""
    model, prompts = shipped["llada"]
    data = {"choose_span": "llada", "score": "llada", "select_tokens": {"plugin": "threshold", "threshold": 0.9},
            "cache_policy": {"plugin": "kv_block", "mode": "dual"},
            "generation": {"gen_length": 64, "block_length": 8, "steps": 64, "eos": {"stop": True}}}
    data = {**data, "generation": {**data["generation"], "batch_size": len(prompts), "dtype": "float64"}}
    alone_steps = 0
    for state, done, plan, out in steps(model, recipe_from_dict(data), prompts):
        if int((~done).sum()) == 1 and plan.name == "kv_block:dual":
            assert out.logits.shape[1] == 8, f"step {state.step}"
            alone_steps += 1
    assert alone_steps >= 1
    assert decodes_as_alone(model, recipe_from_dict(data), prompts)


# ----------------------------------------------------------------------------- dLLM-Cache
DLLM_SETTINGS = [dict(prompt_interval=100, response_interval=7, rho=0.25),
                 dict(prompt_interval=3, response_interval=2, rho=0.5),
                 dict(prompt_interval=5, response_interval=4, rho=0.0),
                 dict(prompt_interval=2, response_interval=3, rho=0.25, full_first_layer=False),
                 dict(prompt_interval=4, response_interval=4, rho=1.0)]


def _dllm_id(s):
    return "-".join(f"{k[:1]}{v}" for k, v in s.items())


@pytest.mark.parametrize("settings", DLLM_SETTINGS, ids=_dllm_id)
@pytest.mark.parametrize("name", ["tiny-llada", "llada-reference", "tiny-dream", "dream-reference"])
def test_baseline_with_dllm_cache_matches_reference(name, settings, shipped):
    model, prompts = MODELS[name](shipped)
    gen, block = 16, 8
    data = {"choose_span": "llada", "score": "llada", "select_tokens": "llada",
            "cache_policy": {"plugin": "dllm_cache", **settings},
            "generation": {"gen_length": gen, "block_length": block, "steps": gen}}
    out = _decode(model, data, prompts)
    W = weights(model)
    for j, prompt in enumerate(prompts):
        row = DllmCacheRow(W, shift=model.spec.shift_logits, prompt_len=len(prompt), **{
            "full_first_layer": True, **settings})
        ref = llada_generate(row, [prompt], mask_id=model.spec.mask_token_id, pad_id=0, steps=gen,
                             gen_length=gen, block_length=block)
        assert out.tokens[j] == ref[0].tolist(), f"row {j}"


CFG_SETTINGS = [dict(prompt_interval=100, response_interval=7, rho=0.25, cfg_interval=3),
                dict(prompt_interval=3, response_interval=2, rho=0.5, cfg_interval=2),
                dict(prompt_interval=4, response_interval=3, rho=0.0, cfg_interval=1)]


@pytest.mark.parametrize("settings", CFG_SETTINGS, ids=_dllm_id)
@pytest.mark.parametrize("name", ["tiny-llada", "llada-reference", "tiny-dream"])
def test_dllm_cache_guidance_residual_matches_reference(name, settings, shipped):
    """cfg_scale > 0: the unconditional canvas keeps its own feature cache and forward count,
    and the guidance residual is reused between refreshes, as upstream's CFG cache does."""
    model, prompts = MODELS[name](shipped)
    gen, block, w = 16, 8, 1.5
    data = {"choose_span": "llada", "score": "llada", "select_tokens": "llada",
            "cache_policy": {"plugin": "dllm_cache", **settings},
            "generation": {"gen_length": gen, "block_length": block, "steps": gen, "cfg_scale": w,
                           "batch_size": len(prompts), "dtype": "float64"}}
    out = Decoder(model, recipe_from_dict(data)).generate(prompts, keep_states=True)
    W = weights(model)
    for j, prompt in enumerate(prompts):
        row = GuidedCacheRow(W, shift=model.spec.shift_logits, prompt_len=len(prompt),
                             mask_id=model.spec.mask_token_id, cfg_scale=w, **settings)
        ref = llada_generate(row, [prompt], mask_id=model.spec.mask_token_id, pad_id=0, steps=gen,
                             gen_length=gen, block_length=block)
        assert out.tokens[j] == ref[0].tolist(), f"row {j}"
    if settings["cfg_interval"] > 1:   # the skipped unconditional forwards really are skipped
        assert out.states[0].counters["guide_forwards"] == row.uncond_forwards < gen


def test_guidance_residual_reuse_changes_tokens_and_refusals(tmp_path):
    """Not vacuous: reusing the residual changes tokens on a tiny random model; the cut
    forwards of slowfast_tail refuse it with an error naming the key."""
    model = _tiny("llada", seed=9)
    base = {"policy": "llada", "generation": {"gen_length": 24, "steps": 24, "cfg_scale": 2.0}}
    cache = {"plugin": "dllm_cache", "prompt_interval": 1, "response_interval": 1, "rho": 0.0}
    every = _decode(model, {**base, "cache_policy": cache}, RANDOM_PROMPTS).tokens
    reused = _decode(model, {**base, "cache_policy": {**cache, "cfg_interval": 4}}, RANDOM_PROMPTS).tokens
    assert reused != every
    with pytest.raises(RecipeError, match="dllm_cache.cfg_interval"):
        resolve(recipe_from_dict({"policy": "slowfast", "score": "llada", "generation": {"gen_length": 24, "steps": 24, "cfg_scale": 1.0},
                                  "cache_policy": {"plugin": "slowfast_tail", "dllm_cache": {"cfg_interval": 2}}}),
                get_plugin_manager())


def test_dllm_cache_really_reuses_features():
    model = _tiny("llada", seed=9)
    base = {"policy": "llada", "generation": {"gen_length": 24, "steps": 24}}
    none = _decode(model, {**base, "cache_policy": "none"}, RANDOM_PROMPTS).tokens
    cached = _decode(model, {**base, "cache_policy": {"plugin": "dllm_cache", "prompt_interval": 50,
                                                      "response_interval": 8, "rho": 0.0}}, RANDOM_PROMPTS).tokens
    assert cached != none


# ----------------------------------------------------------------------------- SlowFast
SF_SETTINGS = [dict(prompt_interval=15, response_interval=5, rho=0.25, full_first_layer=False),
               dict(prompt_interval=4, response_interval=2, rho=0.5, full_first_layer=False),
               dict(prompt_interval=15, response_interval=1, rho=0.0, full_first_layer=False),
               dict(prompt_interval=6, response_interval=3, rho=0.25, full_first_layer=True)]


@pytest.mark.parametrize("settings", [None] + SF_SETTINGS, ids=lambda s: "tail-only" if s is None else _dllm_id(s))
@pytest.mark.parametrize("name", ["tiny-llada", "llada-reference", "dream-reference"])
@pytest.mark.parametrize("gen,block", [(32, 32), (32, 16)])
def test_slowfast_tail_matches_reference(name, settings, gen, block, shipped):
    model, prompts = MODELS[name](shipped)
    # high tau_high: accelerated stages take several forwards, so cut forwards happen
    params = dict(explore_steps=2, tau_min=0.1, tau_high=0.5) if name.startswith("tiny") else dict(tau_high=0.999)
    cache = {"plugin": "slowfast_tail"} if settings is None else {"plugin": "slowfast_tail", "dllm_cache": settings}
    data = {"policy": {"plugin": "slowfast", **params}, "score": "llada", "cache_policy": cache,
            "generation": {"gen_length": gen, "block_length": block}}
    out = _decode(model, data, prompts)
    W = weights(model)
    ref_params = {{"explore_steps": "K"}.get(k, k): v for k, v in params.items()}
    cut_seen = False
    for j, prompt in enumerate(prompts):
        if settings is None:
            fwd = _Counting(model)
        else:
            fwd = DllmCacheRow(W, shift=model.spec.shift_logits, prompt_len=len(prompt), **settings)
        cuts = _Cuts(fwd)
        ref, nfe = slowfast_generate(cuts, prompt, mask_id=model.spec.mask_token_id, gen_length=gen,
                                     block_length=block, tail=True, skip_idle=True, **ref_params)
        assert out.tokens[j] == ref, f"row {j}"
        assert out.rows[j].nfe == nfe, f"row {j}"
        cut_seen = cut_seen or cuts.seen
    if settings is None:
        assert cut_seen, "no forward was cut: the test would be vacuous"


def test_slowfast_tail_finished_rows_do_not_undo_the_cut(shipped):
    """A row that has stopped (EOS) is back in explore, uncut; it no longer holds the batch's feed at the
    canvas end, so the rows left still get their cut forwards, and every row decodes as it does alone."""
    model, prompts = shipped["llada"]
    data = {"policy": {"plugin": "slowfast", "tau_high": 0.999}, "score": "llada",
            "cache_policy": {"plugin": "slowfast_tail"},
            "generation": {"gen_length": 64, "block_length": 32, "eos": {"stop": True},
                           "batch_size": len(prompts), "dtype": "float64"}}
    cut_after_a_stop = sum(bool(done.any()) and plan.end is not None and plan.end < state.length
                           for state, done, plan, _ in steps(model, recipe_from_dict(data), prompts))
    assert cut_after_a_stop >= 3
    assert decodes_as_alone(model, recipe_from_dict(data), prompts)


class _Counting:
    """Plain forwards through the model under test's own full path (no plan)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, attention_mask=None):
        with torch.no_grad():
            return self.model(x)


class _Cuts:
    """Records whether the reference ever ran a cut forward."""

    def __init__(self, fwd):
        self.fwd = fwd
        self.full = None
        self.seen = False

    def __call__(self, x, attention_mask=None):
        if self.full is None:
            self.full = x.shape[1]
        elif x.shape[1] < self.full:
            self.seen = True
        return self.fwd(x)


# ----------------------------------------------------------------------------- exact limits
def test_refresh_every_step_is_exact():
    """dLLM-Cache with K_p = K_r = 1 and kv_block refreshed every forward give exactly the
    no-cache tokens; slowfast_tail over dLLM-Cache (1, 1) gives exactly slowfast_tail alone."""
    for family in ("llada", "dream"):
        model = _tiny(family, seed=9)
        llada = {"choose_span": "llada", "score": "llada", "select_tokens": {"plugin": "threshold", "threshold": 0.05},
                 "generation": {"gen_length": 24, "block_length": 8, "steps": 24}}
        none = _decode(model, {**llada, "cache_policy": "none"}, RANDOM_PROMPTS).tokens
        for cache in ({"plugin": "dllm_cache", "prompt_interval": 1, "response_interval": 1, "rho": 0.5},
                      {"plugin": "kv_block", "mode": "dual", "refresh_interval": 1},
                      {"plugin": "kv_block", "mode": "prefix", "refresh_interval": 1}):
            assert _decode(model, {**llada, "cache_policy": cache}, RANDOM_PROMPTS).tokens == none, cache
        sf = {"policy": {"plugin": "slowfast", "explore_steps": 2, "tau_min": 0.1, "tau_high": 0.3}, "score": "llada",
              "generation": {"gen_length": 32, "block_length": 16}}
        tail = _decode(model, {**sf, "cache_policy": "slowfast_tail"}, RANDOM_PROMPTS).tokens
        both = _decode(model, {**sf, "cache_policy": {"plugin": "slowfast_tail", "dllm_cache": {
            "prompt_interval": 1, "response_interval": 1}}}, RANDOM_PROMPTS).tokens
        assert both == tail


# ----------------------------------------------------------------------------- recipes
CACHE_RECIPES = ["fast-dllm", "fast-dllm-prefix", "llada-dllm-cache", "slowfast-dllm-cache", "dream-fast-dllm",
                 "dkv-cache", "dream-dkv-cache", "d2cache", "dream-d2cache"]


@pytest.mark.parametrize("recipe", CACHE_RECIPES)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cache_recipes_keep_every_invariant(recipe, family):
    path = ROOT / "recipes" / f"{recipe}.yaml"
    over = ["generation.gen_length=16", "generation.dtype=float64"]
    if load_recipe(path).generation.block_length:
        over.append("generation.block_length=8")
    if load_recipe(path).generation.steps:
        over.append("generation.steps=16")
    model = _tiny(family, seed=5)
    check_invariants(model, path, overrides=over)                       # padded batch of 4 and alone
    check_invariants(model, path, prompts=[[5, 6, 7]], overrides=over)


def test_cache_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="kv_block.*plain forwards"):
        Decoder(RandomLogitsModel(), recipe_from_dict({"policy": "llada", "cache_policy": "kv_block"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("choose_span: llada\nscore: llada\nselect_tokens: llada\ncache_policy: slowfast_tail\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml.*decide_phase"):
        resolve(load_recipe(bad), get_plugin_manager())
    with pytest.raises(RecipeError, match="rho"):
        resolve(recipe_from_dict({"policy": "llada", "cache_policy": {"plugin": "dllm_cache", "rho": 2}}),
                get_plugin_manager())


POLICIES = {"llada": {"policy": "llada"},
            "threshold": {"choose_span": "llada", "score": "llada", "select_tokens": {"plugin": "threshold", "threshold": 0.3}},
            "dream": {"policy": {"plugin": "dream", "alg": "entropy"}},
            "dream-block": {"policy": {"plugin": "dream", "alg": "confidence_threshold", "threshold": 0.3,
                                       "first_token": True}},
            "slowfast": {"policy": {"plugin": "slowfast", "explore_steps": 2, "tau_min": 0.1, "tau_high": 0.3},
                         "score": "llada"}}
CACHES = {"kv_block-dual": {"plugin": "kv_block"}, "kv_block-prefix": {"plugin": "kv_block", "mode": "prefix"},
          "dllm_cache": {"plugin": "dllm_cache", "prompt_interval": 3, "response_interval": 2, "rho": 0.5},
          "dkv_cache": {"plugin": "dkv_cache", "refresh_interval": 3}}


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("policy", list(POLICIES))
def test_any_cache_with_any_policy(policy, cache):
    """Composition in YAML alone: every built-in cache under every policy keeps the invariants,
    in a padded batch and alone (both families)."""
    for family in ("llada", "dream"):
        recipe = {**POLICIES[policy], "cache_policy": CACHES[cache],
                  "generation": {"gen_length": 16, "block_length": 8, "steps": 16, "dtype": "float64"}}
        check_invariants(_tiny(family, seed=6), recipe)


@pytest.mark.parametrize("cache", list(CACHES))
def test_caches_under_classifier_free_guidance(cache):
    """With cfg_scale > 0 the conditional and unconditional canvases run as one batch: the
    per-row plan fields are tiled over both halves, and the invariants hold."""
    recipe = {**POLICIES["threshold"], "cache_policy": CACHES[cache],
              "generation": {"gen_length": 16, "block_length": 8, "steps": 16, "dtype": "float64", "cfg_scale": 1.0}}
    check_invariants(_tiny("llada", seed=6), recipe)
