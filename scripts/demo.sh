#!/usr/bin/env bash
# The main job: decode a prompt with the shipped model under the LLaDA baseline recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dllm-decode generate --model models/tiny-random-llada --recipe recipes/llada.yaml \
    --set generation.batch_size=1 "${@:-12+34=}"
