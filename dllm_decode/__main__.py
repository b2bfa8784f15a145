"""``python -m dllm_decode ...`` is the ``dllm-decode`` command (what ``accelerate launch -m
dllm_decode eval ...`` runs in every process)."""

import sys

from dllm_decode.cli import main

if __name__ == "__main__":
    sys.exit(main())
