"""No cache: every step is a plain forward of the whole canvas (the exact reference)."""

from __future__ import annotations

from dllm_decode.hookspecs import hookimpl
from dllm_decode.plugins import PluginMeta

dllm_meta = PluginMeta(summary="No cache: full forward every step", exact=True, resizable=True)


@hookimpl
def cache_policy():
    return None
