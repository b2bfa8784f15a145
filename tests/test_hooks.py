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
