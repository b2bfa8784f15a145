"""The engine refuses plugins and models that break the step contracts, naming who and when."""

import math

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import InputError, ModelOutputError, PluginError
from dllm_decode.hookspecs import hookimpl
from dllm_decode.plugins import PluginMeta, get_plugin_manager
from dllm_decode.state import Selection
from dllm_decode.testing import RandomLogitsModel


class Select:
    def __init__(self, fn, revocable=False):
        self.fn = fn
        self.dllm_meta = PluginMeta(revocable=revocable)

    @hookimpl
    def select_tokens(self, state, candidates):
        return self.fn(state, candidates)


def _run(fn, revocable=False, model=None, gen=8, **gen_kw):
    pm = get_plugin_manager(extra_plugins={"bad": Select(fn, revocable)})
    recipe = recipe_from_dict({"policy": "llada", "select_tokens": "bad",
                               "generation": {"gen_length": gen, "block_length": 4, "steps": gen, **gen_kw}})
    return Decoder(model or RandomLogitsModel(), recipe, pm=pm).generate([[3, 4, 5]], keep_states=True)


def _best(candidates):
    conf = candidates.confidence
    return conf == conf.max(dim=1, keepdim=True).values


def test_commit_outside_span_is_refused():
    def outside(state, cand):
        sel = _best(cand)
        sel[:, -1] = True                     # last column lies outside the first block
        return sel
    with pytest.raises(PluginError, match=r"select_tokens plugin 'bad' at step 0: committed positions .*\[\[0, 10\]\]"):
        _run(outside)


def test_commit_on_prompt_is_refused():
    def prompt(state, cand):
        sel = _best(cand)
        sel[:, 0] = True
        return sel
    with pytest.raises(PluginError, match="not masked"):
        _run(prompt)


def test_stall_is_refused():
    with pytest.raises(PluginError, match=r"select_tokens plugin 'bad' at step 0: committed nothing in unfinished row\(s\) \[0\]"):
        _run(lambda s, c: torch.zeros_like(c.eligible))


def test_stall_later_names_the_step():
    def late(state, cand):
        return _best(cand) if state.step < 3 else torch.zeros_like(cand.eligible)
    with pytest.raises(PluginError, match="at step 3"):
        _run(late)


def test_plugin_exception_is_wrapped():
    def boom(state, cand):
        raise ZeroDivisionError("oops")
    with pytest.raises(PluginError, match=r"plugin 'bad' raised in select_tokens at step 0: ZeroDivisionError: oops") as info:
        _run(boom)
    assert info.value.plugin == "bad" and info.value.hook == "select_tokens" and info.value.step == 0


def test_wrong_return_type_is_refused():
    with pytest.raises(PluginError, match="expected a tensor of shape"):
        _run(lambda s, c: [1, 2])
    with pytest.raises(PluginError, match="dtype"):
        _run(lambda s, c: _best(c).long())


def test_remask_needs_a_revocable_plugin():
    def remask(state, cand):
        committed = (state.commit_step >= 0)
        return Selection(commit=_best(cand), remask=committed if committed.any() else None)
    with pytest.raises(PluginError, match="does not declare itself revocable"):
        _run(remask)


def test_revocable_remasks_are_recorded():
    def remask_first_once(state, cand):
        commit = _best(cand)
        if state.step == 2:
            first = (state.commit_step == 0)
            return Selection(commit=commit, remask=first)
        return commit
    result = _run(remask_first_once, revocable=True)
    state = result.states[0]
    assert len(state.remask_log) == 1 and state.remask_log[0][0] == 2
    assert state.step == 9                      # the re-masked position cost one more step
    assert not bool((state.x == state.mask_id).any())


class NaNModel(RandomLogitsModel):
    def forward(self, input_ids, attention_mask=None, plan=None, store=None):
        out = super().forward(input_ids, attention_mask)
        if self.calls == 3:
            out[:, 2] = math.nan
        return out


def test_nan_logits_are_reported():
    recipe = recipe_from_dict({"policy": "llada", "generation": {"gen_length": 8, "steps": 8}})
    with pytest.raises(ModelOutputError, match="step 2: the model returned NaN logits"):
        Decoder(NaNModel(), recipe).generate([[3, 4, 5]])


def test_prompt_longer_than_the_model_allows():
    model = RandomLogitsModel(max_length=16)
    recipe = recipe_from_dict({"policy": "llada", "generation": {"gen_length": 8, "steps": 8}})
    with pytest.raises(InputError, match="prompt 1 has 10 tokens; with gen_length 8 the canvas needs 18 positions "
                                         "but the model allows 16"):
        Decoder(model, recipe).generate([[3] * 4, [3] * 10])


def test_prompt_with_mask_token_is_refused():
    model = RandomLogitsModel()
    recipe = recipe_from_dict({"policy": "llada", "generation": {"gen_length": 8, "steps": 8}})
    with pytest.raises(InputError, match="contains the mask token"):
        Decoder(model, recipe).generate([[3, model.spec.mask_token_id]])


def test_counters_and_commit_steps():
    recipe = recipe_from_dict({"policy": "llada", "generation": {"gen_length": 8, "block_length": 4, "steps": 4,
                                                                 "batch_size": 2}})
    result = Decoder(RandomLogitsModel(), recipe).generate([[3, 4], [5, 6, 7]], keep_states=True)
    assert [r.nfe for r in result.rows] == [4, 4]
    for r in result.rows:
        assert sorted(r.commit_step) == [0, 0, 1, 1, 2, 2, 3, 3]      # two tokens per step
        assert max(r.commit_step[:4]) < min(r.commit_step[4:])        # block 1 before block 2
    assert len(result.states[0].confidence_history()) == 4


def test_prompts_that_are_not_lists_of_ids_say_what_was_expected():
    recipe = recipe_from_dict({"policy": "llada", "generation": {"gen_length": 8, "steps": 8}})
    dec = Decoder(RandomLogitsModel(), recipe)
    for prompts, pattern in ((["copy: abc\n"], r"Decoder.generate: prompts\[0\] is text \('copy: abc\\n'\).*tokenizer"),
                             ([3, 4], r"prompts\[0\] is 3, not a list of token ids; for one prompt pass \[ids\]"),
                             ("copy", r"prompts is a str; expected a list of prompts"),
                             ([[3, 4], []], r"prompts\[1\] is empty"),
                             ([[3, 4.5]], r"prompts\[0\] holds 4.5 \(float\); token ids are integers")):
        with pytest.raises(InputError, match=pattern):
            dec.generate(prompts)
    with pytest.raises(InputError, match=r"Decoder.start: prompts\[0\] is text"):
        next(dec.steps(["copy: abc\n"]))
    # rows of an integer tensor are prompts too, decoded as the same ids in lists
    assert dec.generate(torch.tensor([[3, 4], [5, 6]])).tokens == dec.generate([[3, 4], [5, 6]]).tokens


def test_a_recipe_may_be_given_by_name_file_or_mapping():
    """Decoder takes what check_invariants takes: a shipped name, a file, a dict, or a Recipe;
    anything else is refused saying what a recipe is."""
    from dllm_decode.config import load_recipe
    from dllm_decode.errors import RecipeError

    model, prompts = RandomLogitsModel(), [[3, 4], [5, 6, 7]]
    short = ["generation.gen_length=8", "generation.block_length=8", "generation.steps=8"]
    want = Decoder(model, load_recipe("llada", overrides=short)).generate(prompts).tokens
    as_dict = load_recipe("llada", overrides=short).to_dict()
    assert Decoder(model, as_dict).generate(prompts).tokens == want
    assert Decoder(model, "threshold").recipe.name == "threshold"
    assert Decoder(model, load_recipe("threshold").source).recipe.name == "threshold"
    with pytest.raises(RecipeError, match="a recipe is a Recipe, a recipe name or file, or a mapping; got a int"):
        Decoder(model, 3)
