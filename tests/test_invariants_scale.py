"""The engine invariants at scale: a hypothesis strategy over whole recipes.

``recipe_cases(composition)`` draws a recipe around one *composition* (every built-in plugin in
every slot it fills, every shipped recipe, and the documented policy x cache pairs), with its
plugin options, a model of either family (tiny random LLaDA / Dream models in float64, and
``RandomLogitsModel`` where no compute plan is needed), prompts of different lengths (so batches
are left-padded), gen / block / steps, EOS modes, classifier-free guidance, temperature and
seed. ``check_case`` then either asserts a clean refusal (a recipe the loader or the engine
refuses: a ``DllmDecodeError`` naming a plugin or key) or runs ``dllm_decode.testing.check_invariants``.

Batch invariance is checked in every case, sampling and random orders included: every random
draw is keyed by the row's seed and prompt, the step and the position (``dllm_decode.noise``),
so a row draws the same numbers in a padded batch as alone.

APD runs against a tiny random autoregressive verifier (a one-layer Llama) sharing the test
models' 48-token vocabulary, the only setting where verifier and model share a tokenizer here.

The default suite draws a few examples per composition; the slow run draws 200 per composition:

    bash scripts/test.sh -m slow tests/test_invariants_scale.py --hypothesis-show-statistics
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from dllm_decode.config import load_recipe, recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import DllmDecodeError, RecipeError
from dllm_decode.hookspecs import hookimpl
from dllm_decode.models import build_random_model
from dllm_decode.plugins import get_plugin_manager, list_plugins
from dllm_decode.testing import InvariantViolation, RandomLogitsModel, check_invariants

ROOT = Path(__file__).resolve().parents[1]
VOCAB, MASK, EOS = 48, 47, 1


# ----------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=None)
def model(kind: str):
    if kind == "random-logits":
        return RandomLogitsModel(vocab_size=VOCAB, mask_token_id=MASK, eos_token_id=EOS, seed=11)
    extra = {"block_size": 4} if kind == "sdar" else {}       # block-causal: decoded block by block
    return build_random_model(kind, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=4 if kind == "llada" else 2, mask_token_id=MASK, eos_token_id=EOS,
                              pad_token_id=0, seed=3, dtype=torch.float64, **extra).eval()


@functools.lru_cache(maxsize=None)
def verifier() -> str:
    """A tiny autoregressive verifier for APD with the test models' vocabulary (built once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    path = tempfile.mkdtemp(prefix="dllm-verifier-")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- plugin options

PROB = st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
REMASKING = st.sampled_from(["low_confidence", "low_confidence", "low_confidence", "random"])

#: per plugin, a strategy of its options (``{}`` for a plugin not listed: its defaults)
OPTIONS = {
    "llada": st.fixed_dictionaries({"remasking": REMASKING}),
    "prophet": st.fixed_dictionaries({"remasking": REMASKING,
                                      "answer_start": st.integers(0, 3), "answer_length": st.integers(1, 6),
                                      "early_threshold": st.sampled_from([0.5, 2.0, 7.5]),
                                      "mid_threshold": st.sampled_from([0.5, 1.0, 5.0]),
                                      "late_threshold": st.sampled_from([0.1, 0.5, 2.5])}),
    "threshold": st.one_of(st.fixed_dictionaries({"mode": st.just("threshold"), "threshold": PROB}),
                           st.fixed_dictionaries({"mode": st.just("factor"),
                                                  "factor": st.sampled_from([0.5, 1.0, 2.0])})),
    "dream": st.fixed_dictionaries(
        {"alg": st.sampled_from(["origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold"]),
         "first_token": st.booleans(), "threshold": PROB},
        optional={"alg_temp": st.sampled_from([0.0, 0.0, 0.5]), "top_p": st.sampled_from([0.5, 0.95]),
                  "top_k": st.integers(1, 5)}),
    "slowfast": st.fixed_dictionaries({"variant": st.sampled_from(["code", "paper"]),
                                       "explore_steps": st.integers(1, 4), "tau_min": st.sampled_from([0.1, 0.3]),
                                       "tau_high": st.sampled_from([0.3, 0.6, 0.9])}),
    "wino": st.fixed_dictionaries({"tau_in": PROB, "tau_out": PROB, "cap_min": st.integers(1, 3),
                                   "cap_max": st.integers(3, 6)}),
    "kv_block": st.fixed_dictionaries({"mode": st.sampled_from(["dual", "prefix"])},
                                      optional={"refresh_interval": st.integers(1, 3)}),
    "dllm_cache": st.fixed_dictionaries({"prompt_interval": st.integers(1, 5), "response_interval": st.integers(1, 4),
                                         "rho": st.sampled_from([0.0, 0.25, 0.5]),
                                         "full_first_layer": st.booleans()}),
    "apd": st.fixed_dictionaries({"mixture_weight": st.sampled_from([0.0, 0.5, 0.7, 1.0])},
                                 optional={"top_k": st.integers(1, 4)}),
    "klass": st.fixed_dictionaries(
        {"variant": st.sampled_from(["llada", "dream"]), "conf_threshold": PROB,
         "kl_threshold": st.sampled_from([0.0, 0.01, 0.5, 100.0]), "history_length": st.integers(1, 3),
         "unmask_strategy": st.sampled_from(["all", "max_conf", "min_kl", "random"])},
        optional={"top_p": st.sampled_from([0.5, 0.95]), "top_k": st.integers(1, 5)}),
    "credit": st.fixed_dictionaries({"threshold": PROB, "credit_alpha": st.sampled_from([0.0, 0.7, 3.0]),
                                     "boost_gamma": st.sampled_from([0.0, 0.2, 1.0]),
                                     "decay_beta": st.sampled_from([0.0, 0.8, 1.0]), "use_float64": st.booleans()}),
    "daedal": st.fixed_dictionaries(
        {"max_gen_length": st.sampled_from([16, 24]), "high_conf_threshold": PROB, "low_conf_threshold": PROB,
         "expansion_factor": st.integers(1, 8), "eos_confidence_threshold": PROB,
         "expand_eos_confidence_threshold": PROB, "eos_check_tokens": st.integers(1, 8),
         "eos_id": st.sampled_from([None, 5, 20])}),
    "localleap": st.fixed_dictionaries({"threshold": PROB, "relaxed_threshold": st.one_of(st.none(), PROB),
                                        "radius": st.integers(0, 6)}),
    "dpad": st.fixed_dictionaries({"sampler": st.sampled_from(["gaussian", "uniform"]), "window": st.integers(1, 4),
                                   "sigma": st.sampled_from([1.0, 4.0]), "scale": st.sampled_from([0.5, 2.0]),
                                   "preserved": st.integers(0, 3),
                                   "kv_cache": st.sampled_from(["none", "prefix", "dual"])}),
    "elastic_cache": st.fixed_dictionaries({"window_length": st.integers(1, 6), "gamma": PROB,
                                            "track_num": st.integers(1, 3), "block_caching": st.booleans()}),
}
OPTIONS["dkv_cache"] = st.fixed_dictionaries({"refresh_interval": st.integers(1, 4)})
OPTIONS["d2cache"] = st.fixed_dictionaries(
    {"rollout_p": st.sampled_from([0.0, 0.1, 0.5]), "current_k": st.integers(1, 6), "sigma": st.sampled_from([1.0, 10.0]),
     "inflate_w": st.integers(0, 3), "alg": st.sampled_from(["maskgit_plus", "topk_margin", "entropy"]),
     "num_transfer_tokens": st.integers(1, 3), "decode_sigma": st.sampled_from([None, 0.0, 3.0, 10.0])},
    optional={"top_p": st.sampled_from([0.5, 0.9]), "top_k": st.integers(1, 5)})
OPTIONS["slowfast_tail"] = st.one_of(st.just({}), st.fixed_dictionaries({"dllm_cache": OPTIONS["dllm_cache"]}))


def options(draw, plugin: str, drawn: dict) -> dict:
    """``plugin``'s options, drawn once per recipe: a plugin in several slots gets one set (the
    recipe loader refuses contradicting ones)."""
    if plugin not in drawn:
        opts = dict(draw(OPTIONS.get(plugin, st.just({}))))
        if plugin == "apd":
            opts["verifier"] = verifier()
        drawn[plugin] = opts
    return drawn[plugin]


# ----------------------------------------------------------------------------- compositions

def _plugins():
    return {info.name: info for info in list_plugins(get_plugin_manager())}


PLUGINS = _plugins()
SHIPPED = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
#: the documented policy x cache pairs (docs/caches.md, dllm_decode/tools/cache_report.py), with
#: the policy's and the cache's options drawn (the shipped recipes fix them):
#: (policy slots, cache plugin, fixed cache options)
PAIRS = {
    "llada+kv_block-dual": ({"policy": "llada"}, "kv_block", {"mode": "dual"}),
    "llada+kv_block-prefix": ({"policy": "llada"}, "kv_block", {"mode": "prefix"}),
    "llada+dllm_cache": ({"policy": "llada"}, "dllm_cache", {}),
    "threshold+kv_block-dual": ({"policy": "llada", "select_tokens": "threshold"}, "kv_block", {"mode": "dual"}),
    "threshold+kv_block-prefix": ({"policy": "llada", "select_tokens": "threshold"}, "kv_block", {"mode": "prefix"}),
    "threshold+dllm_cache": ({"policy": "llada", "select_tokens": "threshold"}, "dllm_cache", {}),
    "slowfast+kv_block-dual": ({"policy": "slowfast", "score": "llada"}, "kv_block", {"mode": "dual"}),
    "slowfast+dllm_cache": ({"policy": "slowfast", "score": "llada"}, "dllm_cache", {}),
    "slowfast+slowfast_tail": ({"policy": "slowfast", "score": "llada"}, "slowfast_tail", {}),
    "slowfast+slowfast_tail+dllm_cache": ({"policy": "slowfast", "score": "llada"}, "slowfast_tail",
                                          {"dllm_cache": "drawn"}),
    "dream-block+kv_block-dual": ({"policy": "dream"}, "kv_block", {"mode": "dual"}),
    "dream-block+kv_block-prefix": ({"policy": "dream"}, "kv_block", {"mode": "prefix"}),
    "dream-block+dllm_cache": ({"policy": "dream"}, "dllm_cache", {}),
    "llada+dkv_cache": ({"policy": "llada"}, "dkv_cache", {}),
    "threshold+dkv_cache": ({"policy": "llada", "select_tokens": "threshold"}, "dkv_cache", {}),
    "dream+dkv_cache": ({"policy": "dream"}, "dkv_cache", {}),
    "d2cache": ({"choose_span": "llada", "score": "d2cache", "select_tokens": "d2cache"}, "d2cache", {}),
    "threshold+dpad": ({"policy": "llada", "select_tokens": "threshold"}, "dpad", {"kv_cache": "none"}),
    "threshold+dpad-prefix": ({"policy": "llada", "select_tokens": "threshold"}, "dpad", {"kv_cache": "prefix"}),
    "threshold+dpad-dual": ({"policy": "llada", "select_tokens": "threshold"}, "dpad", {"kv_cache": "dual"}),
    "dream-block+dpad-prefix": ({"policy": "dream"}, "dpad", {"kv_cache": "prefix"}),
    "threshold+elastic_cache": ({"policy": "llada", "select_tokens": "threshold", "choose_span": "elastic_cache"},
                                "elastic_cache", {}),
    "llada+elastic_cache": ({"policy": "llada"}, "elastic_cache", {}),
    "dream+elastic_cache": ({"policy": "dream", "choose_span": "elastic_cache"}, "elastic_cache", {}),
}
#: partners a plugin needs besides the slots its ``PluginMeta.pairs`` declare: the out-of-span
#: cache acts on SlowFast's per-row phases
PARTNERS = {"slowfast_tail": {"policy": "slowfast", "score": "llada"}}

COMPOSITIONS = ([f"plugin:{name}:{slot}" for name, info in sorted(PLUGINS.items()) for slot in info.slots]
                + [f"recipe:{name}" for name in SHIPPED] + [f"pair:{name}" for name in PAIRS])


def _with_pairs(name: str, slot: str) -> list[str]:
    """``slot`` and every slot the plugin's declared pairs pull in with it."""
    slots, todo = [slot], [slot]
    while todo:
        s = todo.pop()
        for a, b in PLUGINS[name].meta.pairs:
            if a == s and b not in slots:
                slots.append(b)
                todo.append(b)
    return slots


def _generation(draw) -> dict:
    gen = draw(st.sampled_from([4, 8, 12, 16]))
    block = draw(st.sampled_from([b for b in range(1, gen + 1) if gen % b == 0]))
    blocks = gen // block
    out = {"gen_length": gen, "block_length": block,
           "steps": blocks * draw(st.integers(1, block)),
           "temperature": draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0])), "seed": draw(st.integers(0, 3)),
           "cfg_scale": draw(st.sampled_from([0.0, 0.0, 1.0])), "dtype": "float64",
           "eos": {"stop": draw(st.booleans()), "deprioritize": draw(st.booleans()), "ban": draw(st.booleans())}}
    return out


def _entry(name: str, opts: dict):
    return {"plugin": name, **opts} if opts else name


def _slots_for_plugin(draw, name: str, slot: str) -> dict:
    drawn: dict = {}
    base = draw(st.sampled_from(["llada", "dream"]))
    data: dict = {"policy": {"plugin": base, **options(draw, base, drawn)}}
    for other, partner in PARTNERS.get(name, {}).items():
        data[other] = {"plugin": partner, **options(draw, partner, drawn)}
    opts = options(draw, name, drawn)
    for s in _with_pairs(name, slot):
        data[s] = _entry(name, opts)
    return data


def _slots_for_pair(draw, pair: str) -> dict:
    drawn: dict = {}
    slots, cache, fixed = PAIRS[pair]
    data: dict = {}
    for s, name in slots.items():
        data[s] = {"plugin": name, **options(draw, name, drawn)}
    if pair.startswith("dream-block"):           # Fast-dLLM's Dream block sampler
        data["policy"].update(alg="confidence_threshold", first_token=True)
    opts = dict(options(draw, cache, drawn))
    if fixed.get("dllm_cache") == "drawn":
        opts["dllm_cache"] = draw(OPTIONS["dllm_cache"])
    else:
        opts.update(fixed)
    data["cache_policy"] = _entry(cache, opts)
    return data


def _kinds(data: dict) -> list[str]:
    requires = {r for name in _names(data) if name in PLUGINS for r in PLUGINS[name].meta.requires}
    if "block_causal" in requires:
        return ["sdar"]
    if "bidirectional" in requires:
        return ["llada", "dream"]
    return ["llada", "dream", "sdar"] if "compute_plans" in requires else ["random-logits", "llada", "dream", "sdar"]


def _names(data: dict) -> set[str]:
    names = set()
    for key, value in data.items():
        if key == "generation":
            continue
        if isinstance(value, str):
            names.add(value)
        elif isinstance(value, dict) and "plugin" in value:
            names.add(value["plugin"])
    return names


@st.composite
def recipe_cases(draw, composition: str):
    """``(model kind, recipe dict, prompts)`` around one composition (see ``COMPOSITIONS``)."""
    kind, _, rest = composition.partition(":")
    if kind == "recipe":
        data = load_recipe(rest).to_dict()
        data = {k: v for k, v in data.items() if k not in ("name", "description", "source")}
        if isinstance(data.get("policy"), dict) and data["policy"].get("plugin") == "apd":
            data["policy"] = {**data["policy"], "verifier": verifier()}
        if isinstance(data.get("policy"), dict) and data["policy"].get("plugin") == "daedal":
            # the untrained models never predict EOS: rows would grow to the shipped 2048
            data["policy"] = {**data["policy"], "max_gen_length": 24}
    elif kind == "plugin":
        name, slot = rest.split(":")
        data = _slots_for_plugin(draw, name, slot)
    else:
        data = _slots_for_pair(draw, rest)
    data = {k: v for k, v in data.items() if v not in (None, [], {})}
    data["generation"] = gen = _generation(draw)
    for entry in _entries(data):
        # construct valid recipes where cheap: Dream's forced first token needs 2 steps per block
        if entry.get("first_token") and entry.get("alg") != "confidence_threshold" \
                and gen["steps"] // (gen["gen_length"] // gen["block_length"]) < 2:
            entry["first_token"] = False
    model_kind = draw(st.sampled_from(_kinds(data)))
    token = st.integers(2, VOCAB - 1).filter(lambda t: t != MASK)
    prompts = draw(st.lists(st.lists(token, min_size=1, max_size=10), min_size=1, max_size=4))
    return model_kind, data, prompts


# ----------------------------------------------------------------------------- the check


def _entries(data: dict):
    for key, value in data.items():
        if key != "generation" and isinstance(value, dict):
            yield value


def check_case(model_kind: str, data: dict, prompts: list[list[int]], pm=None) -> str:
    """Refused cleanly, or every invariant of ``check_invariants`` holds. Returns what was done."""
    m = model(model_kind)
    pm = pm or get_plugin_manager()
    unsupported = sorted(n for n in _names(data) if n in PLUGINS and PLUGINS[n].meta.families
                         and m.spec.family not in PLUGINS[n].meta.families)
    try:
        recipe = recipe_from_dict({**data, "generation": {**data["generation"], "batch_size": len(prompts)}})
        Decoder(m, recipe, pm=pm)
    except DllmDecodeError as exc:
        message = str(exc)
        # a clean refusal names what it refuses: a plugin, a slot or a generation key
        named = [w for w in [*_names(data), *data, *data["generation"]] if w in message]
        assert named, f"refusal names nothing of the recipe: {message}"
        if unsupported and any(n in message for n in unsupported):
            event(f"refused (family): {', '.join(unsupported)} on {model_kind}")
            return "refused-family"
        event(f"refused by the recipe checks: {message.splitlines()[0][:90]}")
        assume(False)
    assert not unsupported, f"{unsupported} accepted a {m.spec.family} model it does not support"
    event("sampled (T > 0)" if data["generation"]["temperature"] > 0 else "greedy (T = 0)")
    check_invariants(m, data, prompts, pm=pm)
    return "checked"


# tiny tensors: intra-op threads only add synchronisation (over ten times slower on a busy machine)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


DEFAULT = settings(max_examples=3, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SLOW = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("composition", COMPOSITIONS)
@DEFAULT
@given(data=st.data())
def test_invariants_sample(composition, data):
    check_case(*data.draw(recipe_cases(composition), label="case"))


@pytest.mark.slow
@pytest.mark.parametrize("composition", COMPOSITIONS)
@SLOW
@given(data=st.data())
def test_invariants_at_scale(composition, data):
    check_case(*data.draw(recipe_cases(composition), label="case"))


# ----------------------------------------------------------------------------- the check can fail


class BatchSized:
    """Commits as many tokens per step as the batch has rows: fine alone, wrong in a batch."""

    @hookimpl
    def select_tokens(self, state, candidates):
        conf = candidates.confidence.masked_fill(~candidates.eligible, float("-inf"))    # (B, L)
        k = min(state.batch_size, conf.shape[1])
        top = conf.topk(k, dim=1).indices
        return torch.zeros_like(candidates.eligible).scatter(1, top, True) & candidates.eligible


class GlobalRandom:
    """Picks a position with the process-wide generator instead of ``state.generator``."""

    @hookimpl
    def select_tokens(self, candidates):
        noise = torch.rand(candidates.eligible.shape, dtype=torch.float64)             # (B, L)
        pick = noise.masked_fill(~candidates.eligible, -1.0).argmax(dim=1, keepdim=True)
        return torch.zeros_like(candidates.eligible).scatter(1, pick, True) & candidates.eligible


class OutOfSpan:
    """Commits the last masked column of the canvas, wherever the span is."""

    @hookimpl
    def select_tokens(self, state, candidates):
        masked = state.x == state.mask_id                                               # (B, L)
        cols = torch.arange(masked.shape[1], device=masked.device)
        last = torch.where(masked, cols, -1).max(dim=1, keepdim=True).values.clamp(min=0)
        return torch.zeros_like(masked).scatter(1, last, True) & masked


BROKEN = {"batch_sized": (BatchSized, InvariantViolation, "differs from the row alone"),
          "global_random": (GlobalRandom, InvariantViolation, "second run|differs from the row alone"),
          "out_of_span": (OutOfSpan, DllmDecodeError, "out_of_span")}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_strategy_catches_a_broken_plugin(broken):
    """The same strategy and check, with a broken selection plugin in the select_tokens slot of
    the drawn recipes: hypothesis must find a recipe where it fails."""
    plugin, error, match = BROKEN[broken]
    pm = get_plugin_manager(extra_plugins={broken: plugin()})

    @settings(max_examples=40, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=recipe_cases("recipe:llada"))
    def run(case):
        kind, data, prompts = case
        check_case(kind, {**data, "select_tokens": broken}, prompts, pm=pm)

    with pytest.raises(error, match=match):
        run()


def test_wino_refuses_a_dream_model_cleanly():
    """The strategy's family rule, shown once outside hypothesis: WINO is LLaDA-family only."""
    data = {"policy": "wino", "generation": {"gen_length": 8, "block_length": 4, "steps": 8, "dtype": "float64"}}
    with pytest.raises(RecipeError, match="wino"):
        Decoder(model("dream"), recipe_from_dict(data))
    check_invariants(model("llada"), data, [[5, 6, 7], [8]])
