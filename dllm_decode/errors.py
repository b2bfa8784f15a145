"""Exceptions raised by dllm-decode. Each message names the file, slot, key, plugin or step at fault."""

from __future__ import annotations


class DllmDecodeError(Exception):
    """Base class of every error this package raises on purpose."""


class RecipeError(DllmDecodeError, ValueError):
    """A recipe could not be loaded: malformed YAML, unknown key, bad value, unknown plugin."""


class PluginError(DllmDecodeError, RuntimeError):
    """A plugin raised, or broke a contract the engine enforces (docs/concepts.md, "What the engine enforces")."""

    def __init__(self, message: str, *, plugin: str | None = None, hook: str | None = None,
                 step: int | None = None):
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook
        self.step = step


class InputError(DllmDecodeError, ValueError):
    """Bad request input: a prompt too long for the model, an empty batch, and the like."""


class ModelOutputError(DllmDecodeError, RuntimeError):
    """The model returned unusable logits (NaN or infinite everywhere)."""


class CheckpointError(DllmDecodeError, ValueError):
    """A checkpoint directory could not be loaded: config.json, the weights or the tokenizer
    missing, corrupt or truncated, a model family dllm-decode does not run, a device torch lacks."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory or its config.json does not exist. A CheckpointError too, so
    one ``except CheckpointError`` covers every refused checkpoint; a FileNotFoundError for the
    callers that catch that."""
