"""The diffusion-step loop.

``Decoder.generate`` splits prompts into batches; each batch is one request, decoded by
iterating ``Decoder.steps``. One step is seven named stages (resize only with a canvas rule)::

    propose     span = choose_span(state)   phase = decide_phase(state)   plan = cache_policy(state)
    forward     out = model.execute(canvas, plan)                   # logits (B, q, V), positions
    candidates  cand = spread(score(state, out))                    # (B, L), eligibility set
    select      sel = select_tokens(state, cand)
    commit      next canvas and violation flags, a pure function    (commit.py, one host sync)
    resize      rows grown by the optional canvas rule              (canvas.py), or by the next
                block of a block-causal model                        (block_mode.py)
    observe     after_step(state)

The engine owns every write to the state and checks each plugin's output, raising an error that
names the plugin, the hook and the step (contracts.py). It knows no plugin by name.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

import torch

from dllm_decode import block_mode, contracts
from dllm_decode.canvas import apply_resize
from dllm_decode.commit import Committed, commit, spread
from dllm_decode.config import Recipe, as_recipe, resolve_recipe
from dllm_decode.eos import stop_ids
from dllm_decode.errors import DllmDecodeError, InputError, PluginError
from dllm_decode.guidance import live_rows, run_model
from dllm_decode.models.output import ForwardOutput
from dllm_decode.models.store import CacheStore
from dllm_decode.models.plan import ComputePlan
from dllm_decode.plugins import PluginManager, get_plugin_manager
from dllm_decode.policy import BoundPolicy, load_auxiliary
from dllm_decode.request import GenerationResult, RowResult, check_prompts, new_state, progress_bar, row_seeds, rows_of
from dllm_decode.state import Candidates, DecodeState, Phase, Selection, StepRecord

NEG_INF = float("-inf")

__all__ = ["Decoder", "GenerationResult", "RowResult"]


class Decoder:
    """Decodes prompts with ``model`` under the policy a recipe composes.

    :param model: a denoiser: ``model.execute(input_ids, attention_mask=..., plan=..., store=...)``
        returns a :class:`dllm_decode.models.ForwardOutput` (a plain ``model(input_ids,
        attention_mask=...)`` returning (B, L, V) logits also works, without compute plans);
        ``model.spec`` carries mask/EOS ids and the maximum length.
    :param recipe: a :class:`Recipe` (:func:`dllm_decode.config.load_recipe`), a recipe name or file, or a dict.
    :param pm: plugin manager; a fresh one (entry points + env blocking) when omitted.
    :param tokenizer: optional, to fill ``RowResult.text``.
    :param load_aux: loads the plugins' auxiliary models (see :func:`dllm_decode.policy.load_auxiliary`).
    """

    def __init__(self, model: Any, recipe: Recipe | str | dict, pm: PluginManager | None = None,
                 tokenizer: Any = None, policy: BoundPolicy | None = None, load_aux: Any = None):
        self.model, self.recipe, self.tokenizer = model, as_recipe(recipe), tokenizer
        self.gen = self.recipe.generation
        self.spec = getattr(model, "spec", None)
        if self.spec is None:
            raise InputError(f"model {type(model).__name__} has no `spec` (mask/EOS ids, max length)")
        self.pm = pm if pm is not None else get_plugin_manager()
        self.policy = policy if policy is not None else resolve_recipe(self.recipe, self.pm)   # errors name a --set
        self.eos_ids = stop_ids(self.spec, self.gen.eos.ids)
        self.mask_id = int(self.spec.mask_token_id)
        pad = getattr(self.spec, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None and pad != self.mask_id else (self.eos_ids or [0])[0])
        self.runs_plans = callable(getattr(model, "execute", None))
        contracts.check_model(self.recipe, self.policy, self.spec, self.eos_ids, self.runs_plans,
                              type(model).__name__)
        # a block-causal model's request grows one block at a time (block_mode.py)
        self.block_size = getattr(self.spec, "block_size", None) if self.runs_plans else None
        self.aux = load_auxiliary(self.policy, self._device(), self.gen.dtype, load_aux)

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: Sequence[Sequence[int]], progress: bool | Callable[[int], Any] = False,
                 keep_states: bool = False, seeds: Sequence[int] | None = None) -> GenerationResult:
        """Decode every prompt (lists of token ids) in batches of ``generation.batch_size``.
        ``seeds``: one per prompt (default: the recipe's seed for all); a row's output depends
        only on its prompt and seed, never on the batch it lands in."""
        prompts = check_prompts(prompts, self.spec, self.gen.gen_length, self.mask_id)  # names the caller's index
        seeds = row_seeds(seeds, len(prompts), self.gen.seed)
        bar = progress_bar(progress, total=len(prompts) * self.gen.gen_length)
        rows, states = [], []       # a RowResult per prompt, a DecodeState per batch (keep_states)
        try:
            for start in range(0, len(prompts), self.gen.batch_size):
                batch = prompts[start:start + self.gen.batch_size]
                state = self.decode(batch, on_commit=bar.update if bar else None,
                                    seeds=seeds[start:start + self.gen.batch_size])
                rows.extend(rows_of(state, batch, self.tokenizer, self.eos_ids))
                if keep_states:
                    states.append(state)
        finally:
            if bar is not None:
                bar.close()
        return GenerationResult(rows=rows, states=states)

    def start(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None = None) -> DecodeState:
        """The state of one request: left-padded canvas, masks, per-row noise, cache store."""
        prompts = check_prompts(prompts, self.spec, self.gen.gen_length, self.mask_id, where="Decoder.start",
                                empty_ok=True)      # an unconditional row: the request API decodes one
        # every request gets a store, so a plan-executing model's FLOPs are counted; empty unless a plan writes
        factory = getattr(self.model, "new_store", None)
        store = factory() if callable(factory) else CacheStore()
        return new_state(prompts, self.gen, mask_id=self.mask_id, pad_id=self.pad_id, eos_ids=self.eos_ids,
                         device=self._device(), store=store, plugins=self.policy.plugin_names, seeds=seeds,
                         max_length=getattr(self.spec, "max_length", None), block_size=self.block_size)

    @torch.inference_mode()
    def steps(self, prompts: Sequence[Sequence[int]] | DecodeState,
              seeds: Sequence[int] | None = None) -> Iterator[DecodeState]:
        """Decode one batch, yielding its state after every step (``state.last`` records what the
        step did: span, phase, commits, re-masks, confidences). The request's observers run at
        its start and after its last step; exhausting the iterator finishes the request."""
        state = prompts if isinstance(prompts, DecodeState) else self.start(prompts, seeds)
        self.open(state)
        finished = False
        while not finished:
            self.check_budget(state)
            finished = self.step(state)
            yield state
        self.close(state)

    def open(self, state: DecodeState) -> None:
        """Start the request's clock and run its ``on_request_start`` observers."""
        state.timings["start"] = time.perf_counter()
        self._observe("on_request_start", state)

    def check_budget(self, state: DecodeState) -> None:
        """Refuse another step past ``generation.max_steps``, naming the likely cause."""
        max_steps = self.gen.max_steps or 4 * state.gen_length            # the canvas as it is now
        if state.step >= max_steps:
            why = (f"; select_tokens plugin {self.policy.plugin_for('select_tokens')!r} keeps re-masking?"
                   if self.policy.revocable else "; raise generation.max_steps")
            raise PluginError(f"request not finished after {state.step} steps (generation.max_steps "
                              f"{max_steps}){why}", plugin=self.policy.plugin_for("select_tokens"),
                              hook="select_tokens", step=state.step)

    def close(self, state: DecodeState) -> None:
        """Finish the request: its wall time, ``on_request_end`` observers, cache store freed."""
        state.timings["seconds"] = time.perf_counter() - state.timings.pop("start")
        self._observe("on_request_end", state)
        state.close()

    def decode(self, prompts: Sequence[Sequence[int]], on_commit: Callable[[int], Any] | None = None,
               seeds: Sequence[int] | None = None) -> DecodeState:
        """Decode one batch to completion and return its final state."""
        state = None
        for state in self.steps(prompts, seeds):
            if on_commit is not None:
                on_commit(int(state.last.committed.sum()))
        return state

    # ------------------------------------------------------------------ one step

    def step(self, state: DecodeState) -> bool:
        """Advance ``state`` by one step; True when every row is finished."""
        return self.end_step(state, self.forward(state, self.begin_step(state)))

    def begin_step(self, state: DecodeState) -> Any:
        """The first half of a step: span, phase and the plan of its forward (None: a plain
        forward of the whole canvas). A scheduler that batches several requests' forwards calls
        this, runs the forwards, and hands each request its output with :meth:`end_step`."""
        return self._propose(state)

    def forward(self, state: DecodeState, plan: Any) -> ForwardOutput:
        """The step's model call under ``plan`` (with the guided pair under guidance)."""
        return run_model(self.model, state, plan, self.gen.cfg_scale, self._blamer("cache_policy", state),
                         drop_rows=self.policy.drops_rows)

    def end_step(self, state: DecodeState, out: ForwardOutput) -> bool:
        """The rest of a step, from the forward's output: score, select, commit, record."""
        active = ~state.done                                                 # (B,)
        self._account(state, out, active)
        cand, checks = self._candidates(state, out, active)
        sel = self._select(state, cand)
        done = commit(state.x, state.masked, state.commit_step, state.prompt_mask, sel, cand, step=state.step,
                      active=active, mask_id=self.mask_id, vocab_size=out.logits.shape[-1], gen_start=state.gen_start,
                      stop_ids=state.eos_ids if self.gen.eos.stop and self.eos_ids else None, checks=checks)
        contracts.raise_violations(done, state, sel, cand, plugin_for=self.policy.plugin_for,
                                   revocable=self.policy.revocable, idle_steps=self.policy.idle_steps,
                                   vocab_size=out.logits.shape[-1])
        self._write(state, done, sel, cand, active)
        grown = self._resize(state, cand, active, out.logits.shape[-1]) if self.policy.resizes else \
            self._next_blocks(state, active) if state.blocks is not None and done.completed else None
        state.live_rows = live_rows(state, done.completed or grown is not None, done.flags["remask"])
        state.step += 1
        self._observe("after_step", state)
        return done.finished if grown is None else grown

    def _propose(self, state: DecodeState) -> Any:
        """The step's span, phase and compute plan."""
        B = state.batch_size
        span = self._call("choose_span", state)
        span = state.gen_span() if span is None else span
        contracts.check_tensor(self._blamer("choose_span", state), span, (B, 2), contracts.LONG)
        state.span = span if span.dtype == torch.long else span.to(torch.long)
        phase = self._call("decide_phase", state) if "decide_phase" in self.policy.slots else None
        if isinstance(phase, Phase):
            contracts.check_tensor(self._blamer("decide_phase", state), phase.rows, (B,), (torch.long,),
                                   what="per-row phases")
            state.phase, state.phase_rows = phase.label, phase
        else:
            state.phase, state.phase_rows = phase, None
        if "cache_policy" not in self.policy.slots:
            return None
        plan = self._call("cache_policy", state)
        contracts.check_plan(self._blamer("cache_policy", state), plan, ComputePlan, self.runs_plans)
        return plan

    def _account(self, state: DecodeState, out: ForwardOutput, active: torch.Tensor) -> None:
        state.nfe += 1
        state.row_nfe += active
        # The mask token is never a candidate (committing it would leave the position masked),
        # nor, with eos.ban, an EOS id.
        banned = state.constant("banned", lambda: torch.tensor(
            [self.mask_id] + (self.eos_ids if self.gen.eos.ban else []), device=state.device))
        for logits in (out.logits, out.shadow_logits):
            if logits is not None:
                logits[..., banned] = NEG_INF

    def _candidates(self, state: DecodeState, out: ForwardOutput,
                    active: torch.Tensor) -> tuple[Candidates, dict[str, torch.Tensor]]:
        """``score``'s candidates spread onto the canvas, and the per-row checks of the span,
        the logits and the confidence, read with the commit's flags."""
        logits = out.logits
        B, q = logits.shape[:2]
        cand = self._call("score", state, logits=logits, positions=out.positions, shadow_logits=out.shadow_logits)
        contracts.check_candidates(self._blamer("score", state), cand, B, q)
        masked_in_span = state.masked & state.in_span()                    # (B, L)
        full = spread(state.x, cand, out.positions, masked_in_span & active[:, None])
        if self.gen.eos.deprioritize and self.eos_ids:
            conf = full.confidence
            lowest = torch.finfo(conf.dtype).min if conf.is_floating_point() else -(2 ** 62)
            full.confidence = torch.where(full.eligible & torch.isin(full.tokens, state.eos_ids), lowest, conf)
        span, L = state.span, state.length
        # gen_start <= start <= end <= L, as one difference check over [gen_start, start, end, L]
        ends = state.constant("span_bounds", lambda: (torch.full((B, 1), state.gen_start, device=span.device),
                                                      torch.full((B, 1), L, device=span.device)))
        no_rows = torch.zeros_like(active)
        # amax propagates NaN, so one pass over the logits finds any
        return full, {"bad_span": (torch.cat([ends[0], span, ends[1]], dim=1).diff(dim=1) < 0).any(dim=1),
                      "empty_span": active > masked_in_span.any(dim=1),     # bools: a > b is a & ~b
                      "nan_logits": torch.isnan(logits.amax(dim=(1, 2))) if q else no_rows,
                      "nan_conf": torch.isnan(full.confidence).any(dim=1)}  # -inf wherever not eligible

    def _select(self, state: DecodeState, cand: Candidates) -> Selection:
        chosen = self._call("select_tokens", state, candidates=cand)
        return contracts.as_selection(self._blamer("select_tokens", state), chosen, *state.x.shape)

    def _write(self, state: DecodeState, done: Committed, sel: Selection, cand: Candidates,
               active: torch.Tensor) -> None:
        """The engine's only write of a step: the new canvas and its record."""
        if sel.finish is not None:
            # finished rows (Selection.finish) took every mask: their span is the whole generation
            state.span = torch.where((sel.finish & active)[:, None], state.gen_span(), state.span)
        remasked = sel.remask if done.flags["remask"] else None
        if remasked is not None:
            state.remask_log.append((state.step, torch.nonzero(remasked)))
        state.set_canvas(done.x, done.commit_step, done.masked)
        state.done = ~done.left
        state.history.append(StepRecord(step=state.step, span=state.span, phase=state.phase,
                                        committed=done.written, remasked=remasked,
                                        confidence=cand.confidence.to(torch.float32), active=active))

    def _resize(self, state: DecodeState, cand: Candidates, active: torch.Tensor, vocab_size: int) -> bool | None:
        """The optional canvas rule, after the commit: rows grown, the state moved to the new
        columns (canvas.py). None when nothing grew, else whether every row is done."""
        r = self._call("resize_canvas", state, candidates=cand)
        return None if r is None else apply_resize(state, r, active, blame=self._blamer("resize_canvas", state),
                                                    pad_id=self.pad_id, vocab_size=vocab_size)

    def _next_blocks(self, state: DecodeState, active: torch.Tensor) -> bool | None:
        """Rows that finished their block grow by the next one (block_mode.py), as _resize."""
        return apply_resize(state, block_mode.growth(state, active), active, keep_stores=True, pad_id=self.pad_id,
                            blame=lambda msg: InputError(f"block-causal request at step {state.step}: {msg}"),
                            vocab_size=int(self.spec.vocab_size))

    # ------------------------------------------------------------------ plugin calls

    def _call(self, slot: str, state: DecodeState, **kwargs: Any) -> Any:
        bound = self.policy.slots[slot]
        return self._guarded(bound.plugin_name, slot, state, bound.caller, kwargs)

    def _observe(self, hook: str, state: DecodeState) -> None:
        for name, caller in self.policy.observers.get(hook, ()):
            self._guarded(name, hook, state, caller, {})

    def _guarded(self, name: str, hook: str, state: DecodeState, caller: Any, kwargs: dict) -> Any:
        try:
            return caller(state=state, options=self.policy.options[name], scratch=state.scratch.setdefault(name, {}),
                          aux=self.aux.get(name, {}), **kwargs)
        except DllmDecodeError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {name!r} raised in {hook} at step {state.step}: "
                              f"{type(exc).__name__}: {exc}", plugin=name, hook=hook, step=state.step) from exc

    def _blamer(self, slot: str, state: DecodeState) -> Callable[[str], PluginError]:
        return lambda message: contracts.slot_error(self.policy.plugin_for(slot), slot, state.step, message)

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            return torch.device(getattr(self.model, "device", "cpu"))
