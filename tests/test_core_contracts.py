"""Contracts of the reshaped core: what score and cache_policy may return, extras spread onto the
canvas, slot pairing declared in metadata, families, the public step iterator."""

import pytest
import torch

from dllm_decode import (Candidates, ComputePlan, Decoder, InputError, PluginError, PluginMeta, RecipeError,
                         hookimpl, load_recipe)
from dllm_decode.config import recipe_from_dict
from dllm_decode.models import build_random_model
from dllm_decode.plugins import get_plugin_manager
from dllm_decode.testing import RandomLogitsModel

GEN = {"gen_length": 8, "block_length": 4, "steps": 8}


def _decoder(plugins: dict, recipe: dict, model=None) -> Decoder:
    pm = get_plugin_manager(extra_plugins=plugins)
    return Decoder(model or RandomLogitsModel(), recipe_from_dict({"generation": GEN, **recipe}), pm=pm)


class Score:
    def __init__(self, fn):
        self.fn = fn

    @hookimpl
    def score(self, state, logits, positions):
        return self.fn(state, logits, positions)


def _greedy(logits):
    tokens = logits.argmax(-1)
    return tokens, torch.softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]


@pytest.mark.parametrize("bad", ["vocab", "negative", "mask"])
def test_score_proposing_ids_the_model_cannot_take_is_caught_at_the_step(bad):
    def score(state, logits, positions):
        tokens, conf = _greedy(logits)
        wrong = {"vocab": logits.shape[-1] + 3, "negative": -1, "mask": state.mask_id}[bad]
        return Candidates(tokens=torch.full_like(tokens, wrong), confidence=conf)
    dec = _decoder({"bad": Score(score)}, {"policy": "llada", "score": "bad"})
    with pytest.raises(PluginError, match=r"score plugin 'bad' at step 0: proposed token ids outside the "
                                          r"vocabulary \[0, 48\) or the mask id 47"):
        dec.generate([[3, 4, 5]])


class Cache:
    def __init__(self, value):
        self.value = value
        self.dllm_meta = PluginMeta(requires=())

    @hookimpl
    def cache_policy(self, state):
        return self.value


@pytest.mark.parametrize("value", ["refresh", 3, ComputePlan.full])
def test_cache_policy_output_is_checked(value):
    dec = _decoder({"bad": Cache(value)}, {"policy": "llada", "cache_policy": "bad"},
                   model=build_random_model("llada", vocab_size=48, mask_token_id=47))
    with pytest.raises(PluginError, match="cache_policy plugin 'bad' at step 0: returned .*expected a ComputePlan"):
        dec.generate([[3, 4, 5]])


def test_a_plan_for_a_model_without_plans_names_the_plugin():
    dec = _decoder({"bad": Cache(ComputePlan.full())}, {"policy": "llada", "cache_policy": "bad"})
    with pytest.raises(PluginError, match="cache_policy plugin 'bad'.*runs only plain forwards"):
        dec.generate([[3, 4, 5]])


class Extra:
    """score puts a per-position tensor in extra; select_tokens records what it sees."""

    def __init__(self, value=None):
        self.seen, self.value = [], value

    @hookimpl
    def score(self, state, logits, positions):
        tokens, conf = _greedy(logits)
        cols = torch.arange(state.length)[None, :].expand(state.batch_size, -1)
        where = cols if positions is None else positions
        extra = self.value if self.value is not None else (where + 100).to(torch.float64)   # (B, q)
        return Candidates(tokens=tokens, confidence=conf, extra={"col": extra})

    @hookimpl
    def select_tokens(self, state, candidates):
        self.seen.append(candidates.extra["col"])
        best = candidates.confidence == candidates.confidence.max(dim=1, keepdim=True).values
        return best & candidates.eligible


class Window:
    dllm_meta = PluginMeta(requires=("compute_plans",))

    @hookimpl
    def cache_policy(self, state):
        return ComputePlan.window(state.gen_start, state.length)


def test_extra_is_spread_onto_the_canvas_like_the_candidates():
    plugin = Extra()
    model = build_random_model("llada", vocab_size=48, mask_token_id=47)
    dec = _decoder({"ex": plugin, "win": Window()}, {"choose_span": "llada", "score": "ex",
                                                     "select_tokens": "ex", "cache_policy": "win"}, model=model)
    dec.generate([[3, 4, 5]])
    col = plugin.seen[0]                                                    # (1, L)
    assert col.shape == (1, 11)
    assert col[0, :3].tolist() == [0.0] * 3                                 # the prompt was not queried
    assert col[0, 3:].tolist() == [c + 100.0 for c in range(3, 11)]         # each at its own column


def test_extra_must_be_per_position():
    dec = _decoder({"ex": Extra(value=torch.zeros(1))}, {"policy": "llada", "score": "ex", "select_tokens": "ex"})
    with pytest.raises(PluginError, match=r"score plugin 'ex' at step 0: extra\['col'\] is \(1,\).*Candidates.info"):
        dec.generate([[3, 4, 5]])


class Paired:
    dllm_meta = PluginMeta(pairs=(("select_tokens", "score"),))

    @hookimpl
    def score(self, state, logits):
        return Candidates(*_greedy(logits))

    @hookimpl
    def select_tokens(self, state, candidates):
        return candidates.confidence == candidates.confidence.max(dim=1, keepdim=True).values


def test_slot_pairing_declared_in_metadata_is_enforced_at_load():
    with pytest.raises(RecipeError, match=r"select_tokens: plugin 'mine' needs its own score hook; set "
                                          r"`score: mine` too"):
        _decoder({"mine": Paired()}, {"policy": "llada", "select_tokens": "mine"})
    _decoder({"mine": Paired()}, {"policy": "llada", "select_tokens": "mine", "score": "mine"})   # fine


@pytest.mark.parametrize("name,slots", [("wino", {"score": "wino", "cache_policy": "wino"}),
                                        ("apd", {"score": "apd"}), ("prophet", {"score": "prophet"})])
def test_built_in_pairings_are_declared(name, slots):
    select_only = {"policy": "llada", "select_tokens": name}
    extra = {"verifier": "models/ar-reference"} if name == "apd" else {}
    if extra:
        select_only["select_tokens"] = {"plugin": name, **extra}
    with pytest.raises(RecipeError, match=f"`score: {name}`"):
        _decoder({}, select_only)


def test_a_plugin_limited_to_a_family_is_refused_when_the_recipe_meets_the_model():
    dream = build_random_model("dream", vocab_size=48, mask_token_id=47)
    with pytest.raises(RecipeError, match=r"plugin 'wino' supports model families \['llada'\], not this dream "
                                          r"model \(DreamModel\)"):
        _decoder({}, {"policy": "wino"}, model=dream)


@pytest.mark.parametrize("recipe", [{"policy": "llada", "cache_policy": "dllm_cache"},
                                    {"policy": "llada", "cache_policy": "kv_block"},
                                    {"policy": "slowfast", "score": "llada", "cache_policy": "slowfast_tail"},
                                    {"policy": "llada", "cache_policy": "elastic_cache"},
                                    {"choose_span": "llada", "score": "d2cache", "select_tokens": "d2cache",
                                     "cache_policy": "d2cache"}])
def test_whole_canvas_plugins_are_refused_on_a_block_causal_model(recipe):
    """Feature reuse, shadow queries and the layer-adaptive executor have no block-causal form:
    refused when the recipe meets the model, not mid-decode."""
    sdar = build_random_model("sdar", vocab_size=48, mask_token_id=47, block_size=4)
    name = recipe["cache_policy"]
    with pytest.raises(RecipeError, match=rf"plugin '{name}' needs attention over the whole canvas, but "
                                          r"SDARModel is a block-causal sdar model \(blocks of 4\)"):
        _decoder({}, recipe, model=sdar)
    _decoder({}, {"policy": "llada", "cache_policy": "block_kv"}, model=sdar)   # its exact block cache is fine


def test_eos_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(InputError, match=r"generation.eos.ids \[99\] lie outside the model's vocabulary \[0, 48\)"):
        Decoder(RandomLogitsModel(), recipe_from_dict({"policy": "llada", "generation": {
            **GEN, "eos": {"stop": True, "ids": [99]}}}))


def test_max_steps_below_the_schedule_is_refused_at_load():
    with pytest.raises(RecipeError, match=r"max_steps \(4\) is below the 8 steps"):
        recipe_from_dict({"policy": "llada", "generation": {**GEN, "max_steps": 4}})


def test_load_recipe_takes_a_shipped_name():
    assert load_recipe("threshold").source.endswith("threshold.yaml")


def test_steps_iterator_yields_every_step_and_matches_generate():
    dec = Decoder(RandomLogitsModel(), recipe_from_dict({"policy": "llada", "generation": GEN}))
    seen = [(state.step, int(state.last.committed.sum()), state) for state in dec.steps([[3, 4, 5]])]
    assert [s for s, _, _ in seen] == list(range(1, 9))                    # one token per step, 8 steps
    assert [n for _, n, _ in seen] == [1] * 8
    final = seen[-1][2]
    assert all(state is final for _, _, state in seen)                     # one state, advanced
    assert final.generated().tolist() == dec.generate([[3, 4, 5]]).tokens
    assert "seconds" in final.timings and not final.scratch                # the request was finished
