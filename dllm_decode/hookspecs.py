"""The hook contracts of dllm-decode: the only file that says what a plugin may implement.

A decoding policy is a recipe that assigns one plugin to each *slot*. A slot is one of the
decision hooks below (``choose_span``, ``decide_phase``, ``cache_policy``, ``score``,
``select_tokens``, ``resize_canvas``). The engine calls a slot's hook on the assigned plugin only, so a plugin that
implements several hooks (SlowFast: span, phase and selection) can have any one of them swapped
for another plugin in YAML without the others noticing. Observers (``on_request_start``,
``after_step``, ``on_request_end``) fan out to every plugin the recipe uses plus the recipe's
``observers`` list. ``check_recipe`` runs once at load time for every plugin the recipe uses.

Every hook may accept any subset of its documented parameters (pluggy passes only what the
implementation names). Shared arguments:

``state``
    The batched :class:`dllm_decode.state.DecodeState` of the current request. Plugins read it;
    they never write its tensors (the engine commits tokens).
``options``
    The plugin's own validated options (an instance of the plugin's pydantic ``Options`` model),
    the same object in every slot the plugin fills.
``scratch``
    A ``dict`` private to this plugin and this request: the place for state shared between a
    plugin's hooks (e.g. SlowFast's exploration history). It is created empty at request start
    and dropped at request end; there is no other place for mutable plugin state.
``aux``
    The auxiliary models the plugin declares (``dllm_meta.auxiliary``), by option name, loaded
    once per decoder by the engine (e.g. APD's ``aux["verifier"]``); empty for most plugins.

Shapes: ``B`` rows, ``L`` canvas length (left-padded prompt + ``gen_length``), ``q`` query
positions computed by the model this step, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    import torch

    from dllm_decode.config import Recipe
    from dllm_decode.state import Candidates, DecodeState, Phase, Resize, Selection

PROJECT = "dllm_decode"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The decision hooks a recipe assigns, in the order the engine calls them each step.
SLOTS: tuple[str, ...] = ("choose_span", "decide_phase", "cache_policy", "score", "select_tokens", "resize_canvas")
#: Slots a recipe may leave empty: no phase label, a plain full forward, a fixed canvas.
OPTIONAL_SLOTS: tuple[str, ...] = ("decide_phase", "cache_policy", "resize_canvas")
#: Fan-out hooks.
OBSERVERS: tuple[str, ...] = ("on_request_start", "after_step", "on_request_end")


# --------------------------------------------------------------------------- load time


@hookspec
def check_recipe(recipe: Recipe, options: Any, slots: tuple[str, ...]) -> list[str] | None:
    """Refuse incompatible settings before any model is loaded.

    Called once per plugin the recipe uses, when the recipe is resolved.

    :param recipe: the whole validated recipe (generation settings, every slot).
    :param options: this plugin's validated options.
    :param slots: the slots this plugin fills in this recipe.
    :return: a list of human-readable problems (one string is one problem; empty or ``None``: fine).
        Each problem should name the setting at fault, e.g. ``"generation.steps (7) must be a
        multiple of the number of blocks (2)"``. The loader raises one ``RecipeError`` that
        names the recipe file, the plugin and every problem.
    """


# --------------------------------------------------------------------------- decision hooks


@hookspec(firstresult=True)
def choose_span(state: DecodeState, options: Any, scratch: dict, aux: dict) -> torch.Tensor | None:
    """Choose the active region of every row for this step.

    :param state: the decoding state before this step's forward.
    :return: a ``LongTensor`` of shape ``(B, 2)`` holding absolute canvas positions
        ``[start, end)`` per row, with ``state.gen_start <= start <= end <= state.length``.
        Only masked positions inside a row's span may be committed this step.
    :invariant: for an unfinished row the span must contain at least one masked position,
        otherwise the step cannot commit and the engine raises an error naming this plugin.
    """


@hookspec(firstresult=True)
def decide_phase(state: DecodeState, options: Any, scratch: dict, aux: dict) -> str | Phase | None:
    """Label the current step with a phase (e.g. SlowFast's ``"explore"`` / ``"accelerate"``).

    Called after ``choose_span`` (``state.span`` holds this step's span).

    :return: a free-form label for the whole batch, recorded in ``state.phase`` and in the
        step history (traces colour steps by it), or a :class:`dllm_decode.state.Phase` that
        also gives each row its phase (``state.phase_rows``; rows of a batch may be in
        different phases, and a cache may act on them). ``None`` means no label.
    :invariant: must not change tokens; the label is information for the other hooks.
    """


@hookspec(firstresult=True)
def cache_policy(state: DecodeState, options: Any, scratch: dict, aux: dict) -> Any:
    """Decide what the model computes this step and what it reuses.

    Called after ``decide_phase``.

    :return: a compute plan (``dllm_decode.models.ComputePlan``) that the model executes
        against the request's cache store ``state.store``, or ``None`` for a plain forward of
        the whole canvas. The plan names the absolute query positions whose logits it returns.
        Under classifier-free guidance a plan runs on both halves of the guided batch; a
        :class:`dllm_decode.guidance.Guided` instead gives the unconditional canvas its own plan
        and store, or (``reuse``) skips its forward and reuses the last guidance residual.
    :invariant: a cache that declares itself exact (``dllm_meta.exact = True``) must yield the
        same tokens as ``None`` would. Anything but ``None``, a ``ComputePlan`` or a ``Guided``
        pair of them is refused, naming the plugin; so is a plan for a model that runs only
        plain forwards, and a guided request turning from plans to ``Guided`` pairs or back.
    """


@hookspec(firstresult=True)
def score(state: DecodeState, logits: torch.Tensor, positions: torch.Tensor | None,
          options: Any, scratch: dict, shadow_logits: torch.Tensor | None, aux: dict) -> Candidates | None:
    """Turn logits into one candidate token and one confidence per queried position.

    :param logits: float tensor ``(B, q, V)``, aligned so that ``logits[:, j]`` predicts the
        token at canvas position ``positions[:, j]`` (model families with shifted logits are
        already re-aligned by the model). Classifier-free guidance, when the recipe asks for
        it, has already been combined; EOS logits are already banned when ``eos.ban`` is set.
        A finished row's are zeros where the forward ran only the unfinished rows (concepts).
    :param positions: ``LongTensor (B, q)`` of absolute canvas positions, or ``None`` when
        ``q == L`` and position ``j`` is column ``j``.
    :param shadow_logits: float tensor ``(B, S, V)`` of the plan's shadow queries
        (``ComputePlan.shadow``, WINO's verification block: column ``j`` predicts canvas
        position ``plan.shadow[:, j]`` without seeing the token there), or ``None`` when the plan
        has none. Guidance and the mask / EOS bans are applied to them as to ``logits``.
    :return: :class:`dllm_decode.state.Candidates` with ``tokens`` (long) and ``confidence``
        (float, higher means commit sooner) of shape ``(B, q)``, and optionally further
        per-position tensors ``(B, q, ...)`` in ``extra`` and anything else in ``info``. The
        engine spreads tokens, confidence and ``extra`` onto the canvas and sets the confidence
        of every position that may not be committed this step (not masked, outside the span,
        finished row) to ``-inf`` before selection.
    :invariant: committed tokens lie in ``[0, V)`` and are never the mask id; the engine checks
        the committed ones and raises naming this plugin.
    :invariant: random draws come from the rows' own keyed noise
        (``dllm_decode.draws(state, positions, stream)``), so that a fixed seed reproduces
        the output and a row samples alike alone or in any batch.
    """


@hookspec(firstresult=True)
def select_tokens(state: DecodeState, candidates: Candidates, options: Any,
                  scratch: dict, aux: dict) -> torch.Tensor | Selection | None:
    """Choose which positions to write now.

    :param candidates: canvas-wide :class:`Candidates` of shape ``(B, L)``; ``eligible`` marks
        the positions that may be committed (masked, inside the span, row unfinished) and
        ``confidence`` is ``-inf`` everywhere else.
    :return: a ``BoolTensor (B, L)`` of positions to commit, or a
        :class:`dllm_decode.state.Selection` that may also re-mask committed positions (only
        for plugins whose ``dllm_meta.revocable`` is true; the engine records every re-mask),
        and may finish rows (``Selection.finish`` (B,) bool, Prophet's early commit-all): every
        mask left in such a row is committed with its candidate, inside the span or not, and the
        row's recorded span becomes its whole generated region. Every such mask must have a
        candidate (a plan that queried it), or the engine raises.
    :invariant: commits ⊆ eligible, and at least one commit in every unfinished row (unless
        the plugin declares ``dllm_meta.idle_steps``: a schedule that rounds a step's count to
        zero, as Dream's does). The engine checks both and raises an error naming this plugin
        and the step.
    """


@hookspec(firstresult=True)
def resize_canvas(state: DecodeState, candidates: Candidates, options: Any, scratch: dict,
                  aux: dict) -> Resize | None:
    """Grow rows of the canvas: variable-length generation (DAEDAL). Optional slot.

    Called after the step's commit is written (``state`` holds the new canvas, ``state.last``
    its record) and before ``after_step``.

    :param candidates: the canvas-wide candidates ``select_tokens`` saw this step.
    :return: a :class:`dllm_decode.state.Resize` (masks inserted before columns, positions
        appended at a row's end, masked or holding a token), or ``None`` for no change. The engine
        moves every per-position tensor of the state to the new columns (canvas, masks, commit
        steps, ``ends``, ``gen_length``, this step's record and span), clears the request's cache
        stores and memoised constants, and recomputes which rows are done (``dllm_decode.canvas``).
    :invariant: only rows unfinished when the step began grow; insertions lie inside a row's
        generated region; counts are >= 0; fill ids lie in the vocabulary; a row stays within
        the model's ``max_length``. Otherwise the engine raises an error naming this plugin.
        Every other plugin of the recipe must declare ``PluginMeta.resizable`` (checked at load).
    """


# --------------------------------------------------------------------------- observers


@hookspec
def on_request_start(state: DecodeState, options: Any, scratch: dict, aux: dict) -> None:
    """A request (one batch of rows) is about to be decoded; ``scratch`` is fresh and empty.

    Use it to size per-row buffers. Return value ignored.
    """


@hookspec
def after_step(state: DecodeState, options: Any, scratch: dict, aux: dict) -> None:
    """A step has been committed.

    ``state.last`` holds the step record (span, phase, committed mask, confidences);
    tracing, metrics and streaming read it here. Return value ignored.
    """


@hookspec
def on_request_end(state: DecodeState, options: Any, scratch: dict, aux: dict) -> None:
    """Every row of the request is finished; ``state`` holds the final canvas.

    Return value ignored. ``scratch`` is dropped after this call.
    """
