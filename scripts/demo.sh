#!/usr/bin/env bash
# The main job: decode held-out problems with the shipped models and score them: the reference
# tasks with llada-reference under the LLaDA baseline recipe, then multi-step worked traces with
# the block-diffusion fast-dllm-v2-workload under its family's recipe. Arguments, if any, are
# decoded by llada-reference as text prompts instead (e.g. $'pick one of 3 5, seven times\n').
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
.venv/bin/dllm-decode generate --model models/fast-dllm-v2-workload --task chain,columns-short,listops-short \
    --n 1 --gen-length 256
# the console script lives in the environment the demo made, not on PATH
echo "next: source .venv/bin/activate (or call .venv/bin/dllm-decode), then e.g. dllm-decode generate --help" >&2
