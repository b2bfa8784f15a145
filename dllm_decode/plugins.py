"""Plugin manager: entry-point discovery, blocking, tracing, and binding a recipe's slots.

Built-in policies and caches are ordinary plugins listed in the ``dllm_decode`` entry-point
group of this distribution; third-party plugins are the same thing in another distribution.
A plugin is any object (usually a module) with ``@hookimpl`` functions and, optionally, a
``dllm_meta`` attribute (:class:`PluginMeta`) declaring its options model and capabilities.

Environment variables:
``DLLM_DECODE_BLOCK``  comma-separated plugin names never to register (ablations).
``DLLM_DECODE_TRACE``  when set (non-empty, not ``0``), every hook call is written to stderr.
"""

from __future__ import annotations

import os
import re
import sys
import typing
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy
from pydantic import BaseModel, ConfigDict

from dllm_decode import hookspecs
from dllm_decode.errors import PluginError

ENTRY_POINT_GROUP = hookspecs.PROJECT
BLOCK_ENV = "DLLM_DECODE_BLOCK"
TRACE_ENV = "DLLM_DECODE_TRACE"


class PluginOptions(BaseModel):
    """Base of every plugin's options model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def requires(self) -> tuple[str, ...]:
        """Model capabilities these option values need beyond the plugin's ``requires`` (an
        option that only works block by block, say), checked with them when the recipe meets
        the model."""
        return ()


class NoOptions(PluginOptions):
    """Options of a plugin that takes none."""


@dataclass(frozen=True)
class PluginMeta:
    """What a plugin declares about itself (the ``dllm_meta`` attribute of the plugin object).

    ``options``: pydantic model of its parameters (one model shared by every slot it fills).
    ``revocable``: may re-mask committed tokens (WINO-style); the engine records every re-mask.
    ``exact``: for caches, whether tokens equal those of a plain forward (None: not a cache).
    ``requires``: model capabilities the plugin needs: ``"compute_plans"`` (a model that runs
    ``ComputePlan``s), ``"bidirectional"`` (attention over the whole canvas: feature reuse,
    shadow queries, attention weights and the layer-adaptive executor have no block-causal form),
    ``"block_causal"`` (a model decoded block by block, whose finished blocks never change).
    Checked when the recipe meets the model.
    ``idle_steps``: as ``select_tokens``, may commit nothing in a step, because its reference
    schedule rounds a step's count down to zero (Dream) or draws it at random (Dream's
    ``origin``). The engine then skips its no-progress check; ``generation.max_steps`` still
    bounds the request.
    ``pairs``: ``(slot, other)`` pairs: where the recipe gives this plugin ``slot``, it must give
    it ``other`` too (e.g. ``("select_tokens", "score")``: its selection reads what its own
    score computes). Checked when the recipe is resolved.
    ``auxiliary``: names of options holding the directory of an autoregressive model
    (``AutoModelForCausalLM``, e.g. APD's verifier); the engine loads each once per decoder, in
    the recipe's dtype on the model's device, and hands it to every hook as ``aux[option]``.
    ``families``: model families it supports (``ModelSpec.family``); empty: any. Checked when
    the recipe meets the model.
    ``resizable``: copes with a ``resize_canvas`` rule growing rows between its calls (it keeps
    no columns across steps, or maps them through ``state.last.resize``; a cache rebuilds what it
    reuses, since the engine clears the store at every resize). A recipe with a canvas rule is
    refused at load time unless every other plugin it uses declares it.
    ``drops_rows``: as ``cache_policy``, reads the cache store row by row only through
    ``CacheStore.batch_rows`` (or not at all: its plans are all it gives the model), so once a
    row has finished the engine may drop the row's part of the store and leave the row out of
    every forward (not under a revocable selection, which may re-mask a finished row).
    """

    summary: str = ""
    options: type[PluginOptions] = NoOptions
    revocable: bool = False
    exact: bool | None = None
    requires: tuple[str, ...] = ()
    idle_steps: bool = False
    pairs: tuple[tuple[str, str], ...] = ()
    auxiliary: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    resizable: bool = False
    drops_rows: bool = False

    def __post_init__(self) -> None:
        # Refused here, where the plugin author builds it, rather than as an AttributeError deep
        # in `dllm-decode plugins` or the recipe loader, which would take every plugin down.
        problem = meta_problem(self)
        if problem is not None:
            raise TypeError(f"PluginMeta: {problem}")


def meta_problem(meta: Any) -> str | None:
    """What is wrong with a plugin's declared ``dllm_meta`` (None: nothing)."""
    if not isinstance(meta, PluginMeta):
        return f"dllm_meta is a {type(meta).__name__}, not a PluginMeta"
    if not (isinstance(meta.options, type) and issubclass(meta.options, BaseModel)):
        return (f"options is {meta.options!r}, not a pydantic model class "
                "(derive the options model from dllm_decode.PluginOptions)")
    if not isinstance(meta.summary, str):
        return f"summary is a {type(meta.summary).__name__}, not a str"
    for flag in ("revocable", "idle_steps", "resizable", "drops_rows"):
        if not isinstance(getattr(meta, flag), bool):
            return f"{flag} is {getattr(meta, flag)!r}, not True or False"
    if meta.exact is not None and not isinstance(meta.exact, bool):
        return f"exact is {meta.exact!r}, not True, False or None"
    # a bare string would be read character by character: requires="compute_plans" -> "c", "o", ...
    for key in ("requires", "auxiliary", "families"):
        value = getattr(meta, key)
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            return f"{key} is {value!r}, not a tuple of names"
    if not isinstance(meta.pairs, (tuple, list)) or not all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(s in hookspecs.SLOTS for s in p) for p in meta.pairs):
        return (f"pairs is {meta.pairs!r}, not a tuple of (slot, slot) pairs "
                f"(slots: {', '.join(hookspecs.SLOTS)})")
    return None


DEFAULT_META = PluginMeta()


def meta_of(plugin: Any) -> PluginMeta:
    meta = getattr(plugin, "dllm_meta", None)
    return meta if isinstance(meta, PluginMeta) else DEFAULT_META


def _env_list(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


class BrokenPluginWarning(UserWarning):
    """An installed plugin could not be imported or registered; it is skipped."""


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that failed to import or register: what ``dllm-decode plugins`` lists as
    broken and what a recipe naming it is told."""

    name: str
    entry_point: str
    distribution: str | None
    version: str | None
    error: str

    def describe(self) -> str:
        origin = f", distribution {self.distribution} {self.version}" if self.distribution else ""
        return f"plugin {self.name!r} (entry point {self.entry_point!r}{origin}) failed to load: {self.error}"


# The distribution whose entry points are the built-ins: a plugin of another distribution never
# takes one of their names (see get_plugin_manager).
BUILTIN_DISTRIBUTION = "dllm-decode"


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    name = _dist_name(ep)
    return name is not None and re.sub(r"[-_.]+", "-", name).lower() == BUILTIN_DISTRIBUTION


def _origin(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"entry point {ep.value!r}" + (f", distribution {_dist_name(ep)} {dist.version}" if dist is not None else "")


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the distribution each plugin came from, and the installed plugins
    that could not be loaded (skipped, so one broken package never takes the others down)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, metadata.Distribution] = {}
        self.broken: dict[str, BrokenPlugin] = {}


def get_plugin_manager(block: list[str] | tuple[str, ...] = (), load_entrypoints: bool = True,
                       extra_plugins: dict[str, Any] | None = None) -> PluginManager:
    """A fresh plugin manager (never a module-level singleton: two decoders never interfere).

    An installed plugin that fails to import or to register is skipped with a
    :class:`BrokenPluginWarning` and recorded in ``pm.broken``. A third-party entry point that
    takes a built-in's name is refused with a warning (the built-in stays, loaded or broken);
    two third-party entry points of one name are both refused and the name recorded broken, so
    what loads never depends on the order of ``sys.path``.

    :param block: plugin names to block, on top of ``DLLM_DECODE_BLOCK``.
    :param extra_plugins: name -> plugin object (usually an imported module) registered directly
        (tests, notebooks).
    :raises PluginError: a plugin given in ``extra_plugins`` is not valid.
    """
    pm = PluginManager()
    for name in [*_env_list(BLOCK_ENV), *block]:
        pm.set_blocked(name)
    if load_entrypoints:
        by_name: dict[str, list[metadata.EntryPoint]] = {}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            by_name.setdefault(ep.name, []).append(ep)
        # built-ins first, then the others by name: registration order is the same on every path
        names = sorted(by_name, key=lambda n: (not any(_is_builtin(ep) for ep in by_name[n]), n))
        for name in names:
            if not pm.is_blocked(name):
                _load_entry_points(pm, name, by_name[name])
    for name, plugin in (extra_plugins or {}).items():
        if not pm.is_blocked(name):
            _register(pm, plugin, name, dist=None)
            _check_pending(pm, name)
    if os.environ.get(TRACE_ENV, "") not in ("", "0"):
        enable_tracing(pm)
    return pm


def _load_entry_points(pm: PluginManager, name: str, eps: list[metadata.EntryPoint]) -> None:
    """Load the one plugin that may own ``name``: the built-in if there is one (a third-party
    entry point of the same name is refused unloaded, so it can neither replace the built-in nor,
    failing to import, disable it), else the only third-party entry point."""
    eps = sorted(eps, key=lambda ep: (_dist_name(ep) or "", ep.value))   # not in sys.path order
    builtins = [ep for ep in eps if _is_builtin(ep)]
    others = [ep for ep in eps if not _is_builtin(ep)]
    if builtins:
        owner = builtins[0]
        _load_entry_point(pm, owner)
        for ep in others:
            warnings.warn(f"plugin {name!r} ({_origin(ep)}) not loaded: {name!r} is the name of the built-in "
                          f"plugin ({_origin(owner)}), which is kept; give the entry point another name",
                          BrokenPluginWarning, stacklevel=3)
    elif len(others) == 1:
        _load_entry_point(pm, others[0])
    else:
        _record_broken(pm, others[0], f"the name is taken by {len(others)} entry points "
                       f"({'; '.join(_origin(ep) for ep in others)}); none is loaded, rename all but one",
                       stacklevel=4)


def _load_entry_point(pm: PluginManager, ep: metadata.EntryPoint) -> None:
    """Import and register one installed plugin; a failure is recorded and warned about."""
    try:
        plugin = ep.load()
        _register(pm, plugin, ep.name, dist=ep.dist)
        _check_pending(pm, ep.name)
    except (Exception, SystemExit) as exc:
        # any error of a third-party import, sys.exit() in its module body included: report it,
        # keep the others (KeyboardInterrupt still stops the program)
        if pm.get_plugin(ep.name) is not None:
            pm.unregister(name=ep.name)
        pm.distributions.pop(ep.name, None)
        if isinstance(exc, SystemExit):
            error = f"its import called sys.exit({exc.code!r})"
        else:
            error = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        _record_broken(pm, ep, error, stacklevel=5)


def _record_broken(pm: PluginManager, ep: metadata.EntryPoint, error: str, stacklevel: int) -> None:
    # stacklevel: the warning points at the code that called get_plugin_manager
    dist = getattr(ep, "dist", None)
    pm.broken[ep.name] = BrokenPlugin(ep.name, ep.value, _dist_name(ep), dist.version if dist else None, error)
    warnings.warn(f"{pm.broken[ep.name].describe()}; skipped", BrokenPluginWarning, stacklevel=stacklevel)


def _check_pending(pm: PluginManager, name: str) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        raise PluginError(f"plugin {name!r} is not valid: {exc}", plugin=name) from exc


def _register(pm: PluginManager, plugin: Any, name: str, dist: Any) -> None:
    if isinstance(plugin, str):
        # pluggy would register the string itself, a plugin with no hooks that silently does nothing
        raise PluginError(f"plugin {name!r} is the string {plugin!r}, not a plugin object; pass the "
                          f"imported module (importlib.import_module({plugin!r}))", plugin=name)
    if hasattr(plugin, "dllm_meta"):
        problem = meta_problem(plugin.dllm_meta)
        if problem is not None:
            raise PluginError(f"plugin {name!r} is not valid: {problem}", plugin=name)
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginError(f"plugin {name!r} could not be registered: {exc}", plugin=name) from exc
    if not pm.get_hookcallers(plugin):
        pm.unregister(name=name)
        raise PluginError(f"plugin {name!r} ({type(plugin).__name__} {plugin!r:.80}) implements no "
                          f"{hookspecs.PROJECT} hook (mark them with dllm_decode.hookimpl)", plugin=name)
    if dist is not None:
        pm.distributions[name] = dist


def enable_tracing(pm: pluggy.PluginManager, write: Callable[[str], Any] | None = None) -> Callable[[], None]:
    """Write every hook call and result to ``write`` (stderr by default); returns an undo."""
    pm.trace.root.setwriter(write or sys.stderr.write)
    return pm.enable_tracing()


def implemented_slots(pm: pluggy.PluginManager, plugin: Any) -> tuple[str, ...]:
    """The decision slots a registered plugin implements, in step order."""
    names = {caller.name for caller in (pm.get_hookcallers(plugin) or [])}
    return tuple(slot for slot in hookspecs.SLOTS if slot in names)


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    slots: tuple[str, ...]
    observers: tuple[str, ...]
    meta: PluginMeta
    parameters: list[dict[str, Any]] = field(default_factory=list)
    broken: str | None = None           # why an installed plugin could not be loaded

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "distribution": self.distribution, "version": self.version,
            "broken": self.broken,
            "slots": list(self.slots), "observers": list(self.observers),
            "summary": self.meta.summary, "revocable": self.meta.revocable,
            "exact": self.meta.exact, "requires": list(self.meta.requires),
            "pairs": [list(p) for p in self.meta.pairs], "auxiliary": list(self.meta.auxiliary),
            "families": list(self.meta.families), "resizable": self.meta.resizable,
            "drops_rows": self.meta.drops_rows, "idle_steps": self.meta.idle_steps,
            "parameters": self.parameters,
        }


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an options field holds (``Options | None`` -> ``[Options]``)."""
    return [a for a in (typing.get_args(annotation) or (annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)]


def describe_options(model: type[PluginOptions]) -> list[dict[str, Any]]:
    """Name, type, default, bounds and description of every parameter of an options model."""
    rows = []
    for name, f in model.model_fields.items():
        bounds = {}
        for m in f.metadata:
            for attr in ("ge", "gt", "le", "lt"):
                if getattr(m, attr, None) is not None:
                    bounds[attr] = getattr(m, attr)
        ann = f.annotation
        if typing.get_origin(ann) is typing.Literal:
            type_name = " | ".join(repr(a) for a in typing.get_args(ann))
        else:
            type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            # a nested options model reads as its keys, not as a dotted class path
            for arg in nested_models(ann):
                keys = "{" + ", ".join(arg.model_fields) + "}"
                type_name = type_name.replace(f"{arg.__module__}.{arg.__qualname__}", keys)
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        rows.append({"name": name, "type": type_name, "default": default, "required": f.is_required(),
                     "bounds": bounds, "description": f.description or ""})
    return rows


def list_plugins(pm: PluginManager) -> list[PluginInfo]:
    """Every registered plugin with its distribution, slots and parameters, sorted by name."""
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        dist = pm.distributions.get(name)
        callers = {c.name for c in (pm.get_hookcallers(plugin) or [])}
        info = PluginInfo(
            name=name,
            distribution=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None,
            slots=implemented_slots(pm, plugin),
            observers=tuple(o for o in hookspecs.OBSERVERS if o in callers),
            meta=DEFAULT_META)
        # A plugin registered past get_plugin_manager's checks (pm.register) may still declare
        # something unreadable: list it as broken rather than fail the whole listing.
        problem = meta_problem(plugin.dllm_meta) if hasattr(plugin, "dllm_meta") else None
        if problem is None:
            info.meta = meta_of(plugin)
            try:
                info.parameters = describe_options(info.meta.options)
            except Exception as exc:
                problem = f"its options model cannot be described: {type(exc).__name__}: {exc}"
        if problem is not None:
            info.meta, info.parameters, info.broken = DEFAULT_META, [], f"dllm_meta: {problem}"
        infos.append(info)
    return sorted(infos, key=lambda i: i.name)


def broken_plugins(pm: PluginManager) -> list[PluginInfo]:
    """The installed plugins that could not be loaded, as rows marked broken, sorted by name."""
    return [PluginInfo(name=b.name, distribution=b.distribution, version=b.version, slots=(), observers=(),
                       meta=DEFAULT_META, broken=f"entry point {b.entry_point!r}: {b.error}")
            for b in sorted(pm.broken.values(), key=lambda b: b.name)]
