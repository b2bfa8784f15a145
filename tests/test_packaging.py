"""policies/, caches/ and recipes/ install under the dllm_decode namespace, never bare."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code, cwd, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_editable_install_maps_the_plugin_folders(tmp_path):
    out = _python("import dllm_decode.policies.llada as p, dllm_decode.caches.none as c, dllm_decode.recipes as r;"
                  "print(p.__file__); print(c.__file__); print(r.__file__)", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert files[0] == str(ROOT / "policies" / "llada.py")
    assert files[1] == str(ROOT / "caches" / "none.py")
    assert files[2] == str(ROOT / "recipes" / "__init__.py")
    for bare in ("policies", "caches", "recipes"):
        assert _python(f"import {bare}", cwd=tmp_path).returncode != 0, f"bare `{bare}` is importable"


def test_wheel_contains_only_the_namespaced_packages(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--quiet", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("dllm_decode-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dllm_decode/policies/llada.py" in names
    assert "dllm_decode/caches/none.py" in names
    assert "dllm_decode/recipes/llada.yaml" in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"dllm_decode", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[dllm_decode]" in entry_points and "dllm_decode.policies.llada" in entry_points

    # Import from the unpacked wheel ahead of the editable install.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = _python("import dllm_decode.policies.llada as p; from dllm_decode.recipes import shipped_recipes;"
                  "print(p.__file__); print(sorted(shipped_recipes()))", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(str(site))
    assert "llada" in out.stdout.splitlines()[1]
