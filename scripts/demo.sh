#!/usr/bin/env bash
# The main job: decode held-out problems of the reference task suite with the shipped
# llada-reference model under the LLaDA baseline recipe, and score them. Arguments, if any,
# are decoded as text prompts instead (e.g. $'pick one of 3 5, seven times\n').
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -gt 0 ]; then
    .venv/bin/dllm-decode generate --model models/llada-reference --recipe recipes/llada.yaml "$@"
    echo "next: source .venv/bin/activate (or call .venv/bin/dllm-decode), then e.g. dllm-decode generate --help" >&2
    exit 0
fi
.venv/bin/dllm-decode generate --model models/llada-reference --recipe recipes/llada.yaml \
    --task copy,repeat,case --n 1
# the console script lives in the environment the demo made, not on PATH
echo "next: source .venv/bin/activate (or call .venv/bin/dllm-decode), then e.g. dllm-decode generate --help" >&2
