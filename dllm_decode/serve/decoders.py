"""The decoders a server runs: one per (recipe, overrides), built on first use and reused.

A request may name a shipped recipe and override three generation keys: ``max_tokens``,
``temperature`` and its own ``seed`` (a row's seed is not part of the decoder). ``max_tokens``
becomes the generation length by :func:`length_overrides`.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Any, Sequence

from dllm_decode.config import GenerationConfig, load_recipe
from dllm_decode.engine import Decoder
from dllm_decode.errors import DllmDecodeError, InputError
from dllm_decode.models.loader import load_causal_lm
from dllm_decode.recipes import shipped_recipes


def length_overrides(gen: GenerationConfig, max_tokens: int) -> list[str]:
    """The overrides that move a recipe to about ``max_tokens`` generated tokens.

    A one-block recipe becomes one block of exactly ``max_tokens``. A recipe with blocks keeps its
    block length: the length is rounded up to whole blocks. Either way the steps are scaled to
    keep the tokens committed per step (one per step stays one per step; with blocks, the steps
    per block are kept), and a ``max_steps`` cap grows with the length. The answer is still cut
    at ``max_tokens`` (:meth:`DecoderPool.for_request`): a rounded-up length, a block-causal model
    padding the canvas to its block boundary or a canvas rule that grows rows (DAEDAL) may
    generate more."""
    one_block = gen.blocks == 1
    length = max_tokens if one_block else math.ceil(max_tokens / gen.block) * gen.block
    out = [f"generation.gen_length={length}"]
    if gen.block_length is not None:
        out.append(f"generation.block_length={length if one_block else gen.block}")
    steps = None
    if gen.steps is not None:
        if one_block:
            steps = min(length, max(1, round(gen.steps * length / gen.gen_length)))
        elif gen.steps % gen.blocks == 0:
            steps = gen.steps // gen.blocks * (length // gen.block)
        else:
            steps = max(1, round(gen.steps * length / gen.gen_length))
        out.append(f"generation.steps={steps}")
    if gen.max_steps is not None:
        scaled = math.ceil(gen.max_steps * length / gen.gen_length)
        out.append(f"generation.max_steps={max(scaled, steps or length)}")
    return out


class DecoderPool:
    """Decoders by (recipe name, overrides), the least recently used dropped past ``size``
    (a request that holds one keeps it alive). Thread-safe: the server builds decoders off its
    event loop, since a first build may load a model. The plugins' auxiliary models (APD's
    verifier) are loaded once per (path, dtype, device) and shared by every decoder."""

    def __init__(self, model: Any, tokenizer: Any, recipe: str, overrides: Sequence[str] = (),
                 pm: Any = None, size: int = 32):
        self.model, self.tokenizer, self.pm, self.size = model, tokenizer, pm, size
        self.default, self.overrides = recipe, list(overrides)
        self._decoders: OrderedDict[tuple[str, tuple[str, ...]], Decoder] = OrderedDict()
        self._aux: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.RLock()          # decoder() may run in several threads at once
        base = self.decoder(recipe).recipe      # the default recipe's errors surface at start-up
        # a requested recipe runs on the loaded model's device and dtype, whatever its file says
        self.common = [f"model.device={json.dumps(base.model.device)}", f"generation.dtype={base.generation.dtype}"]

    def decoder(self, name: str | None = None, extra: Sequence[str] = ()) -> Decoder:
        """The decoder of recipe ``name`` (default: the server's) with ``extra`` overrides."""
        name = name or self.default
        base = self.overrides if name == self.default else self.common
        key = (name, (*base, *extra))
        with self._lock:
            if key in self._decoders:
                self._decoders.move_to_end(key)
                return self._decoders[key]
            recipe = load_recipe(name, overrides=list(key[1]))
            dec = Decoder(self.model, recipe, pm=self.pm, tokenizer=self.tokenizer, load_aux=self._load_aux)
            self._decoders[key] = dec
            while len(self._decoders) > self.size:
                self._decoders.popitem(last=False)
            return dec

    def _load_aux(self, path: Any, dtype: Any, device: Any) -> Any:
        key = (str(path), str(dtype), str(device))
        if key not in self._aux:
            self._aux[key] = load_causal_lm(path, dtype, device)
        return self._aux[key]

    def for_request(self, recipe: str | None, max_tokens: int | None,
                    temperature: float | None) -> tuple[Decoder, int | None]:
        """The decoder of a request's fields and where to cut its answer (``max_tokens``). Raises
        :class:`FieldError` naming the field whose override the recipe refused."""
        if recipe is not None and recipe not in shipped_recipes():
            # names only: a path would let a client read files of the server's machine
            raise FieldError(f"recipe {recipe!r} is not a shipped recipe (shipped: {', '.join(shipped_recipes())})",
                             "recipe")
        extra, fields = [], {}
        if temperature is not None:
            extra.append(f"generation.temperature={float(temperature)!r}")
            fields[extra[-1]] = "temperature"
        try:
            if max_tokens is not None:
                lengths = length_overrides(self.decoder(recipe).gen, max_tokens)
                extra += lengths
                fields.update({text: "max_tokens" for text in lengths})
            return self.decoder(recipe, extra), max_tokens
        except DllmDecodeError as exc:
            raise FieldError(*blame_field(exc, fields)) from None


class FieldError(InputError):
    """A request field the decoders refuse; ``param`` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def blame_field(exc: DllmDecodeError, fields: dict[str, str]) -> tuple[str, str]:
    """An engine error about overrides a request made, reworded to name the request's field
    (``--set generation.temperature=...`` reads as ``temperature (generation.temperature=...)``),
    and that field; ``recipe`` when no override is to blame."""
    message, param = str(exc), None
    for text, field in fields.items():
        if f"--set {text}" in message:
            message, param = message.replace(f"--set {text}", f"{field} ({text})"), param or field
    return message, param or "recipe"
