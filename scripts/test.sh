#!/usr/bin/env bash
# The test suite (default: everything not marked slow), one pytest-xdist worker per logical core
# (`auto` counts physical cores, which a 2-vCPU machine may report as one); a worker that runs
# dry steals queued tests from another, so one long test does not leave a core idle. Extra
# arguments go to pytest and come last, so `-n 0` runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n logical --dist worksteal "$@"
