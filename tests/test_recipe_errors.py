"""Every malformed recipe is refused at load time with the file, slot and key named."""

import textwrap

import pytest

from dllm_decode.config import load_recipe, recipe_from_dict
from dllm_decode.errors import RecipeError
from dllm_decode.policy import resolve

GOOD = """
generation: {gen_length: 16, block_length: 8, steps: 16}
choose_span: llada
score: {plugin: llada, remasking: low_confidence}
select_tokens: llada
"""


def _load(tmp_path, text, overrides=()):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return path, load_recipe(path, overrides=list(overrides))


def _error(tmp_path, pm, text, overrides=()):
    with pytest.raises(RecipeError) as info:
        path, recipe = _load(tmp_path, text, overrides)
        resolve(recipe, pm)
    message = str(info.value)
    assert str(tmp_path / "r.yaml") in message, message
    return message


def test_good_recipe_loads(tmp_path, pm):
    _, recipe = _load(tmp_path, GOOD)
    bound = resolve(recipe, pm)
    assert bound.plugin_for("select_tokens") == "llada"
    assert bound.plugin_for("cache_policy") is None


def test_invalid_yaml(tmp_path, pm):
    assert "invalid YAML" in _error(tmp_path, pm, "generation: {gen_length: 16\n")


def test_not_a_mapping(tmp_path, pm):
    assert "must be a mapping" in _error(tmp_path, pm, "- llada\n")


def test_yaml_tags_are_not_executed(tmp_path, pm):
    assert "invalid YAML" in _error(tmp_path, pm, "name: !!python/object/apply:os.system ['true']\n")


def test_unknown_top_level_key(tmp_path, pm):
    assert "unknown key 'genration'" in _error(tmp_path, pm, GOOD + "genration: {steps: 3}\n")


def test_unknown_generation_key(tmp_path, pm):
    assert "unknown key 'generation.stepz'" in _error(tmp_path, pm, GOOD.replace("steps: 16", "stepz: 16"))


def test_wrong_type(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD.replace("gen_length: 16", "gen_length: lots"))
    assert "generation.gen_length" in msg and "'lots'" in msg


def test_out_of_range(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD.replace("steps: 16", "steps: 0"))
    assert "generation.steps" in msg and "greater than or equal to 1" in msg


def test_block_must_divide(tmp_path, pm):
    assert "block_length (8) must divide gen_length (12)" in _error(
        tmp_path, pm, GOOD.replace("gen_length: 16", "gen_length: 12"))


def test_unknown_plugin(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD.replace("select_tokens: llada", "select_tokens: nosuch"))
    assert "select_tokens: unknown plugin 'nosuch'" in msg and "llada" in msg


def test_unknown_plugin_parameter(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD.replace("remasking: low_confidence", "remaskin: low_confidence"))
    assert "score.remaskin: unknown parameter" in msg and "[plugin 'llada']" in msg and "remasking" in msg


def test_bad_plugin_parameter_value(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD.replace("remasking: low_confidence", "remasking: sometimes"))
    assert "score.remasking" in msg and "'sometimes'" in msg


def test_plugin_that_does_not_fill_the_slot(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD + "cache_policy: llada\n")
    assert "cache_policy: plugin 'llada' does not implement 'cache_policy'" in msg


def test_empty_required_slot(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD.replace("select_tokens: llada\n", ""))
    assert "slot 'select_tokens' is empty" in msg


def test_incompatible_combination(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD.replace("steps: 16", "steps: 7"))
    assert "[plugin 'llada']" in msg and "generation.steps (7) must be a multiple of the number of blocks (2" in msg


def test_too_many_steps_per_block(tmp_path, pm):
    msg = _error(tmp_path, pm, GOOD.replace("steps: 16", "steps: 32"))
    assert "16 steps per block but a block has only 8" in msg


def test_contradicting_parameters_across_slots(tmp_path, pm):
    text = GOOD.replace("select_tokens: llada", "select_tokens: {plugin: llada, remasking: random}")
    msg = _error(tmp_path, pm, text)
    assert "select_tokens.remasking" in msg and "contradicts" in msg and "score.remasking" in msg


def test_blocked_plugin(tmp_path, monkeypatch):
    from dllm_decode.plugins import get_plugin_manager

    monkeypatch.setenv("DLLM_DECODE_BLOCK", "llada")
    msg = _error(tmp_path, get_plugin_manager(), GOOD)
    assert "plugin 'llada' is blocked" in msg


def test_a_source_key_is_refused_not_ignored(tmp_path, pm):
    assert "unknown key 'source'" in _error(tmp_path, pm, GOOD + "source: elsewhere.yaml\n")


def test_a_folder_named_like_a_shipped_recipe_does_not_hide_it(tmp_path, monkeypatch):
    from dllm_decode.recipes import find_recipe, shipped_recipes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sdar").mkdir()                   # e.g. a checkpoint folder
    assert find_recipe("sdar") == shipped_recipes()["sdar"] and load_recipe("sdar").name == "sdar"
    (tmp_path / "mine").mkdir()
    with pytest.raises(RecipeError, match="mine: cannot read recipe"):
        load_recipe("mine")
    (tmp_path / "llada").write_text(GOOD)         # a file of that name is the user's choice
    assert find_recipe("llada").resolve() == (tmp_path / "llada").resolve()


def test_missing_file():
    with pytest.raises(RecipeError, match="nowhere.yaml: cannot read recipe"):
        load_recipe("nowhere.yaml")


def test_set_overrides(tmp_path, pm):
    _, recipe = _load(tmp_path, GOOD, ["generation.steps=8", "score.remasking=random", "select_tokens.remasking=random"])
    assert recipe.generation.steps == 8
    assert resolve(recipe, pm).options["llada"].remasking == "random"


def test_set_override_errors_name_the_key(tmp_path, pm):
    with pytest.raises(RecipeError, match="select_tokens.treshold: unknown parameter"):
        resolve(_load(tmp_path, GOOD, ["select_tokens.treshold=0.9"])[1], pm)
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        _load(tmp_path, GOOD, ["generation.steps"])
    with pytest.raises(RecipeError, match="--set generation.temperature=-1: generation.temperature"):
        _load(tmp_path, GOOD, ["generation.temperature=-1"])


def test_policy_shorthand_fills_the_plugins_slots(pm):
    recipe = recipe_from_dict({"policy": {"plugin": "llada", "remasking": "random"}})
    bound = resolve(recipe, pm)
    assert {s: bound.plugin_for(s) for s in ("choose_span", "score", "select_tokens")} == dict.fromkeys(
        ("choose_span", "score", "select_tokens"), "llada")
    assert bound.options["llada"].remasking == "random"


def test_dump_round_trips(tmp_path, pm):
    _, recipe = _load(tmp_path, GOOD)
    again = recipe_from_dict(__import__("yaml").safe_load(recipe.dump()))
    assert again.to_dict() == recipe.to_dict()


def test_shipped_recipes_resolve(pm):
    from dllm_decode.recipes import shipped_recipes

    shipped = shipped_recipes()
    assert "llada" in shipped
    for path in shipped.values():
        resolve(load_recipe(path), pm)


def test_duplicate_keys_are_refused_with_file_key_and_line(tmp_path):
    text = "generation:\n  gen_length: 16\n  steps: 16\n  steps: 8\nchoose_span: llada\n"
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, text)
    msg = str(info.value)
    assert str(tmp_path / "r.yaml") in msg and "line 4" in msg and "'steps'" in msg and "line 3" in msg
    with pytest.raises(RecipeError, match="line 2: duplicate key 'score'"):
        _load(tmp_path, "score: llada\nscore: {plugin: llada}\n")
    with pytest.raises(RecipeError, match=r"--set.*duplicate key 'plugin'"):
        _load(tmp_path, GOOD, ["score={plugin: llada, plugin: threshold}"])


def test_set_keys_are_blamed_on_the_set_not_the_file(tmp_path, pm):
    from dllm_decode.config import resolve_recipe

    path = str(tmp_path / "r.yaml")
    for over, needle in [("select_tokens.treshold=0.9", "--set select_tokens.treshold=0.9: select_tokens.treshold: "
                                                        "unknown parameter"),
                         ("score=nosuch", "--set score=nosuch: score: unknown plugin 'nosuch'"),
                         ("generation.temperature=-1", "--set generation.temperature=-1: generation.temperature:"),
                         ("score.remasking=sideways", "--set score.remasking=sideways: score.remasking:")]:
        with pytest.raises(RecipeError) as info:
            resolve_recipe(_load(tmp_path, GOOD, [over])[1], pm)
        assert needle in str(info.value) and f"{path}: " not in str(info.value), str(info.value)
    # a value of the file that a --set made invalid: both are named
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, GOOD, ["generation.gen_length=12"])
    assert f"{path} with --set generation.gen_length=12: generation:" in str(info.value)
    # keys the --set did not touch stay the file's
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, GOOD.replace("steps: 16", "steps: -1"), ["generation.temperature=0.5"])
    assert f"{path}: generation.steps" in str(info.value)


def test_shipped_recipes_hold_the_longest_reference_answer():
    """A canvas shorter than an answer cuts it: every shipped recipe made for the reference models
    (no model.path of its own) fits the longest answer of their tasks, with EOS after it. A recipe
    with a canvas rule (resize_canvas, DAEDAL) starts shorter and grows rows as they need."""
    from dllm_decode.measure.tasks import REFERENCE_MIX, get_task
    from dllm_decode.plugins import get_plugin_manager
    from dllm_decode.policy import resolve
    from dllm_decode.recipes import shipped_recipes

    longest = max(get_task(name).max_answer_tokens for name in REFERENCE_MIX)
    pm = get_plugin_manager()
    short = {name: load_recipe(path).generation.gen_length for name, path in shipped_recipes().items()
             if load_recipe(path).generation.gen_length <= longest and not resolve(load_recipe(path), pm).resizes}
    assert not short, f"shipped recipes with gen_length <= {longest}: {short}"
