"""dllm-decode: decoding policies for masked-diffusion language models, composed from hook plugins.

What plugin authors and users need, importable from here::

    from dllm_decode import hookimpl, PluginMeta, PluginOptions, Candidates, Selection, ComputePlan
    from dllm_decode import Decoder, load_recipe, load_model

Names are imported on first use, so ``import dllm_decode`` (and the CLI's ``--help``) stays
cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS = {
    "hookimpl": "dllm_decode.hookspecs",
    "PluginMeta": "dllm_decode.plugins",
    "PluginOptions": "dllm_decode.plugins",
    "Candidates": "dllm_decode.state",
    "Selection": "dllm_decode.state",
    "Phase": "dllm_decode.state",
    "Resize": "dllm_decode.state",
    "Guided": "dllm_decode.guidance",
    "DecodeState": "dllm_decode.state",
    "ComputePlan": "dllm_decode.models.plan",
    "Decoder": "dllm_decode.engine",
    "load_recipe": "dllm_decode.config",
    "load_model": "dllm_decode.models.loader",
    "ForwardOutput": "dllm_decode.models.output",
    "RecipeError": "dllm_decode.errors",
    "InputError": "dllm_decode.errors",
    "PluginError": "dllm_decode.errors",
    # helpers policies share (pure tensor functions and block arithmetic)
    "topk_mask": "dllm_decode.sampling",
    "gumbel_perturb": "dllm_decode.sampling",
    "token_probability": "dllm_decode.sampling",
    "threshold_commit": "dllm_decode.sampling",
    "draws": "dllm_decode.noise",
    "gumbel_draws": "dllm_decode.noise",
    "current_block": "dllm_decode.blocks",
    "first_masked": "dllm_decode.blocks",
    # the reference tasks the shipped models know
    "get_task": "dllm_decode.measure.tasks",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from dllm_decode.config import load_recipe
    from dllm_decode.engine import Decoder
    from dllm_decode.hookspecs import hookimpl
    from dllm_decode.blocks import current_block, first_masked
    from dllm_decode.errors import InputError, PluginError, RecipeError
    from dllm_decode.measure.tasks import get_task
    from dllm_decode.models.loader import load_model
    from dllm_decode.models.output import ForwardOutput
    from dllm_decode.models.plan import ComputePlan
    from dllm_decode.noise import draws, gumbel_draws
    from dllm_decode.plugins import PluginMeta, PluginOptions
    from dllm_decode.sampling import gumbel_perturb, threshold_commit, token_probability, topk_mask
    from dllm_decode.guidance import Guided
    from dllm_decode.state import Candidates, DecodeState, Phase, Resize, Selection


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dllm_decode' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
