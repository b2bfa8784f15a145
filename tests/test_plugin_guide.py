"""The plugin guide's two complete plugins work as printed: each file is taken from
docs/plugin-guide.md, imports only from dllm_decode, registers, and keeps the invariants."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from dllm_decode import Decoder, RecipeError
from dllm_decode.config import recipe_from_dict
from dllm_decode.models import build_random_model
from dllm_decode.plugins import get_plugin_manager, list_plugins
from dllm_decode.testing import RandomLogitsModel, check_invariants

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugin-guide.md"


def _plugin(name: str, tmp_path: Path):
    """The ```python block of the guide that starts with `# {name}.py`, imported as a module."""
    blocks = re.findall(r"```python\n(# (\w+)\.py\n.*?)```", GUIDE.read_text(), flags=re.S)
    source = next(code for code, file in blocks if file == name)
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"guide_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, source


@pytest.mark.parametrize("name", ["my_select", "my_cache"])
def test_each_plugin_imports_only_from_the_package_top_level(name, tmp_path):
    _, source = _plugin(name, tmp_path)
    modules = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in modules if m.startswith("dllm_decode")} == {"dllm_decode"}, modules


def test_the_select_plugin_keeps_the_invariants_and_commits_several_per_step(tmp_path):
    module, _ = _plugin("my_select", tmp_path)
    pm = get_plugin_manager(extra_plugins={"my_select": module})
    assert "select_tokens" in next(i for i in list_plugins(pm) if i.name == "my_select").slots
    recipe = {"policy": "llada", "select_tokens": {"plugin": "my_select", "ratio": 0.5},
              "generation": {"gen_length": 16, "block_length": 8, "dtype": "float64"}}
    check_invariants(RandomLogitsModel(), recipe, pm=pm)
    rows = Decoder(RandomLogitsModel(), recipe_from_dict(recipe), pm=pm).generate([[5, 9, 11]]).rows
    assert rows[0].nfe < 16                              # some step committed more than one token
    with pytest.raises(RecipeError, match="ratio"):
        Decoder(RandomLogitsModel(), recipe_from_dict({**recipe, "select_tokens": {"plugin": "my_select",
                                                                                    "ratio": 2}}), pm=pm)


def test_the_cache_plugin_keeps_the_invariants_and_computes_less(tmp_path):
    module, _ = _plugin("my_cache", tmp_path)
    pm = get_plugin_manager(extra_plugins={"my_cache": module})
    model = build_random_model("llada", vocab_size=48, mask_token_id=47, dtype="float64")
    recipe = {"policy": "llada", "cache_policy": {"plugin": "my_cache", "interval": 4},
              "generation": {"gen_length": 16, "block_length": 8, "dtype": "float64"}}
    check_invariants(model, recipe, pm=pm)
    prompts = [[5, 9, 11, 3, 4, 6, 7, 8]]
    cached = Decoder(model, recipe_from_dict(recipe), pm=pm).generate(prompts).rows[0]
    plain = Decoder(model, recipe_from_dict({**recipe, "cache_policy": "none"}), pm=pm).generate(prompts).rows[0]
    assert cached.nfe == plain.nfe and 0 < cached.flops < plain.flops
