"""Binding a recipe to registered plugins: one hook caller per slot, options validated once.

The engine calls each slot's hook through a caller that sees only the plugin assigned to that
slot, so a plugin implementing several hooks contributes exactly the slots the recipe gives it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from dllm_decode.config import Recipe, SlotEntry, blame_overrides
from dllm_decode.errors import CheckpointError, DllmDecodeError, PluginError, RecipeError
from dllm_decode.hookspecs import OBSERVERS, OPTIONAL_SLOTS, SLOTS
from dllm_decode.plugins import TRACE_ENV, PluginManager, PluginMeta, implemented_slots, meta_of


@dataclass
class BoundSlot:
    slot: str
    plugin_name: str
    caller: Any          # pluggy hook caller restricted to this plugin


@dataclass
class BoundPolicy:
    """A recipe resolved against a plugin manager; immutable during decoding."""

    recipe: Recipe
    slots: dict[str, BoundSlot]
    options: dict[str, Any]                  # plugin name -> validated options
    metas: dict[str, PluginMeta]
    observers: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)  # hook -> [(plugin, caller)]
    plugin_names: tuple[str, ...] = ()       # every plugin taking part, in slot order

    def plugin_for(self, slot: str) -> str | None:
        bound = self.slots.get(slot)
        return bound.plugin_name if bound else None

    def _select_meta(self, flag: str) -> bool:
        name = self.plugin_for("select_tokens")
        return bool(name and getattr(self.metas[name], flag))

    @property
    def revocable(self) -> bool:
        return self._select_meta("revocable")

    @property
    def idle_steps(self) -> bool:
        return self._select_meta("idle_steps")

    @property
    def drops_rows(self) -> bool:
        """A finished row may leave the cache store: the cache plugin declares ``drops_rows`` and
        no row can come back (a revocable selection may re-mask a finished row)."""
        name = self.plugin_for("cache_policy")
        return bool(name and self.metas[name].drops_rows) and not self.revocable

    @property
    def resizes(self) -> bool:
        """A canvas rule fills ``resize_canvas``: rows may grow during a request."""
        return "resize_canvas" in self.slots


def _where(recipe: Recipe) -> str:
    return recipe.source or "<recipe>"


def _fillers(pm: PluginManager, slot: str) -> list[str]:
    return sorted(n for n, p in pm.list_name_plugin() if p is not None and slot in implemented_slots(pm, p))


def _observer_plugins(pm: PluginManager) -> list[str]:
    return sorted(n for n, p in pm.list_name_plugin()
                  if p is not None and _observer_hooks(pm, p))


def _observer_hooks(pm: PluginManager, plugin: Any) -> list[str]:
    names = {c.name for c in (pm.get_hookcallers(plugin) or [])}
    return [hook for hook in OBSERVERS if hook in names]


def _lookup(pm: PluginManager, recipe: Recipe, slot: str, name: str) -> Any:
    plugin = pm.get_plugin(name)
    if plugin is None:
        broken = getattr(pm, "broken", {}).get(name)
        if broken is not None:
            raise RecipeError(f"{_where(recipe)}: {slot}: {broken.describe()} (see `dllm-decode plugins`)")
        if pm.is_blocked(name):
            raise RecipeError(f"{_where(recipe)}: {slot}: plugin {name!r} is blocked "
                              "(DLLM_DECODE_BLOCK or --block)")
        known = (_fillers(pm, slot) if slot in SLOTS else _observer_plugins(pm) if slot == "observers"
                 else sorted(n for n, p in pm.list_name_plugin() if p is not None))
        raise RecipeError(f"{_where(recipe)}: {slot}: unknown plugin {name!r} (registered for "
                          f"{slot}: {', '.join(known) or 'none'}; see `dllm-decode plugins`)")
    return plugin


def resolve(recipe: Recipe, pm: PluginManager) -> BoundPolicy:
    """Check every plugin name, parameter and combination of ``recipe``; bind the slots.

    :raises RecipeError: naming the recipe file, the slot and the key at fault.
    """
    entries, origin = _slot_entries(recipe, pm)
    merged, key_origin, plugins = _merge_params(recipe, pm, entries, origin)
    for name in recipe.observers:
        plugin = _lookup(pm, recipe, "observers", name)
        if not _observer_hooks(pm, plugin):
            # it would be accepted and never called: a recipe that silently observes nothing
            raise RecipeError(f"{_where(recipe)}: observers: plugin {name!r} implements no observer hook "
                              f"({', '.join(OBSERVERS)}); plugins with one: "
                              f"{', '.join(_observer_plugins(pm)) or 'none'}")
        plugins.setdefault(name, plugin)
        merged.setdefault(name, {})
    metas = {name: meta_of(plugin) for name, plugin in plugins.items()}
    options = {name: _validate(recipe, name, metas[name], merged[name], entries, key_origin) for name in plugins}
    slot_of: dict[str, tuple[str, ...]] = {
        name: tuple(s for s in SLOTS if s in entries and entries[s].plugin == name) for name in plugins}
    problems = _pairing_problems(recipe, metas, slot_of) + _resize_problems(recipe, entries, metas)
    for name, plugin in plugins.items():
        problems.extend(f"{_where(recipe)}: [plugin {name!r}] {p}"
                        for p in _check_recipe(pm, recipe, name, plugin, options[name], slot_of[name]))
    if problems:
        raise RecipeError("\n".join(problems))

    slots = {slot: BoundSlot(slot, entry.plugin, _direct(pm.subset_hook_caller(slot, _others(pm, [plugins[entry.plugin]]))))
             for slot, entry in entries.items()}
    order = tuple(dict.fromkeys([entries[s].plugin for s in SLOTS if s in entries] + list(recipe.observers)))
    # Observers are called plugin by plugin: each gets its own options and scratch.
    observers = {hook: [(n, _direct(pm.subset_hook_caller(hook, _others(pm, [plugins[n]])))) for n in order
                        if hook in {c.name for c in (pm.get_hookcallers(plugins[n]) or [])}]
                 for hook in OBSERVERS}
    return BoundPolicy(recipe=recipe, slots=slots, options=options, metas=metas,
                       observers=observers, plugin_names=order)


def _check_recipe(pm: PluginManager, recipe: Recipe, name: str, plugin: Any, options: Any,
                  slots: tuple[str, ...]) -> list[str]:
    """The problems one plugin's ``check_recipe`` finds; a plugin that raises or returns
    something other than a list of problems is named, like a plugin failing in any other hook."""
    caller = pm.subset_hook_caller("check_recipe", _others(pm, [plugin]))
    try:
        results = caller(recipe=recipe, options=options, slots=slots)
    except DllmDecodeError:
        raise
    except Exception as exc:
        raise PluginError(f"{_where(recipe)}: plugin {name!r} raised in check_recipe: {type(exc).__name__}: {exc}",
                          plugin=name, hook="check_recipe") from exc
    problems: list[str] = []
    for result in results:
        if isinstance(result, str):
            # one problem, not one per character
            problems.append(result)
        elif isinstance(result, (list, tuple)):
            problems.extend(str(p) for p in result)
        elif result is not None:
            raise PluginError(f"{_where(recipe)}: plugin {name!r} returned a {type(result).__name__} from "
                              f"check_recipe ({result!r:.80}); it must return a list of problems or None",
                              plugin=name, hook="check_recipe")
    return problems


def _slot_entries(recipe: Recipe, pm: PluginManager) -> tuple[dict[str, SlotEntry], dict[str, str]]:
    """Each slot's plugin and parameters, with ``policy:`` expanded; and where each came from."""
    entries: dict[str, SlotEntry] = {s: recipe.slot(s) for s in SLOTS if recipe.slot(s) is not None}
    origin: dict[str, str] = {s: s for s in entries}          # slot -> where its entry came from
    if recipe.policy is not None:
        plugin = _lookup(pm, recipe, "policy", recipe.policy.plugin)
        filled = implemented_slots(pm, plugin)
        if not filled:
            raise RecipeError(f"{_where(recipe)}: policy: plugin {recipe.policy.plugin!r} fills no slot")
        for slot in filled:
            if slot not in entries:
                entries[slot] = SlotEntry(plugin=recipe.policy.plugin, params=dict(recipe.policy.params))
                origin[slot] = "policy"
            elif entries[slot].plugin == recipe.policy.plugin:
                entries[slot] = SlotEntry(plugin=entries[slot].plugin,
                                          params={**recipe.policy.params, **entries[slot].params})
    for slot in SLOTS:
        if slot not in entries and slot not in OPTIONAL_SLOTS:
            raise RecipeError(f"{_where(recipe)}: slot {slot!r} is empty; name a plugin for it "
                              f"(registered: {', '.join(_fillers(pm, slot)) or 'none'})")
    return entries, origin


def _merge_params(recipe: Recipe, pm: PluginManager, entries: dict[str, SlotEntry], origin: dict[str, str]):
    """Every slot of one plugin shares one options object: merge, refusing contradictions."""
    merged: dict[str, dict[str, Any]] = {}
    key_origin: dict[tuple[str, str], str] = {}
    plugins: dict[str, Any] = {}
    for slot, entry in entries.items():
        plugin = _lookup(pm, recipe, origin[slot], entry.plugin)
        if slot not in implemented_slots(pm, plugin):
            raise RecipeError(f"{_where(recipe)}: {origin[slot]}: plugin {entry.plugin!r} does not implement "
                              f"{slot!r} (it fills: {', '.join(implemented_slots(pm, plugin)) or 'no slot'})")
        plugins[entry.plugin] = plugin
        params = merged.setdefault(entry.plugin, {})
        for key, value in entry.params.items():
            if key in params and params[key] != value:
                raise RecipeError(f"{_where(recipe)}: {slot}.{key}: {value!r} contradicts "
                                  f"{key_origin[(entry.plugin, key)]}.{key}: {params[key]!r} "
                                  f"(both configure plugin {entry.plugin!r})")
            params[key] = value
            key_origin.setdefault((entry.plugin, key), origin[slot])
    return merged, key_origin, plugins


def _validate(recipe: Recipe, name: str, meta: PluginMeta, params: dict[str, Any],
              entries: dict[str, SlotEntry], key_origin: dict[tuple[str, str], str]) -> Any:
    try:
        return meta.options.model_validate(params)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(options)"
            slot = key_origin.get((name, str(err["loc"][0]) if err["loc"] else ""),
                                  next((s for s, e in entries.items() if e.plugin == name), "observers"))
            msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            # a validator of the whole options names the values it compares: the mapping would bury them
            got = (f" (got {err['input']!r})" if err["type"] not in ("extra_forbidden", "missing")
                   and not isinstance(err["input"], dict) else "")
            allowed = (f"; {name} takes: {', '.join(meta.options.model_fields) or 'no parameters'}"
                       if err["type"] == "extra_forbidden" else "")
            lines.append(f"{_where(recipe)}: {slot}.{key}: {msg}{got} [plugin {name!r}]{allowed}")
        raise RecipeError("\n".join(lines)) from None


def _pairing_problems(recipe: Recipe, metas: dict[str, PluginMeta],
                      slot_of: dict[str, tuple[str, ...]]) -> list[str]:
    """``PluginMeta.pairs``: a slot of a plugin that needs another of the same plugin."""
    problems = []
    for name, meta in metas.items():
        for slot, other in meta.pairs:
            if slot in slot_of[name] and other not in slot_of[name]:
                problems.append(f"{_where(recipe)}: {slot}: plugin {name!r} needs its own {other} hook; set "
                                f"`{other}: {name}` too (or `policy: {name}`)")
    return problems


def _resize_problems(recipe: Recipe, entries: dict[str, SlotEntry], metas: dict[str, PluginMeta]) -> list[str]:
    """A canvas rule moves columns under every other plugin: each must declare that it copes
    (``PluginMeta.resizable``; a cache rebuilds after the engine clears its store)."""
    rule = entries.get("resize_canvas")
    if rule is None:
        return []
    return [f"{_where(recipe)}: {slot}: plugin {entry.plugin!r} does not declare that it copes with rows "
            f"that grow during a request (PluginMeta.resizable), which resize_canvas plugin {rule.plugin!r} "
            "makes them do; choose another plugin for this slot" for slot, entry in entries.items()
            if entry.plugin != rule.plugin and not metas[entry.plugin].resizable]


def load_auxiliary(policy: BoundPolicy, device: Any, dtype: str, load: Any = None) -> dict[str, dict[str, Any]]:
    """The auxiliary models the plugins declare (``PluginMeta.auxiliary``), loaded once by
    ``load(path, dtype, device)`` (default :func:`load_causal_lm`; a server passes one that
    shares a model among its decoders): plugin name -> option name -> model."""
    from dllm_decode.models.loader import load_causal_lm

    load = load or load_causal_lm

    def one(name: str, key: str) -> Any:
        try:
            return load(getattr(policy.options[name], key), dtype, device)
        except CheckpointError as exc:      # named as the option that gave the path, or its --set
            r = policy.recipe
            raise CheckpointError(blame_overrides(f"{_where(r)}: [plugin {name!r}] {key}: {exc}", r.source,
                                                  r.overrides, r)) from None

    return {name: {key: one(name, key) for key in policy.metas[name].auxiliary}
            for name in policy.plugin_names if policy.metas[name].auxiliary}


def _direct(caller: Any) -> Any:
    """A caller restricted to one plugin has one implementation: call it directly with the
    arguments it names, which skips pluggy's per-call dispatch (a measurable share of a step on
    small models). With hook tracing on (DLLM_DECODE_TRACE), or for wrappers, keep pluggy's
    caller so every call is traced."""
    impls = caller.get_hookimpls()
    if os.environ.get(TRACE_ENV, "") not in ("", "0") or len(impls) != 1 or impls[0].hookwrapper \
            or getattr(impls[0], "wrapper", False):
        return caller
    function, names = impls[0].function, impls[0].argnames

    def call(**kwargs: Any) -> Any:
        return function(*[kwargs[n] for n in names])

    return call


def _others(pm: PluginManager, keep: list[Any]) -> list[Any]:
    ids = {id(p) for p in keep}
    return [p for p in pm.get_plugins() if id(p) not in ids]
