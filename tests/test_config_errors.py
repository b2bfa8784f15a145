"""Recipe errors name what is at fault: a file that is not UTF-8, the ``--set`` that gave a bad
key or value (also where a plugin's own check or an unknown key reports it), and ``--set
SLOT.KEY=V`` on a slot the recipe leaves to ``policy:``."""

import pytest

from dllm_decode.config import load_recipe, recipe_from_dict, resolve_recipe
from dllm_decode.errors import RecipeError
from dllm_decode.recipes import find_recipe


def _refused(pm, recipe, overrides):
    """The message of the error that loading or resolving ``recipe`` with ``overrides`` gives."""
    with pytest.raises(RecipeError) as info:
        resolve_recipe(load_recipe(recipe, overrides=overrides), pm)
    return str(info.value)


# ----------------------------------------------------------------------------- file encoding


def test_a_recipe_that_is_not_utf8_is_refused_naming_file_line_and_byte(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"policy: llada\n# caf\xe9\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: line 2:") and "0xe9" in msg and "position 19" in msg and "UTF-8" in msg, msg


def test_a_utf8_recipe_loads_whatever_the_locale(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("# café: a comment\npolicy: llada\n".encode("utf-8"))
    assert load_recipe(path).policy.plugin == "llada"


# ----------------------------------------------------------------------------- --set is blamed


@pytest.mark.parametrize("recipe, override, rest", [
    ("threshold", "select_token.threshold=0.5", "unknown key 'select_token'"),
    ("threshold", "foo=1", "unknown key 'foo'"),
    ("threshold", "generation.eos.stpo=true", "unknown key 'generation.eos.stpo'"),
    ("threshold", "generation={stpo: 1}", "unknown key 'generation.stpo'"),
    ("threshold", "score=null", "slot 'score' is empty"),
    # a plugin's own check (check_recipe) naming a recipe key, and naming one of its options
    ("dkv-cache", "generation.steps=95", "[plugin 'llada'] generation.steps (95) must be a multiple"),
    ("apd", "policy.verifier=/nonexistent", "[plugin 'apd'] verifier: '/nonexistent' is not a model directory"),
])
def test_errors_a_set_causes_name_the_set_not_the_file(pm, recipe, override, rest):
    msg = _refused(pm, recipe, [override])
    assert msg.startswith(f"--set {override}: {rest}"), msg
    assert str(find_recipe(recipe)) not in msg, msg


def test_a_plugin_check_naming_a_value_a_set_changed_names_file_and_set(pm):
    # gen_length 160 leaves 5 blocks of 32, which the file's 96 steps do not divide
    msg = _refused(pm, "dkv-cache", ["generation.gen_length=160"])
    assert msg.startswith(f"{find_recipe('dkv-cache')} with --set generation.gen_length=160: [plugin 'llada'] "
                          "generation.steps (96)"), msg


def test_an_option_set_in_one_slot_is_blamed_where_another_slot_reports_it(pm):
    # policy and score configure one llada options object; the bad value is reported under score
    with pytest.raises(RecipeError) as info:
        resolve_recipe(recipe_from_dict({"policy": "llada", "score": "llada"}, "r.yaml",
                                        ["policy.remasking=sideways"]), pm)
    assert str(info.value).startswith("--set policy.remasking=sideways: score.remasking: Input should be "), \
        str(info.value)


def test_a_plugin_options_validator_names_the_sets_that_fed_it(pm):
    # prophet's options refuse mid_until below early_until: a check of the options as a whole
    msg = _refused(pm, "prophet", ["policy.mid_until=0.1", "policy.early_until=0.5"])
    assert msg.startswith(f"{find_recipe('prophet')} with --set policy.mid_until=0.1, --set policy.early_until=0.5: "
                          "choose_span.(options): "), msg


# ----------------------------------------------------------------------------- SLOT.KEY on a policy slot


def test_set_slot_key_on_a_slot_the_policy_fills_sets_the_plugins_option(pm):
    # slowfast.yaml: `policy: {plugin: slowfast, variant: code}`, select_tokens not written out
    bound = resolve_recipe(load_recipe("slowfast", overrides=["select_tokens.tau_high=0.5"]), pm)
    assert bound.plugin_for("select_tokens") == "slowfast"
    assert bound.options["slowfast"].tau_high == 0.5
    same = resolve_recipe(load_recipe("slowfast", overrides=["policy.tau_high=0.5"]), pm)
    assert bound.options == same.options


def test_set_slot_key_replaces_a_value_the_policy_gives(pm):
    # credit.yaml's policy gives threshold 0.9: one plugin has one value, the override's
    bound = resolve_recipe(load_recipe("credit", overrides=["select_tokens.threshold=0.5"]), pm)
    assert bound.options["credit"].threshold == 0.5


def test_set_slot_key_on_a_policy_slot_reports_an_unknown_option_as_the_sets(pm):
    msg = _refused(pm, "slowfast", ["select_tokens.threshold=0.5"])
    assert msg.startswith("--set select_tokens.threshold=0.5: select_tokens.threshold: unknown parameter "
                          "[plugin 'slowfast']"), msg
    assert "Value error" not in msg and "a slot needs" not in msg, msg


def test_set_slot_key_on_a_slot_the_policy_does_not_fill(pm):
    data = {"policy": "slowfast", "score": "llada"}          # slowfast fills no cache_policy
    with pytest.raises(RecipeError) as info:
        resolve_recipe(recipe_from_dict(data, "r.yaml", ["cache_policy.refresh_interval=8"]), pm)
    msg = str(info.value)
    assert msg.startswith("--set cache_policy.refresh_interval=8: cache_policy: plugin 'slowfast' does not "
                          "implement 'cache_policy'") and "--set cache_policy.plugin=NAME" in msg, msg
    # naming the plugin, before or after the option, is the same recipe
    for order in (["cache_policy.refresh_interval=8", "cache_policy.plugin=dkv_cache"],
                  ["cache_policy.plugin=dkv_cache", "cache_policy.refresh_interval=8"]):
        bound = resolve_recipe(recipe_from_dict(data, "r.yaml", order), pm)
        assert bound.plugin_for("cache_policy") == "dkv_cache" and bound.options["dkv_cache"].refresh_interval == 8
    assert data == {"policy": "slowfast", "score": "llada"}  # the caller's mapping is left as it was


def test_set_slot_key_without_a_policy_blames_the_set():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"choose_span": "llada", "score": "llada"}, "r.yaml", ["select_tokens.threshold=0.5"])
    assert str(info.value) == ("--set select_tokens.threshold=0.5: select_tokens: a slot needs `plugin: NAME` "
                               "(or just the plugin name); got {'threshold': 0.5}")


# ----------------------------------------------------------------------------- message shape


def test_section_validator_messages_are_plain(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("policy: llada\ngeneration: {gen_length: 32, block_length: 5, temperature: 0.5}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: generation: block_length (5) must divide gen_length (32)"
