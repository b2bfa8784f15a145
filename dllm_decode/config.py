"""Recipes: pydantic models of a decoding recipe, YAML loading, and ``--set`` overrides.

A recipe names the model settings, the generation settings and one plugin per slot::

    generation: {gen_length: 64, block_length: 32, steps: 64}
    choose_span: llada
    score: {plugin: llada, remasking: low_confidence}
    select_tokens: llada

``policy: NAME`` fills every slot NAME implements that the recipe leaves empty. Plugin names and
plugin parameters are checked against the registered plugins by :func:`dllm_decode.policy.resolve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from dllm_decode.errors import RecipeError
from dllm_decode.hookspecs import SLOTS



#: compute dtypes a recipe may name (models/loader.py maps names to torch dtypes)
DTYPES = ("float32", "bfloat16", "float16", "float64")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EosOptions(_Strict):
    """How the end of an answer is handled. Each switch is off by default, as in LLaDA."""

    ban: bool = Field(False, description="Set the logits of every id in `ids` to -inf before "
                      "scoring (LLaDA `logits_eos_inf`).")
    deprioritize: bool = Field(False, description="Give positions whose candidate is an id in `ids` "
                               "the lowest finite confidence, so they are committed last "
                               "(LLaDA `confidence_eos_eot_inf`).")
    stop: bool = Field(False, description="Finish a row as soon as its committed text ends in an id "
                       "of `ids` (no mask before it): the masks after it are filled with that id "
                       "without further forwards.")
    ids: list[int] | None = Field(None, description="Token ids that end an answer; default: the "
                                  "model's EOS and end-of-turn ids.")


class GenerationConfig(_Strict):
    """Canvas size, step budget, randomness and precision of one decode."""

    gen_length: int = Field(128, ge=1, le=1 << 20, description="Masked positions appended to each prompt.")
    block_length: int | None = Field(None, ge=1, description="Semi-autoregressive block size; "
                                     "default gen_length (one block). Must divide gen_length.")
    steps: int | None = Field(None, ge=1, description="Step budget for fixed-schedule policies; "
                              "default gen_length (one token per forward).")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="Sampling temperature; 0 is greedy.")
    cfg_scale: float = Field(0.0, ge=0.0, le=100.0, description="Unsupervised classifier-free guidance "
                             "weight w: logits = u + (w + 1)(c - u), u from the prompt-masked canvas.")
    seed: int = Field(0, ge=0, description="Seed of every row's random draws (with the row's prompt; per-row seeds override it).")
    batch_size: int = Field(1, ge=1, le=4096, description="Rows decoded together.")
    dtype: Literal[DTYPES] = Field(
        "float32", description="Model compute dtype.")
    max_steps: int | None = Field(None, ge=1, description="Hard cap on steps per request "
                                  "(default: 4 * gen_length); reaching it is an error.")
    eos: EosOptions = Field(default_factory=EosOptions)

    @model_validator(mode="after")
    def _blocks_divide(self) -> GenerationConfig:
        if self.block_length is not None and self.gen_length % self.block_length:
            raise ValueError(f"block_length ({self.block_length}) must divide gen_length ({self.gen_length})")
        if self.max_steps is not None and self.max_steps < self.total_steps:
            raise ValueError(f"max_steps ({self.max_steps}) is below the {self.total_steps} steps the "
                             "recipe schedules (generation.steps, default gen_length); a request would fail "
                             "before its schedule ends")
        return self

    @property
    def blocks(self) -> int:
        return self.gen_length // (self.block_length or self.gen_length)

    @property
    def block(self) -> int:
        return self.block_length or self.gen_length

    @property
    def total_steps(self) -> int:
        return self.steps or self.gen_length


class ModelSection(_Strict):
    """Where the model comes from. ``--model`` on the command line overrides ``path``."""

    path: str | None = Field(None, description="Directory of a Hugging Face format checkpoint.")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda.")
    block_size: int | None = Field(None, ge=1, description="Block-diffusion checkpoints (SDAR, LLaDA2, "
                                   "Fast-dLLM v2): decode in blocks of this size instead of the config's.")


class SlotEntry(_Strict):
    """One slot's plugin and the parameters given for it."""

    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"plugin": value}
        if isinstance(value, dict) and "params" not in value:
            if "plugin" not in value:
                raise ValueError("a slot needs `plugin: NAME` (or just the plugin name)")
            params = {k: v for k, v in value.items() if k != "plugin"}
            return {"plugin": value["plugin"], "params": params}
        return value

    def to_yaml(self) -> Any:
        return {"plugin": self.plugin, **self.params} if self.params else self.plugin


class Recipe(_Strict):
    """A whole decoding recipe."""

    name: str | None = None
    description: str = ""
    model: ModelSection = Field(default_factory=ModelSection)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    policy: SlotEntry | None = Field(None, description="Fills every slot this plugin implements "
                                     "that is not set explicitly.")
    choose_span: SlotEntry | None = None
    decide_phase: SlotEntry | None = None
    cache_policy: SlotEntry | None = None
    score: SlotEntry | None = None
    select_tokens: SlotEntry | None = None
    resize_canvas: SlotEntry | None = None
    observers: list[str] = Field(default_factory=list, description="Extra observer plugins.")
    source: str | None = Field(None, exclude=True, description="File the recipe came from.")
    _overrides: list[str] = PrivateAttr(default_factory=list)   # the --set texts applied on top

    @property
    def overrides(self) -> list[str]:
        """The ``--set KEY=VALUE`` texts applied on top of the file, for error messages."""
        return list(self._overrides)

    def slot(self, name: str) -> SlotEntry | None:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(exclude={"source"}, exclude_none=True)
        for key in ("policy", *SLOTS):
            entry = self.slot(key)
            if entry is not None:
                out[key] = entry.to_yaml()
        return out

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def _where(source: str | None) -> str:
    return source or "<recipe>"


def format_validation_error(exc: ValidationError, source: str | None) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("params",)) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {loc!r}"
        else:
            msg = f"{loc}: {err['msg']}"
            if "input" in err and err["type"] != "missing":
                msg += f" (got {err['input']!r})"
        lines.append(f"{_where(source)}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"select_tokens.threshold=0.9"`` -> (["select_tokens", "threshold"], 0.9)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. generation.steps=32")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = safe_load_unique(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text!r}: value is not valid YAML: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw recipe data (before validation, so errors name the key)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str) and i == 0 and part in (*SLOTS, "policy"):
                child = {"plugin": child}          # `score: llada` -> `score: {plugin: llada}`
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(path[:i + 1])} is not a mapping")
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def recipe_from_dict(data: Any, source: str | None = None, overrides: list[str] = ()) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{_where(source)}: a recipe must be a mapping, got {type(data).__name__}")
    data = apply_overrides(dict(data), list(overrides))
    if "source" in data:        # a field of the loaded recipe, set from where it was read
        raise RecipeError(blame_overrides(f"{_where(source)}: unknown key 'source' (a recipe's source is the "
                                          "file it is read from)", source, overrides))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(blame_overrides(format_validation_error(exc, source), source, overrides)) from None
    recipe.source = source
    recipe._overrides = list(overrides)
    return recipe


def blame_overrides(message: str, source: str | None, overrides: Sequence[str]) -> str:
    """Rewrite the lines of an error message that blame ``source`` for a key a ``--set``
    gave: ``r.yaml: score.remaskin: ...`` becomes ``--set score.remaskin=x: score.remaskin: ...``
    (``r.yaml with --set ...`` where the faulty value holds the key set, e.g. a block length
    that no longer divides a gen_length given with --set)."""
    keys = [(text.split("=", 1)[0].strip(), text) for text in overrides if "=" in text]
    lines = []
    for line in message.splitlines():
        head, sep, rest = line.partition(": ")
        key = rest.split(":", 1)[0].split(" ", 1)[0] if sep and head == _where(source) else None
        exact = [t for k, t in keys if key and (key == k or key.startswith(k + "."))]
        inside = [t for k, t in keys if key and k.startswith(key + ".")]
        if exact:
            line = f"--set {exact[-1]}: {rest}"
        elif inside:
            line = f"{head} with " + ", ".join(f"--set {t}" for t in inside) + f": {rest}"
        lines.append(line)
    return "\n".join(lines)


def resolve_recipe(recipe: Recipe, pm: Any) -> Any:
    """:func:`dllm_decode.policy.resolve`, with the errors about keys a ``--set`` gave blamed on
    that ``--set`` rather than on the recipe file."""
    from dllm_decode.policy import resolve

    try:
        return resolve(recipe, pm)
    except RecipeError as exc:
        raise RecipeError(blame_overrides(str(exc), recipe.source, recipe.overrides)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: plain YAML loading keeps
    the last value silently, so a recipe edited in two places would run with one of them."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise DuplicateKeyError(key, first[key], key_node.start_mark.line + 1)
                    first[key] = key_node.start_mark.line + 1
                except TypeError:                   # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"duplicate key {key!r} on line {again} (first given on line {first})")
        self.key, self.first, self.again = key, first, again


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` (no tags executed) refusing duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe file, or a shipped recipe by name (``"threshold"``), with safe loading
    only (duplicate keys refused), and validate its own sections.

    Plugin names and parameters are validated by :func:`dllm_decode.policy.resolve`.
    """
    from dllm_decode.recipes import find_recipe

    path = find_recipe(str(path))
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror or exc}") from exc
    try:
        data = safe_load_unique(text)
    except DuplicateKeyError as exc:
        raise RecipeError(f"{path}: line {exc.again}: duplicate key {exc.key!r} (first given on line "
                          f"{exc.first}); a key may appear once per mapping") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {exc}") from exc
    return recipe_from_dict(data, source=str(path), overrides=overrides)
