"""The example third-party plugin (examples/plugin-eb-sampler) installs into a fresh virtual
environment with pip, offline, and works by name with no change to the core: discovered through
its entry point, listed by `dllm-decode plugins`, used from a recipe, and its own test suite
(parity with a re-derived reference, the invariant suite) passes against the installed copy.

The fresh environment reuses this environment's third-party packages (torch, pydantic, ...)
through a `.pth` file, since nothing can be downloaded; dllm-decode itself and the example are
built from source copies and installed into it like any user would, so the editable install of
this checkout plays no part in what is discovered.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin-eb-sampler"
CORE = ("pyproject.toml", "README.md", "dllm_decode", "policies", "caches", "recipes")
IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".pytest_cache")


def _run(args, cwd, env, timeout=300):
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fresh")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # Third-party dependencies (and pip, setuptools, pytest) come from this environment.
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_dllm_test_deps.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in deps))
    # Build from copies so that no build output lands in the checkout.
    core, example = tmp / "src" / "dllm-decode", tmp / "src" / "plugin-eb-sampler"
    for name in CORE:
        src = ROOT / name
        (shutil.copytree(src, core / name, ignore=IGNORE) if src.is_dir() else
         (core.mkdir(parents=True, exist_ok=True), shutil.copy2(src, core / name)))
    shutil.copytree(EXAMPLE, example, ignore=IGNORE)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("DLLM_DECODE_BLOCK", None)
    _run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", core, example], tmp, env)
    return {"python": py, "bin": venv / "bin", "site": site, "example": example, "env": env, "tmp": tmp}


def test_installed_into_the_fresh_environment(fresh_env):
    out = _run([fresh_env["python"], "-c", "import dllm_decode, dllm_eb_sampler; print(dllm_decode.__file__); "
                "print(dllm_eb_sampler.__file__)"], fresh_env["tmp"], fresh_env["env"])
    for path in out.stdout.split():
        assert Path(path).is_relative_to(fresh_env["site"]), path


def test_discovered_and_listed_by_the_cli(fresh_env):
    out = _run([fresh_env["bin"] / "dllm-decode", "plugins", "--json"], fresh_env["tmp"], fresh_env["env"])
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    eb = plugins["eb_sampler"]
    assert eb["distribution"] == "dllm-eb-sampler" and eb["version"] == "0.1.0"
    assert eb["slots"] == ["score", "select_tokens"]
    assert [p["name"] for p in eb["parameters"]] == ["gamma", "order"]
    assert plugins["llada"]["distribution"] == "dllm-decode"


def test_used_by_name_from_a_recipe(fresh_env):
    out = _run([fresh_env["bin"] / "dllm-decode", "generate", "--model", ROOT / "models" / "llada-reference",
                "--recipe", fresh_env["example"] / "eb-sampler.yaml", "--task", "case", "--n", "2", "--json",
                "--no-progress"], fresh_env["tmp"], fresh_env["env"])
    rows = json.loads(out.stdout)["rows"]
    assert len(rows) == 2 and all(r["correct"] for r in rows), rows
    assert all(r["nfe"] < 96 for r in rows)          # several tokens per forward on this model


def test_left_out_of_the_builtin_reference(fresh_env):
    out = _run([fresh_env["python"], "-m", "dllm_decode.tools.docs_reference"], fresh_env["tmp"], fresh_env["env"])
    assert "### `llada`" in out.stdout and "eb_sampler" not in out.stdout


def test_its_own_suite_passes_against_the_installed_copy(fresh_env):
    env = {**fresh_env["env"], "DLLM_DECODE_REFERENCE_MODEL": str(ROOT / "models" / "llada-reference")}
    # Run from tests/ so that the source module beside pyproject.toml is not on sys.path: the
    # suite must import the installed copy.
    out = _run([fresh_env["python"], "-m", "pytest", "-q", "-p", "no:cacheprovider", "."],
               fresh_env["example"] / "tests", env)
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]
