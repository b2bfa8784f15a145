#!/usr/bin/env bash
# Create .venv (once) and install dllm-decode with its test, eval (lm-eval, accelerate) and serve
# (fastapi, uvicorn) extras.
# torch is installed as torch==2.13.0 when no torch is importable: an unpinned requirement
# would pull a newer build with several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.dllm-decode-installed
want=$(cat pyproject.toml | "$VPY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c 'import torch, dllm_decode' 2>/dev/null; then
    exit 0
fi
"$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
if ! "$VPY" -c 'import torch' 2>/dev/null; then
    "$VPY" -m pip install --quiet --disable-pip-version-check torch==2.13.0 >&2
fi
"$VPY" -m pip install --quiet --disable-pip-version-check -e '.[test,eval,serve]' >&2
echo "$want" > "$stamp"
