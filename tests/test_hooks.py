"""Hook contracts: documented, bound per slot, unknown hooks refused, blocking and tracing."""

import inspect
import types

import pytest
import torch

from dllm_decode import hookspecs
from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import PluginError
from dllm_decode.hookspecs import hookimpl
from dllm_decode.plugins import get_plugin_manager, list_plugins
from dllm_decode.policies import llada


def _specs():
    return [(name, fn) for name, fn in vars(hookspecs).items()
            if callable(fn) and hasattr(fn, "dllm_decode_spec")]


def test_every_hook_is_documented():
    specs = _specs()
    assert {n for n, _ in specs} >= {*hookspecs.SLOTS, *hookspecs.OBSERVERS}
    for name, fn in specs:
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 60, f"hook {name} lacks documentation"
        params = [p for p in inspect.signature(fn).parameters if p not in ("options", "scratch", "state", "aux")]
        for p in params:  # shared arguments are documented once in the module docstring
            assert f":param {p}:" in doc, f"hook {name} does not document parameter {p!r}"
        assert ":return" in doc or "Return value ignored" in doc, f"hook {name} has no return contract"
        for p in inspect.signature(fn).parameters.values():
            assert p.annotation is not inspect.Parameter.empty, f"hook {name}.{p.name} is untyped"
    for shared in ("``state``", "``options``", "``scratch``", "``aux``"):
        assert shared in hookspecs.__doc__


def test_decision_hooks_are_firstresult_and_observers_fan_out():
    for name, fn in _specs():
        first = fn.dllm_decode_spec.get("firstresult", False)
        assert first == (name in hookspecs.SLOTS), name


class MultiSlot:
    """Implements span and selection, sharing per-request state through ``scratch``."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def on_request_start(self, scratch):
        scratch["spans_chosen"] = 0

    @hookimpl
    def choose_span(self, state, scratch):
        self.calls.append("choose_span")
        scratch["spans_chosen"] += 1
        return llada.current_block(state)

    @hookimpl
    def select_tokens(self, candidates, scratch):
        self.calls.append("select_tokens")
        assert scratch["spans_chosen"] > 0          # state shared with its own span hook
        conf = candidates.confidence
        return conf == conf.max(dim=1, keepdim=True).values   # one token per step

    @hookimpl
    def on_request_end(self, scratch):
        self.calls.append(("end", scratch["spans_chosen"]))


def _decode(pm, slots, gen=16, model=None):
    from dllm_decode.testing import RandomLogitsModel

    model = model or RandomLogitsModel(seed=3)
    recipe = recipe_from_dict({"generation": {"gen_length": gen, "block_length": 8, "steps": gen, "batch_size": 2},
                              **slots})
    return Decoder(model, recipe, pm=pm).generate([[4, 5, 6], [7, 8]], keep_states=True)


def test_swapping_one_slot_changes_only_that_slot():
    multi = MultiSlot()
    pm = get_plugin_manager(extra_plugins={"multi": multi})
    both = _decode(pm, {"choose_span": "multi", "score": "llada", "select_tokens": "multi"})
    assert multi.calls.count("select_tokens") == 16 and multi.calls[-1] == ("end", 16)

    multi.calls.clear()
    swapped = _decode(pm, {"choose_span": "multi", "score": "llada", "select_tokens": "llada"})
    assert "select_tokens" not in multi.calls                 # its selection is out of the recipe
    assert multi.calls.count("choose_span") == 16             # its span stays in
    assert multi.calls[-1] == ("end", 16)                     # and keeps its shared state

    baseline = _decode(pm, {"policy": "llada"})
    assert swapped.tokens == baseline.tokens                  # one token/step with llada's own order
    # spans recorded each step are the same: only the selection slot changed hands.
    assert all(torch.equal(a.span, b.span) for a, b in zip(swapped.states[0].history, baseline.states[0].history))


def test_plugins_outside_the_recipe_are_not_called():
    multi = MultiSlot()
    pm = get_plugin_manager(extra_plugins={"multi": multi})
    _decode(pm, {"policy": "llada"})
    assert multi.calls == []


def test_unknown_hook_is_refused():
    bad = types.SimpleNamespace()

    @hookimpl
    def selct_tokens(candidates):  # misspelt
        return None

    bad.selct_tokens = selct_tokens
    with pytest.raises(PluginError, match="selct_tokens"):
        get_plugin_manager(extra_plugins={"typo": bad})


def test_block_by_name(monkeypatch):
    assert "llada" not in {i.name for i in list_plugins(get_plugin_manager(block=["llada"]))}
    monkeypatch.setenv("DLLM_DECODE_BLOCK", "none, llada")
    names = {i.name for i in list_plugins(get_plugin_manager())}
    assert not names & {"none", "llada"}


def test_tracing_env_var_writes_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("DLLM_DECODE_TRACE", "1")
    _decode(get_plugin_manager(), {"policy": "llada"}, gen=8)
    err = capsys.readouterr().err
    for hook in ("choose_span", "score", "select_tokens"):
        assert hook in err


def test_builtins_come_from_the_entry_point_group(pm):
    infos = {i.name: i for i in list_plugins(pm)}
    assert infos["llada"].distribution == "dllm-decode"
    assert infos["llada"].slots == ("choose_span", "score", "select_tokens")
    assert infos["none"].meta.exact is True


def test_two_decoders_do_not_share_state():
    from dllm_decode.testing import RandomLogitsModel

    model = RandomLogitsModel(seed=5)
    r1 = recipe_from_dict({"policy": "llada", "generation": {"gen_length": 8, "steps": 8}})
    r2 = recipe_from_dict({"policy": "llada", "generation": {"gen_length": 8, "steps": 4}})
    d1, d2 = Decoder(model, r1), Decoder(model, r2)
    alone = d1.generate([[3, 4]]).tokens
    s1, s2 = d1.start([[3, 4]]), d2.start([[3, 4]])
    while not (bool(s1.done.all()) and bool(s2.done.all())):   # interleave the two requests
        for d, s in ((d1, s1), (d2, s2)):
            if not bool(s.done.all()):
                d.step(s)
    assert s1.generated().tolist() == alone
    assert s1.scratch["llada"] is not s2.scratch["llada"]


BROKEN_PACKAGE = {"broken_policy": "raise ImportError('needs torch 9')",
                  "odd_policy": "from dllm_decode.hookspecs import hookimpl\n\n@hookimpl\ndef no_such_hook(state):\n    pass\n"}


@pytest.fixture
def broken_install(tmp_path, monkeypatch):
    from fake_dist import install_fake_distribution

    root = install_fake_distribution(tmp_path / "site", "someone-elses-plugins",
                                      {"broken_one": "broken_policy", "odd_one": "odd_policy"}, BROKEN_PACKAGE)
    monkeypatch.syspath_prepend(str(root))
    return root


def test_a_broken_installed_plugin_is_reported_and_skipped(broken_install):
    from dllm_decode.plugins import BrokenPluginWarning, broken_plugins

    with pytest.warns(BrokenPluginWarning) as caught:
        pm = get_plugin_manager()
    text = "\n".join(str(w.message) for w in caught)
    assert "plugin 'broken_one' (entry point 'broken_policy', distribution someone-elses-plugins 1.0)" in text
    assert "ImportError: needs torch 9" in text and "'odd_one'" in text and "no_such_hook" in text
    assert pm.get_plugin("llada") is not None and pm.get_plugin("odd_one") is None   # built-ins stay
    rows = {i.name: i for i in broken_plugins(pm)}
    assert set(rows) == {"broken_one", "odd_one"} and "needs torch 9" in rows["broken_one"].broken
    recipe = recipe_from_dict({"policy": "llada", "select_tokens": "broken_one"}, source="r.yaml")
    from dllm_decode.errors import RecipeError
    from dllm_decode.policy import resolve

    with pytest.raises(RecipeError, match=r"r.yaml: select_tokens: plugin 'broken_one' .*failed to load: "
                                          r"ImportError: needs torch 9"):
        resolve(recipe, pm)
    assert resolve(recipe_from_dict({"policy": "llada"}), pm).plugin_for("select_tokens") == "llada"


def test_a_broken_plugin_shows_in_the_plugins_command(broken_install):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).with_name("dllm-decode"))
    env = {**os.environ, "PYTHONPATH": str(broken_install)}
    out = subprocess.run([cli, "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "broken_one  [someone-elses-plugins 1.0]  (BROKEN)" in out.stdout and "needs torch 9" in out.stdout
    assert "dllm-decode: warning: plugin 'broken_one'" in out.stderr and "Traceback" not in out.stderr
    rows = {r["name"]: r for r in json.loads(subprocess.run([cli, "plugins", "--json"], capture_output=True,
                                                            text=True, env=env, timeout=120).stdout)}
    assert "needs torch 9" in rows["broken_one"]["broken"] and rows["llada"]["broken"] is None


# ----------------------------------------------------------------------------- third-party faults


SELECT_ONE = ("import torch\nfrom dllm_decode import hookimpl, topk_mask\n\n"
              "@hookimpl\ndef select_tokens(candidates):\n"
              "    rows = candidates.confidence.shape[0]\n"
              "    return topk_mask(candidates.confidence, torch.ones(rows, dtype=torch.long))\n")


def _module(name, **hooks):
    """A plugin module built in the test: ``hooks`` are plain functions, marked here."""
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


def _select_one(candidates):
    conf = candidates.confidence
    return conf == conf.max(dim=1, keepdim=True).values


def _resolve(pm, data, source="r.yaml"):
    from dllm_decode.policy import resolve

    return resolve(recipe_from_dict(data, source=source), pm)


def test_a_check_recipe_that_raises_names_the_plugin_and_the_hook():
    def check_recipe(recipe, options, slots):
        raise KeyError("oops")

    pm = get_plugin_manager(extra_plugins={"cr_raise": _module("cr_raise", check_recipe=check_recipe,
                                                                 select_tokens=_select_one)})
    with pytest.raises(PluginError, match=r"^r\.yaml: plugin 'cr_raise' raised in check_recipe: "
                                          r"KeyError: 'oops'") as caught:
        _resolve(pm, {"policy": "llada", "select_tokens": "cr_raise"})
    assert (caught.value.plugin, caught.value.hook) == ("cr_raise", "check_recipe")


@pytest.mark.parametrize("returned, problems", [
    ("needs block_length", ["needs block_length"]),                 # one problem, not one per character
    (("a", "b"), ["a", "b"]),
    (["a"], ["a"]),
])
def test_check_recipe_problems_are_reported_whole(returned, problems):
    from dllm_decode.errors import RecipeError

    pm = get_plugin_manager(extra_plugins={"cr_ret": _module("cr_ret", check_recipe=lambda recipe: returned,
                                                               select_tokens=_select_one)})
    with pytest.raises(RecipeError) as caught:
        _resolve(pm, {"policy": "llada", "select_tokens": "cr_ret"})
    assert str(caught.value).splitlines() == [f"r.yaml: [plugin 'cr_ret'] {p}" for p in problems]


@pytest.mark.parametrize("returned", [{"key": "problem"}, 3, True])
def test_check_recipe_returning_no_list_is_refused_naming_the_plugin(returned):
    pm = get_plugin_manager(extra_plugins={"cr_odd": _module("cr_odd", check_recipe=lambda recipe: returned,
                                                               select_tokens=_select_one)})
    with pytest.raises(PluginError, match=rf"plugin 'cr_odd' returned a {type(returned).__name__} from "
                                          r"check_recipe .*list of problems"):
        _resolve(pm, {"policy": "llada", "select_tokens": "cr_odd"})
    assert _resolve(pm, {"policy": "llada"}).plugin_for("select_tokens") == "llada"


class NotPydantic:
    pass


@pytest.mark.parametrize("kwargs, match", [
    ({"options": NotPydantic}, "options is .*NotPydantic.*not a pydantic model"),
    ({"requires": "compute_plans"}, "requires is 'compute_plans', not a tuple"),
    ({"pairs": (("select_tokens", "scroe"),)}, "pairs is"),
    ({"revocable": "yes"}, "revocable is 'yes'"),
])
def test_plugin_meta_refuses_what_it_cannot_use(kwargs, match):
    from dllm_decode.plugins import PluginMeta

    with pytest.raises(TypeError, match=match):
        PluginMeta(**kwargs)


BAD_META = ("from dllm_decode import PluginMeta\n" + SELECT_ONE.split("\n", 1)[1] +
            "class NotPydantic:\n    pass\n\ndllm_meta = PluginMeta(summary='bad', options=NotPydantic)\n")


def test_a_plugin_with_a_bad_meta_is_listed_broken_and_the_others_work(tmp_path, monkeypatch, capsys):
    import json

    from fake_dist import install_fake_distribution

    from dllm_decode.cli import main
    from dllm_decode.errors import RecipeError
    from dllm_decode.plugins import BrokenPluginWarning, broken_plugins

    root = install_fake_distribution(tmp_path / "site", "bad-meta-plugins", {"badmeta_one": "badmeta_mod"},
                                     {"badmeta_mod": BAD_META})
    monkeypatch.syspath_prepend(str(root))
    with pytest.warns(BrokenPluginWarning, match="badmeta_one.*not a pydantic model"):
        pm = get_plugin_manager()
    assert "not a pydantic model" in {i.name: i for i in broken_plugins(pm)}["badmeta_one"].broken
    with pytest.raises(RecipeError, match="select_tokens: plugin 'badmeta_one' .*not a pydantic model"):
        _resolve(pm, {"policy": "llada", "select_tokens": "badmeta_one"})
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "not a pydantic model" in rows["badmeta_one"]["broken"]
    assert rows["llada"]["broken"] is None and rows["llada"]["parameters"]
    assert main(["plugins"]) == 0
    assert "badmeta_one  [bad-meta-plugins 1.0]  (BROKEN)" in capsys.readouterr().out


def test_a_meta_that_is_not_a_plugin_meta_is_refused_or_listed_broken():
    from dllm_decode.plugins import list_plugins

    bad = _module("meta_ns", select_tokens=_select_one)
    bad.dllm_meta = types.SimpleNamespace(options=NotPydantic)
    with pytest.raises(PluginError, match="plugin 'meta_ns' is not valid: dllm_meta is a SimpleNamespace"):
        get_plugin_manager(extra_plugins={"meta_ns": bad})
    pm = get_plugin_manager()
    pm.register(bad, name="meta_ns")          # past the checks, as PluginKit registers
    rows = {i.name: i for i in list_plugins(pm)}
    assert "dllm_meta is a SimpleNamespace" in rows["meta_ns"].broken and rows["llada"].broken is None


def _on_path(monkeypatch, root, where):
    import importlib
    import sys

    monkeypatch.setattr(sys, "path", [str(root), *sys.path] if where == "first" else [*sys.path, str(root)])
    importlib.invalidate_caches()


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("kind", ["breaks", "loads"])
def test_a_third_party_plugin_never_shadows_a_built_in(tmp_path, monkeypatch, where, kind):
    import sys
    import warnings

    from fake_dist import install_fake_distribution

    module = f"shadow_{kind}_{where}"
    text = "raise RuntimeError('broken replacement')\n" if kind == "breaks" else SELECT_ONE
    root = install_fake_distribution(tmp_path / "site", "shadowing-plugins", {"llada": module}, {module: text})
    _on_path(monkeypatch, root, where)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_plugin_manager()
    text = "\n".join(str(w.message) for w in caught)
    assert f"plugin 'llada' (entry point '{module}', distribution shadowing-plugins 1.0) not loaded" in text
    assert "built-in plugin (entry point 'dllm_decode.policies.llada', distribution dllm-decode" in text
    assert pm.get_plugin("llada") is llada and "llada" not in pm.broken
    assert module not in sys.modules                 # refused unimported: its import cannot interfere
    assert _resolve(pm, {"policy": "llada"}).plugin_for("select_tokens") == "llada"


@pytest.mark.parametrize("where", ["first", "last"])
def test_two_third_party_plugins_of_one_name_are_both_refused(tmp_path, monkeypatch, where):
    import sys

    from fake_dist import install_fake_distribution

    from dllm_decode.plugins import BrokenPluginWarning

    root = tmp_path / "site"
    for dist in ("twin-a", "twin-b"):
        module = f"twin_{dist[-1]}_{where}"
        install_fake_distribution(root, dist, {"twin": module}, {module: SELECT_ONE})
    _on_path(monkeypatch, root, where)
    with pytest.warns(BrokenPluginWarning, match="twin"):
        pm = get_plugin_manager()
    assert pm.get_plugin("twin") is None
    error = pm.broken["twin"].error
    assert "twin-a 1.0" in error and "twin-b 1.0" in error and pm.broken["twin"].distribution == "twin-a"
    assert not {f"twin_a_{where}", f"twin_b_{where}"} & set(sys.modules)


def test_an_observer_must_implement_an_observer_hook():
    from dllm_decode.errors import RecipeError

    watcher = _module("watcher", after_step=lambda state: None)
    pm = get_plugin_manager(extra_plugins={"watcher": watcher})
    with pytest.raises(RecipeError, match=r"r\.yaml: observers: plugin 'llada' implements no observer hook"):
        _resolve(pm, {"policy": "llada", "observers": ["llada"]})
    with pytest.raises(RecipeError) as caught:
        _resolve(pm, {"policy": "llada", "observers": ["nope"]})
    listed = str(caught.value).split("registered for observers: ")[1].split(";")[0].split(", ")
    assert "watcher" in listed and "llada" not in listed and "apd" in listed     # apd observes request start
    assert [n for n, _ in _resolve(pm, {"policy": "llada", "observers": ["watcher"]}).observers["after_step"]] \
        == ["watcher"]


def test_the_json_listing_carries_every_declared_flag(pm):
    import dataclasses

    from dllm_decode.plugins import PluginMeta

    rows = {i.name: i.as_dict() for i in list_plugins(pm)}
    for f in dataclasses.fields(PluginMeta):
        if f.name != "options":                      # options appear as "parameters"
            assert all(f.name in row for row in rows.values()), f.name
    assert rows["dream"]["idle_steps"] is True and rows["llada"]["idle_steps"] is False
    assert rows["d2cache"]["drops_rows"] is True and rows["llada"]["drops_rows"] is False


@pytest.mark.parametrize("body, error", [("import sys\nsys.exit('no thanks')\n", "sys.exit('no thanks')"),
                                         ("import sys\nsys.exit(3)\n", "sys.exit(3)")])
def test_a_plugin_calling_sys_exit_on_import_is_a_load_failure(tmp_path, monkeypatch, body, error):
    from fake_dist import install_fake_distribution

    from dllm_decode.plugins import BrokenPluginWarning

    module = f"exiting_{abs(hash(body))}"
    root = install_fake_distribution(tmp_path / "site", "exiting-plugins", {"exiting": module}, {module: body})
    monkeypatch.syspath_prepend(str(root))
    with pytest.warns(BrokenPluginWarning, match="exiting"):
        pm = get_plugin_manager()
    assert error in pm.broken["exiting"].error and pm.get_plugin("llada") is not None


def test_a_keyboard_interrupt_during_a_plugin_import_still_stops(tmp_path, monkeypatch):
    from fake_dist import install_fake_distribution

    root = install_fake_distribution(tmp_path / "site", "interrupted-plugins", {"interrupted": "interrupting_mod"},
                                     {"interrupting_mod": "raise KeyboardInterrupt\n"})
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(KeyboardInterrupt):
        get_plugin_manager()


@pytest.mark.parametrize("plugin, match", [
    ("llada_copy", r"plugin 'x' is the string 'llada_copy', not a plugin object; pass the imported module"),
    (object(), r"plugin 'x' \(object .*\) implements no dllm_decode hook"),
])
def test_extra_plugins_refuse_what_is_not_a_plugin(plugin, match):
    with pytest.raises(PluginError, match=match):
        get_plugin_manager(extra_plugins={"x": plugin})
