"""The shape of the core: what lives at the package's top level, how large the step is, and who
may import whom. Each check reads the source, so a change that breaks the layout fails here."""

import ast
import re
from pathlib import Path

import pytest

import dllm_decode
from dllm_decode.plugins import get_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dllm_decode"
CORE_FILES = sorted([*PKG.glob("*.py"), *(PKG / "models").glob("*.py")])
PLUGIN_FILES = sorted([*(ROOT / "policies").glob("*.py"), *(ROOT / "caches").glob("*.py"),
                       ROOT / "examples" / "plugin-eb-sampler" / "dllm_eb_sampler.py"])


def test_the_top_level_holds_the_core_only():
    modules = {p.stem for p in PKG.glob("*.py")}
    assert modules == {"__init__", "__main__", "hookspecs", "plugins", "policy", "state", "engine", "config",
                       "errors", "sampling", "noise", "cli", "commit", "contracts", "guidance", "request", "eos",
                       "blocks", "feature_cache", "records", "canvas", "block_mode"}
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"models", "measure", "testing", "tools", "harness", "serve"}


def test_the_step_is_small():
    lines = sum(len((PKG / f).read_text().splitlines()) for f in ("hookspecs.py", "engine.py", "state.py"))
    assert lines < 700, f"hookspecs + engine + state: {lines} lines"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_core_function_is_longer_than_60_lines(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def test_the_engine_names_no_plugin():
    names = {n for n, p in get_plugin_manager().list_name_plugin() if p is not None} - {"none"}
    source = (PKG / "engine.py").read_text()
    found = sorted(n for n in names if re.search(rf"\b{re.escape(n)}\b", source))
    assert len(names) >= 10 and not found, found


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
    return out


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: p.name)
def test_no_plugin_imports_another(path):
    bad = [m for m in _imports(path) if m.startswith((".", "dllm_decode.policies", "dllm_decode.caches"))]
    assert not bad, bad


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_no_plugin(path):
    bad = [m for m in _imports(path) if m.startswith(("dllm_decode.policies", "dllm_decode.caches"))]
    assert not bad, bad


def test_the_public_api_is_importable_from_the_top_level():
    for name in ("hookimpl", "PluginMeta", "PluginOptions", "Candidates", "Selection", "ComputePlan",
                 "Decoder", "load_recipe", "load_model"):
        assert getattr(dllm_decode, name) is not None and name in dllm_decode.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dllm_decode.nope
