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

import copy
import re
from pathlib import Path
from typing import Any, Collection, Literal, Sequence

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
                raise ValueError(f"a slot needs `plugin: NAME` (or just the plugin name); got {value!r}")
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
    # slots the file leaves to `policy:` that a --set SLOT.KEY wrote out (apply_overrides)
    _filled_from_policy: set[str] = PrivateAttr(default_factory=set)
    # sections the file leaves out or empty that a --set gave: errors about them are the --set's
    _created: set[str] = PrivateAttr(default_factory=set)

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
            msg = f"{loc}: {_plain(err)}"
            # a validator of a whole section (block_length must divide gen_length) names the
            # values it compares: echoing the section's mapping would only bury them
            if "input" in err and err["type"] != "missing" and not (
                    err["type"] == "value_error" and isinstance(err["input"], dict)):
                msg += f" (got {err['input']!r})"
        lines.append(f"{_where(source)}: {msg}")
    return "\n".join(lines)


def _plain(err: dict[str, Any]) -> str:
    """pydantic's message without the "Value error, " it puts before a validator's own text."""
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return msg


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


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    filled: set[str] | None = None) -> dict[str, Any]:
    """Apply ``--set`` overrides to raw recipe data (before validation, so errors name the key).

    ``--set SLOT.KEY=V`` on a slot the recipe leaves to ``policy: NAME`` writes the slot out as
    ``SLOT: {plugin: NAME, KEY: V}``, as a recipe would; the slots so written are added to
    ``filled``."""
    empty = {s for s in SLOTS if data.get(s) is None}
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
    # after every override, so that a `--set SLOT.plugin=NAME` anywhere in the list wins
    for slot in sorted(empty):
        if _fill_from_policy(data, slot) and filled is not None:
            filled.add(slot)
    return data


def _fill_from_policy(data: dict[str, Any], slot: str) -> bool:
    """Give a slot that only overrides set (``{threshold: 0.5}``, no plugin) the policy's
    plugin. One plugin has one options object for all its slots (policy.resolve merges them and
    refuses two values of one key), so a key the policy gives too takes the override's value
    there as well: the override then changes the option wherever that plugin decides, which is
    what setting it for one of its slots can only mean."""
    entry, policy = data.get(slot), data.get("policy")
    if not isinstance(entry, dict) or "plugin" in entry or "params" in entry:
        return False
    if isinstance(policy, str):
        policy = data["policy"] = {"plugin": policy}
    if not isinstance(policy, dict) or not isinstance(policy.get("plugin"), str):
        return False        # no policy to fill it: validation says the slot needs a plugin
    for key, value in entry.items():
        if key in policy:
            entry[key] = policy[key] = _merged(policy[key], value)
    data[slot] = {"plugin": policy["plugin"], **entry}
    return True


def _merged(base: Any, over: Any) -> Any:
    """``over`` laid on ``base`` (mappings key by key, as ``--set a.b.c`` sets one key)."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in over.items()}}
    return copy.deepcopy(over)


def recipe_from_dict(data: Any, source: str | None = None, overrides: list[str] = ()) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{_where(source)}: a recipe must be a mapping, got {type(data).__name__}")
    filled: set[str] = set()
    given = {key for key, value in data.items() if value is not None}
    # a deep copy: overrides write into nested mappings, which are the caller's own
    data = apply_overrides(copy.deepcopy(data), list(overrides), filled)
    created = {key for key, value in data.items() if value is not None and key not in given}
    if "source" in data:        # a field of the loaded recipe, set from where it was read
        raise RecipeError(blame_overrides(f"{_where(source)}: unknown key 'source' (a recipe's source is the "
                                          "file it is read from)", source, overrides, created=created))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(blame_overrides(format_validation_error(exc, source), source, overrides,
                                          created=created)) from None
    recipe.source = source
    recipe._overrides = list(overrides)
    recipe._filled_from_policy = filled
    recipe._created = created
    return recipe


_UNKNOWN = re.compile(r"unknown key '([^']*)'")
_PLUGIN = re.compile(r"\[plugin '([^']*)'\] ")
_EMPTY = re.compile(r"slot '(\w+)' is empty")


def blame_overrides(message: str, source: str | None, overrides: Sequence[str],
                    recipe: Recipe | None = None, created: Collection[str] = ()) -> str:
    """Rewrite the lines of an error message that blame ``source`` for a key a ``--set``
    gave: ``r.yaml: score.remaskin: ...`` becomes ``--set score.remaskin=x: score.remaskin: ...``
    (``r.yaml with --set ...`` where the faulty value holds the key set, e.g. a block length
    that no longer divides a gen_length given with --set).

    Lines name their key as ``KEY: ...``, ``unknown key 'KEY'``, ``slot 'KEY' is empty`` or,
    from a plugin's own checks, ``[plugin 'P'] KEY ...`` where KEY is an option of P or a recipe
    key. With ``recipe``, an option key of a plugin also matches a ``--set`` of that option given
    in another of the plugin's slots or its ``policy:`` (they share one options object).
    ``created``: top-level sections only ``--set`` gave (default: the recipe's); a line about
    one of them is the --set's alone."""
    keys = [(text.split("=", 1)[0].strip(), text) for text in overrides if "=" in text]
    filled = recipe._filled_from_policy if recipe is not None else set()
    sections = set(created) | (recipe._created if recipe is not None else set())
    lines = []
    for line in message.splitlines():
        head, sep, rest = line.partition(": ")
        if not (sep and head == _where(source)):
            lines.append(line)
            continue
        new, plugin, body = False, None, rest
        if m := _UNKNOWN.match(rest):
            key, new = m.group(1), True           # the key does not exist without the --set
        elif m := _EMPTY.match(rest):
            key = m.group(1)
        else:
            if m := _PLUGIN.match(rest):
                plugin, body = m.group(1), rest[m.end():]
            key = body.split(":", 1)[0].split(" ", 1)[0]
        new = new or key.split(".", 1)[0] in sections
        aliases = _aliases(key, plugin, recipe)
        exact = [t for k, t in keys if any(a == k or a.startswith(k + ".") or (new and k.startswith(a + "."))
                                          for a in aliases)]
        inside = [t for k, t in keys if not new and any(k.startswith(a + ".") for a in aliases)]
        # a plugin's check that names a generation value a --set changed (`... block_length 48`)
        inside += [t for k, t in keys if t not in exact + inside and k.startswith("generation.")
                   and re.search(rf"\b{re.escape(k.rsplit('.', 1)[1])}\b", body)]
        if key in filled and "does not implement" in rest:
            rest += f"; the recipe leaves {key} empty: name its plugin with --set {key}.plugin=NAME"
        if exact:
            line = f"--set {exact[-1]}: {rest}"
        elif inside:
            line = f"{head} with " + ", ".join(f"--set {t}" for t in inside) + f": {rest}"
        else:
            line = f"{head}: {rest}"
        lines.append(line)
    return "\n".join(lines)


def _aliases(key: str, plugin: str | None, recipe: Recipe | None) -> set[str]:
    """The recipe keys that set the same value as ``key``. A plugin's option may be given in
    each of its slots or in ``policy:`` (``score.remasking`` and ``select_tokens.remasking``
    are one option of plugin llada); ``plugin`` names the plugin whose option a bare ``key``
    is (a plugin check's line)."""
    head, _, option = key.partition(".")
    if head in ("policy", *SLOTS) and option:
        plugin = _plugin_of(recipe, head) if recipe is not None else None
    elif plugin is not None and key and not option:
        option = key                        # a bare option name in a plugin's check
    else:
        return {key}                        # a slot, a generation or model key: itself only
    if plugin is None:
        return {key}
    parts = [p for p in ("policy", *SLOTS) if recipe is None or _plugin_of(recipe, p) == plugin]
    if option == "(options)":               # the plugin's options as a whole: any of them may be at fault
        return {key, *parts}
    return {key} | {f"{p}.{option}" for p in parts}


def _plugin_of(recipe: Recipe, part: str) -> str | None:
    """The plugin of ``policy`` or a slot; an empty slot's is the policy's, which fills it if
    it fills anything an error names."""
    entry = recipe.slot(part) or recipe.policy
    return entry.plugin if entry is not None else None


def as_recipe(recipe: Recipe | str | Path | dict) -> Recipe:
    """A recipe given as a :class:`Recipe`, a shipped name or file, or a mapping, as a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    raise RecipeError(f"a recipe is a Recipe, a recipe name or file, or a mapping; got a {type(recipe).__name__}")


def resolve_recipe(recipe: Recipe, pm: Any) -> Any:
    """:func:`dllm_decode.policy.resolve`, with the errors about keys a ``--set`` gave blamed on
    that ``--set`` rather than on the recipe file."""
    from dllm_decode.policy import resolve

    try:
        return resolve(recipe, pm)
    except RecipeError as exc:
        raise RecipeError(blame_overrides(str(exc), recipe.source, recipe.overrides, recipe)) from None


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
        # YAML files are UTF-8 whatever the locale says
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"{path}: line {line}: byte 0x{exc.object[exc.start]:02x} at byte position {exc.start} "
                          "is not UTF-8; save the recipe as UTF-8") from None
    try:
        data = safe_load_unique(text)
    except DuplicateKeyError as exc:
        raise RecipeError(f"{path}: line {exc.again}: duplicate key {exc.key!r} (first given on line "
                          f"{exc.first}); a key may appear once per mapping") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {exc}") from exc
    return recipe_from_dict(data, source=str(path), overrides=overrides)
