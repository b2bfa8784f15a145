"""Testing kit for plugin authors: a stand-in model and the invariant suite.

Use it from pytest::

    from dllm_decode.testing import RandomLogitsModel, check_invariants

    def test_my_policy_keeps_the_contracts():
        check_invariants(RandomLogitsModel(), "recipes/my-policy.yaml")

``check_invariants`` decodes with an observer that snapshots the canvas after every step and
checks, independently of the engine's own checks: the prompt is never written; a committed
token never changes (unless the policy is revocable and the engine logged the re-mask); every
unfinished row gains a token every step; new tokens land only inside the step's span; no mask
is left at the end (positions a canvas rule adds are followed through ``state.last.resize``); the same seed gives the same output; a left-padded batch gives each row the
tokens it gets alone. :func:`invariant_cases` is a hypothesis strategy of prompts and canvas
shapes for property tests.

``check_parity`` compares the engine's tokens (and, if given, forward counts) row by row with a
reference function the author writes from the paper or the original code::

    def reference(model, prompt, recipe):          # one prompt, plain loops: list of gen ids
        ...

    check_parity(RandomLogitsModel(), "recipes/my-policy.yaml", reference)

:class:`PluginKit` bundles both around one model and the plugins under test (registered
directly, so a plugin can be tested before it is installed); ``dllm_decode.testing.pytest_plugin``
hands one out as the ``dllm_kit`` fixture. See docs/plugin-guide.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dllm_decode.config import Recipe, load_recipe, recipe_from_dict
from dllm_decode.engine import Decoder, GenerationResult
from dllm_decode.hookspecs import hookimpl
from dllm_decode.plugins import PluginManager, _register, get_plugin_manager
from dllm_decode.canvas import moved_columns
from dllm_decode.state import UNCOMMITTED

RECORDER = "invariant-recorder"


@dataclass
class StubSpec:
    family: str = "stub"
    vocab_size: int = 48
    mask_token_id: int = 47
    eos_token_id: int = 1
    eot_token_id: int | None = None
    pad_token_id: int = 0
    max_length: int = 1024
    shift_logits: bool = False


class RandomLogitsModel(torch.nn.Module):
    """A stand-in denoiser with fixed random weights: cheap, bidirectional, deterministic.

    Logits at a position depend on its token, its position counted from the row's first real
    token, and the mean embedding of the row's real tokens, so they are independent of batch
    composition and of left padding, like a real model's (up to rounding).
    """

    def __init__(self, vocab_size: int = 48, mask_token_id: int | None = None, eos_token_id: int = 1,
                 max_length: int = 1024, dim: int = 16, seed: int = 0, sharpness: float = 4.0,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        mask = vocab_size - 1 if mask_token_id is None else mask_token_id
        self.spec = StubSpec(vocab_size=vocab_size, mask_token_id=mask, eos_token_id=eos_token_id,
                             max_length=max_length)
        g = torch.Generator().manual_seed(seed)
        self.tok = torch.nn.Parameter(torch.randn(vocab_size, dim, generator=g, dtype=dtype), requires_grad=False)
        self.pos = torch.nn.Parameter(torch.randn(max_length, dim, generator=g, dtype=dtype), requires_grad=False)
        self.out = torch.nn.Parameter(torch.randn(dim, vocab_size, generator=g, dtype=dtype) * sharpness / dim ** 0.5,
                                      requires_grad=False)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                plan: Any = None, store: Any = None) -> torch.Tensor:
        if plan is not None:
            raise ValueError("RandomLogitsModel executes full forwards only (plan must be None)")
        self.calls += 1
        am = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        pos = (am.long().cumsum(1) - 1).clamp(min=0)                        # (B, L)
        e = self.tok[input_ids]                                             # (B, L, D)
        ctx = (e * am[..., None]).sum(1) / am.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        h = torch.tanh(e + self.pos[pos] + ctx[:, None, :])                 # (B, L, D)
        return h @ self.out                                                 # (B, L, V)


# ----------------------------------------------------------------------------- the suite


@dataclass(eq=False)  # plugins must be hashable
class _Recorder:
    """Observer plugin: snapshots each step (canvas, span) of every request."""

    runs: list[list[dict]] = field(default_factory=list)

    @hookimpl
    def on_request_start(self, state):
        self.runs.append([{"x": state.x.clone(), "span": None, "active": None, "step": -1,
                           "ends": state.ends.clone()}])

    @hookimpl
    def after_step(self, state):
        rec = state.last
        self.runs[-1].append({"x": state.x.clone(), "span": rec.span.clone(), "active": rec.active.clone(),
                              "step": rec.step, "remasked": rec.remasked, "resize": rec.resize,
                              "ends": state.ends.clone()})


class InvariantViolation(AssertionError):
    pass


def _as_recipe(recipe: Recipe | str | Path | dict, overrides: Sequence[str]) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe_from_dict(recipe.to_dict(), source=recipe.source, overrides=list(overrides))
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe, overrides=list(overrides))
    return load_recipe(recipe, overrides=list(overrides))


def _with_batch_size(recipe: Recipe, batch_size: int, **sections: Any) -> Recipe:
    """``recipe`` decoding ``batch_size`` rows at a time (and with ``sections`` replaced)."""
    return recipe_from_dict({**recipe.to_dict(), **sections,
                             "generation": {**recipe.generation.model_dump(), "batch_size": batch_size}},
                            source=recipe.source)


def default_prompts(vocab_size: int, mask_id: int, n: int = 4, seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths (so batches are left-padded) avoiding the mask id."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab_size, (3 + 2 * i,), generator=g).tolist()
        out.append([t if t != mask_id else 2 for t in ids])
    return out


def check_invariants(model: Any, recipe: Recipe | str | Path | dict, prompts: Sequence[Sequence[int]] | None = None,
                     pm: PluginManager | None = None, overrides: Sequence[str] = (),
                     check_batch_invariance: bool = True) -> None:
    """Decode ``prompts`` under ``recipe`` and assert every engine contract from the outside.

    :param model: any denoiser (e.g. :class:`RandomLogitsModel` or a loaded checkpoint).
    :param recipe: a Recipe, a recipe file, or a dict.
    :param pm: plugin manager holding the plugin under test (default: installed plugins).
    :param check_batch_invariance: compare the padded batch with each row alone, at any
        temperature: built-in draws are per row (``dllm_decode.draws``), so a plugin that
        draws from a request-wide generator fails here when it samples.
    :raises InvariantViolation: describing the first broken invariant.
    """
    recipe = _as_recipe(recipe, overrides)
    prompts = [list(p) for p in (prompts or default_prompts(model.spec.vocab_size, model.spec.mask_token_id))]
    recorder = _Recorder()
    base_pm = pm or get_plugin_manager()
    base_pm.unregister(name=RECORDER)          # a stale one from an interrupted run
    base_pm.register(recorder, name=RECORDER)
    rec_recipe = _with_batch_size(recipe, len(prompts), observers=[*recipe.observers, RECORDER])
    try:
        decoder = Decoder(model, rec_recipe, pm=base_pm)
        result = decoder.generate(prompts, keep_states=True)
        _check_run(recorder.runs[-1], result.states[-1], decoder)
        again = Decoder(model, rec_recipe, pm=base_pm).generate(prompts)
        if again.tokens != result.tokens:
            raise InvariantViolation("same recipe and seed gave different tokens on a second run")
        if check_batch_invariance and len(prompts) > 1:
            alone = Decoder(model, _with_batch_size(rec_recipe, 1), pm=base_pm).generate(prompts)
            for i, (a, b) in enumerate(zip(result.tokens, alone.tokens)):
                if a != b:
                    raise InvariantViolation(f"row {i} decoded in a padded batch differs from the row alone:\n"
                                             f"  batch: {a}\n  alone: {b}")
    finally:
        base_pm.unregister(name=RECORDER)


def _check_run(snaps: list[dict], final, decoder: Decoder) -> None:
    revocable, idle_ok = decoder.policy.revocable, decoder.policy.idle_steps
    mask = final.mask_id
    P = final.gen_start
    x0 = snaps[0]["x"]
    remasks = {step: idx for step, idx in final.remask_log}
    for prev, cur in zip(snaps, snaps[1:]):
        step, x_prev, x_cur = cur["step"], _follow(prev, cur, mask), cur["x"]
        if not torch.equal(x_cur[:, :P], x0[:, :P]):
            raise InvariantViolation(f"step {step}: the prompt region was written")
        was_set = x_prev != mask
        changed = was_set & (x_cur != x_prev)
        if changed.any():
            allowed = torch.zeros_like(changed)
            if revocable and step in remasks:
                r = remasks[step]
                allowed[r[:, 0], r[:, 1]] = True
            if (changed & ~allowed).any() or (changed & (x_cur != mask)).any():
                where = torch.nonzero(changed & ~allowed)[:5].tolist()
                raise InvariantViolation(f"step {step}: committed tokens changed at (row, col) {where}")
        new = (x_prev == mask) & (x_cur != mask)                          # (B, L)
        active = cur["active"]
        stalled = active & ~new.any(dim=1)
        if stalled.any() and not idle_ok:
            raise InvariantViolation(f"step {step}: unfinished row(s) {torch.nonzero(stalled).flatten().tolist()} "
                                     "gained no token")
        cols = torch.arange(x_cur.shape[1])
        span = cur["span"]
        inside = (cols >= span[:, :1]) & (cols < span[:, 1:])
        eos_fill = _eos_filled(x_cur, decoder, final)
        if (new & ~inside & ~eos_fill).any():
            where = torch.nonzero(new & ~inside & ~eos_fill)[:5].tolist()
            raise InvariantViolation(f"step {step}: tokens written outside the span at (row, col) {where}")
    in_rows = torch.arange(final.length)[None, :] < final.ends[:, None]
    if ((final.x == mask) & in_rows).any():
        raise InvariantViolation("masks left at the end of decoding")
    if ((final.commit_step == UNCOMMITTED) & in_rows)[:, P:].any():
        raise InvariantViolation("a generated position has no commit step")


def _follow(prev: dict, cur: dict, mask: int) -> torch.Tensor:
    """The previous snapshot in the columns of ``cur``: a canvas rule may have grown rows after
    the step's commit. Inserted positions read as masks (so a token there would count as new);
    appended positions holding a token read as that token (written when created)."""
    r, x_cur = cur.get("resize"), cur["x"]
    if r is None:
        return prev["x"]
    moved = moved_columns(r, prev["ends"], prev["x"].shape[1])                  # (B, L_prev)
    out = torch.full_like(x_cur, mask)
    cols = torch.arange(x_cur.shape[1])[None, :]
    app = torch.as_tensor(0 if r.append is None else r.append).long().expand(x_cur.shape[0])
    appended = (cols < cur["ends"][:, None]) & (cols >= (cur["ends"] - app)[:, None])
    past_end = cols >= cur["ends"][:, None]
    out = torch.where(appended | past_end, x_cur, out)
    keep = moved >= 0
    rows = torch.arange(x_cur.shape[0])[:, None].expand_as(moved)
    out[rows[keep], moved[keep]] = prev["x"][keep]
    return out


def _eos_filled(x: torch.Tensor, decoder: Decoder, final) -> torch.Tensor:
    """Positions after a row's first EOS: the engine may fill them at once when eos.stop is on."""
    if not decoder.gen.eos.stop or not decoder.eos_ids:
        return torch.zeros_like(x, dtype=torch.bool)
    is_eos = torch.isin(x, torch.tensor(decoder.eos_ids)) & (torch.arange(x.shape[1]) >= final.gen_start)
    return is_eos.long().cumsum(1) > 0


def invariant_cases(vocab_size: int = 48, mask_id: int | None = None, max_prompt: int = 12,
                    gen_lengths: Sequence[int] = (4, 8, 12, 16), max_batch: int = 4):
    """Hypothesis strategy: ``(prompts, gen_length, block_length)`` with valid block sizes."""
    from hypothesis import strategies as st

    mask = vocab_size - 1 if mask_id is None else mask_id
    token = st.integers(2, vocab_size - 1).filter(lambda t: t != mask)
    prompts = st.lists(st.lists(token, min_size=1, max_size=max_prompt), min_size=1, max_size=max_batch)

    @st.composite
    def cases(draw):
        gen = draw(st.sampled_from(list(gen_lengths)))
        block = draw(st.sampled_from([b for b in range(1, gen + 1) if gen % b == 0]))
        return draw(prompts), gen, block

    return cases()


# ----------------------------------------------------------------------------- parity


@dataclass
class ReferenceOutput:
    """What a reference function may return when it also counts its forwards."""

    tokens: Sequence[int]         # the gen_length generated ids
    nfe: int | None = None        # model forwards it needed for this prompt


#: ``reference_fn(model, prompt, recipe)`` -> generated ids, or a :class:`ReferenceOutput`.
ReferenceFn = Callable[[Any, list[int], Recipe], "Sequence[int] | ReferenceOutput"]


class ParityMismatch(AssertionError):
    pass


def _as_ids(tokens: Any) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.flatten().tolist()
    return [int(t) for t in tokens]


def check_parity(model: Any, recipe: Recipe | str | Path | dict, reference_fn: ReferenceFn,
                 prompts: Sequence[Sequence[int]] | None = None, pm: PluginManager | None = None,
                 overrides: Sequence[str] = (), batched: bool = True) -> GenerationResult:
    """Decode ``prompts`` under ``recipe`` and assert each row equals ``reference_fn``'s tokens.

    :param reference_fn: called once per prompt as ``reference_fn(model, prompt, recipe)``
        (``recipe`` with ``generation.batch_size`` set as decoded); returns the ``gen_length``
        generated ids, or a :class:`ReferenceOutput` to compare the row's forward count too.
        Write it independently of the plugin (plain per-row loops, from the specification),
        and mirror the engine's one documented rule: the mask token's logit is ``-inf``.
    :param batched: decode all prompts as one left-padded batch (default; also checks that
        padding changes nothing), or each prompt alone.
    :return: the engine's result, for further checks.
    :raises ParityMismatch: naming the first differing row and generated position.
    """
    recipe = _as_recipe(recipe, overrides)
    prompts = [list(p) for p in (prompts or default_prompts(model.spec.vocab_size, model.spec.mask_token_id))]
    batch = len(prompts) if batched else 1
    run = _with_batch_size(recipe, batch)
    result = Decoder(model, run, pm=pm or get_plugin_manager()).generate(prompts)
    for i, (prompt, row) in enumerate(zip(prompts, result.rows)):
        ref = reference_fn(model, list(prompt), run)
        ref_nfe = ref.nfe if isinstance(ref, ReferenceOutput) else None
        expected = _as_ids(ref.tokens if isinstance(ref, ReferenceOutput) else ref)
        where = f"row {i} (prompt {prompt}, {'batch of ' + str(batch) if batch > 1 else 'alone'})"
        if len(expected) != len(row.tokens):
            raise ParityMismatch(f"{where}: the reference returned {len(expected)} tokens, the engine "
                                 f"generated {len(row.tokens)} (reference_fn must return the whole "
                                 "generated region)")
        if expected != row.tokens:
            j = next(k for k, (a, b) in enumerate(zip(row.tokens, expected)) if a != b)
            raise ParityMismatch(f"{where} differs from the reference at generated position {j}: engine "
                                 f"{row.tokens[j]} (committed at step {row.commit_step[j]}), reference "
                                 f"{expected[j]}\n  engine:    {row.tokens}\n  reference: {expected}")
        if ref_nfe is not None and ref_nfe != row.nfe:
            raise ParityMismatch(f"{where}: same tokens, but the engine used {row.nfe} forwards and the "
                                 f"reference {ref_nfe}")
    return result


# ----------------------------------------------------------------------------- the kit


@dataclass
class PluginKit:
    """The invariant suite and the parity check around one model and the plugins under test.

    ``plugins`` maps recipe names to plugin objects (usually modules) registered directly, on
    top of the installed entry points; a name given here replaces an installed plugin of the
    same name, so the code under test is the working copy, not an older installed release.
    """

    model: Any = field(default_factory=RandomLogitsModel)
    plugins: dict[str, Any] = field(default_factory=dict)

    def register(self, name: str, plugin: Any) -> PluginKit:
        self.plugins[name] = plugin
        return self

    def plugin_manager(self) -> PluginManager:
        """A fresh manager: installed entry points plus this kit's plugins."""
        pm = get_plugin_manager()
        for name, plugin in self.plugins.items():
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            pm.broken.pop(name, None)            # the working copy replaces a broken installed one too
            pm.distributions.pop(name, None)
            # the checks an installed plugin passes (a readable dllm_meta, at least one hook)
            _register(pm, plugin, name, dist=None)
        return pm

    def check_invariants(self, recipe: Recipe | str | Path | dict, prompts: Sequence[Sequence[int]] | None = None,
                         model: Any = None, **kwargs: Any) -> None:
        """:func:`check_invariants` on this kit's model (or ``model``) and plugins."""
        check_invariants(model or self.model, recipe, prompts, pm=self.plugin_manager(), **kwargs)

    def check_parity(self, recipe: Recipe | str | Path | dict, reference_fn: ReferenceFn,
                     prompts: Sequence[Sequence[int]] | None = None, model: Any = None,
                     **kwargs: Any) -> GenerationResult:
        """:func:`check_parity` on this kit's model (or ``model``) and plugins."""
        return check_parity(model or self.model, recipe, reference_fn, prompts, pm=self.plugin_manager(), **kwargs)
