"""The diffusion-step loop.

``Decoder.generate`` splits prompts into batches; each batch is one request whose state is
advanced by :func:`Decoder.step` until every row is finished. One step::

    span   = choose_span(state)        phase = decide_phase(state)
    plan   = cache_policy(state)       logits = model(canvas, plan)      # (B, q, V)
    cand   = score(state, logits)      commit = select_tokens(state, cand)
    state  <- commit (engine-checked)  after_step(state)

The engine owns every write to the canvas and checks each plugin's output against the
contracts in DESIGN.md §3, raising an error that names the plugin, the hook and the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dllm_decode.config import Recipe
from dllm_decode.errors import DllmDecodeError, InputError, ModelOutputError, PluginError
from dllm_decode.plugins import PluginManager, get_plugin_manager
from dllm_decode.policy import BoundPolicy, resolve
from dllm_decode.state import UNCOMMITTED, Candidates, DecodeState, Guided, Phase, Selection, StepRecord

NEG_INF = float("-inf")


@dataclass
class RowResult:
    """One decoded prompt."""

    prompt: list[int]
    tokens: list[int]             # the whole generated region (gen_length ids)
    nfe: int                      # forwards while this row was unfinished
    steps: int                    # steps of the request it was decoded in
    seconds: float                # wall time of that request
    commit_step: list[int]        # step at which each generated position was written
    text: str | None = None
    flops: float = 0.0            # the request's computed matmul FLOPs / its rows (0: not counted)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt, "token_ids": self.tokens, "text": self.text,
                "nfe": self.nfe, "steps": self.steps, "seconds": round(self.seconds, 6)}


@dataclass
class GenerationResult:
    rows: list[RowResult]
    states: list[DecodeState] = field(default_factory=list)  # one per batch, kept for traces

    @property
    def tokens(self) -> list[list[int]]:
        return [r.tokens for r in self.rows]


def _model_spec(model: Any) -> Any:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise InputError(f"model {type(model).__name__} has no `spec` (mask/EOS ids, max length)")
    return spec


class Decoder:
    """Decodes prompts with ``model`` under the policy a recipe composes.

    :param model: a denoiser: ``model(input_ids, attention_mask=..., plan=..., store=...)``
        returns aligned logits; ``model.spec`` carries mask/EOS ids and the maximum length.
    :param recipe: a validated :class:`Recipe` (see :func:`dllm_decode.config.load_recipe`).
    :param pm: plugin manager; a fresh one (entry points + env blocking) when omitted.
    :param tokenizer: optional, to fill ``RowResult.text``.
    """

    def __init__(self, model: Any, recipe: Recipe, pm: PluginManager | None = None,
                 tokenizer: Any = None, policy: BoundPolicy | None = None):
        self.model = model
        self.spec = _model_spec(model)
        self.recipe = recipe
        self.pm = pm if pm is not None else get_plugin_manager()
        self.policy = policy if policy is not None else resolve(recipe, self.pm)
        self.tokenizer = tokenizer
        self.gen = recipe.generation
        eos = self.gen.eos.ids
        if eos is None:
            eos = [i for i in (getattr(self.spec, "eos_token_id", None),
                               getattr(self.spec, "eot_token_id", None)) if i is not None]
        self.eos_ids = list(dict.fromkeys(int(i) for i in eos))
        if (self.gen.eos.ban or self.gen.eos.stop or self.gen.eos.deprioritize) and not self.eos_ids:
            raise InputError(f"{recipe.source or '<recipe>'}: generation.eos is enabled but the model "
                             "declares no EOS id; set generation.eos.ids")
        for name in self.policy.plugin_names:
            if "compute_plans" in self.policy.metas[name].requires and not callable(getattr(model, "new_store", None)):
                raise InputError(f"{recipe.source or '<recipe>'}: plugin {name!r} builds compute plans, but "
                                 f"{type(model).__name__} runs only plain forwards; use a dllm_decode "
                                 "model (LLaDA or Dream family)")
        self.mask_id = int(self.spec.mask_token_id)
        pad = getattr(self.spec, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None and pad != self.mask_id else (self.eos_ids or [0])[0])

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: Sequence[Sequence[int]], progress: bool | Callable[[int], Any] = False,
                 keep_states: bool = False) -> GenerationResult:
        """Decode every prompt (lists of token ids) in batches of ``generation.batch_size``."""
        prompts = [list(map(int, p)) for p in prompts]
        self._validate(prompts)                 # up front, so errors name the caller's prompt index
        bar = _progress(progress, total=len(prompts) * self.gen.gen_length)
        rows: list[RowResult] = []
        states: list[DecodeState] = []
        try:
            for start in range(0, len(prompts), self.gen.batch_size):
                batch = prompts[start:start + self.gen.batch_size]
                state = self.decode(batch, on_commit=bar.update if bar else None)
                rows.extend(self.rows_of(state, batch))
                if keep_states:
                    states.append(state)
        finally:
            if bar is not None:
                bar.close()
        return GenerationResult(rows=rows, states=states)

    def start(self, prompts: Sequence[Sequence[int]]) -> DecodeState:
        """Build the state of one request: left-padded canvas, masks, generator, cache store."""
        G = self.gen.gen_length
        self._validate(prompts)
        lengths = [len(p) for p in prompts]
        P = max(lengths)
        device = self._device()
        x = torch.full((len(prompts), P + G), self.mask_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), P + G), dtype=torch.bool)
        for i, p in enumerate(prompts):        # building the request, not the hot loop
            x[i, :P - len(p)] = self.pad_id
            x[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p):] = True
        prompt_mask = torch.zeros_like(attn)
        prompt_mask[:, :P] = True
        generator = torch.Generator(device=device).manual_seed(self.gen.seed)
        store = self._new_store()
        return DecodeState(x=x.to(device), attention_mask=attn.to(device), prompt_mask=prompt_mask.to(device),
                           gen_start=P, gen_length=G, mask_id=self.mask_id,
                           eos_ids=torch.tensor(self.eos_ids, dtype=torch.long, device=device),
                           config=self.gen, generator=generator, store=store,
                           prompt_lengths=torch.tensor(lengths, dtype=torch.long, device=device),
                           scratch={name: {} for name in self.policy.plugin_names})

    @torch.inference_mode()
    def decode(self, prompts: Sequence[Sequence[int]],
               on_commit: Callable[[int], Any] | None = None) -> DecodeState:
        """Decode one batch to completion and return its final state."""
        state = self.start(prompts)
        t0 = time.perf_counter()
        self._observe("on_request_start", state)
        max_steps = self.gen.max_steps or 4 * self.gen.gen_length
        while True:
            finished, n_committed = self.step(state)
            if on_commit is not None:
                on_commit(int(n_committed))
            if finished:
                break
            if state.step >= max_steps:
                raise PluginError(f"request not finished after {state.step} steps (generation.max_steps "
                                  f"{max_steps}); select_tokens plugin {self.policy.plugin_for('select_tokens')!r} "
                                  "keeps re-masking?", plugin=self.policy.plugin_for("select_tokens"),
                                  hook="select_tokens", step=state.step)
        state.timings["seconds"] = time.perf_counter() - t0
        self._observe("on_request_end", state)
        state.scratch.clear()
        stores = [s for s in (state.store, state.guide_store) if s is not None and hasattr(s, "clear")]
        if stores:
            state.counters["flops"] = sum(getattr(s, "flops", 0.0) for s in stores)
            state.counters["store_bytes"] = sum(s.nbytes() if hasattr(s, "nbytes") else 0 for s in stores)
            for s in stores:
                s.clear()
        if state.guide_nfe:
            state.counters["guide_forwards"] = state.guide_nfe
        state.guide_residual = None
        return state

    def _validate(self, prompts: Sequence[Sequence[int]]) -> None:
        if not prompts:
            raise InputError("no prompts to decode")
        G, limit = self.gen.gen_length, getattr(self.spec, "max_length", None)
        vocab = getattr(self.spec, "vocab_size", None)
        for i, p in enumerate(prompts):
            if limit is not None and len(p) + G > limit:
                raise InputError(f"prompt {i} has {len(p)} tokens; with gen_length {G} the canvas needs "
                                 f"{len(p) + G} positions but the model allows {limit}")
            if self.mask_id in p:
                raise InputError(f"prompt {i} contains the mask token id {self.mask_id}")
            if vocab is not None and any(t < 0 or t >= vocab for t in p):
                raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")

    def rows_of(self, state: DecodeState, prompts: Sequence[Sequence[int]]) -> list[RowResult]:
        gen = state.generated().tolist()
        steps = state.commit_step[:, state.gen_start:].tolist()
        nfe = state.row_nfe.tolist()
        texts = self.decode_text(gen) if self.tokenizer is not None else [None] * len(gen)
        flops = state.counters.get("flops", 0.0) / state.batch_size
        return [RowResult(prompt=list(p), tokens=g, nfe=n, steps=state.step,
                          seconds=state.timings.get("seconds", 0.0), commit_step=c, text=t, flops=flops)
                for p, g, n, c, t in zip(prompts, gen, nfe, steps, texts)]

    def decode_text(self, token_rows: list[list[int]]) -> list[str]:
        """Text of each row up to its first EOS id (special tokens skipped)."""
        out = []
        for row in token_rows:
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            out.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return out

    # ------------------------------------------------------------------ one step

    def step(self, state: DecodeState) -> tuple[bool, torch.Tensor]:
        """Advance ``state`` by one step. Returns (every row finished, tokens committed as a
        0-d tensor: reading it is a host sync, left to callers that want it)."""
        B, L = state.x.shape
        active = ~state.done                                             # (B,)
        span = self._call("choose_span", state)
        if span is None:
            span = state.gen_span()
        self._check_tensor("choose_span", state, span, (B, 2), (torch.long, torch.int32, torch.int64))
        state.span = span if span.dtype == torch.long else span.to(torch.long)
        phase = self._call("decide_phase", state) if "decide_phase" in self.policy.slots else None
        if isinstance(phase, Phase):
            self._check_tensor("decide_phase", state, phase.rows, (B,), (torch.long,), what="per-row phases")
            state.phase, state.phase_rows = phase.label, phase
        else:
            state.phase, state.phase_rows = phase, None
        plan = self._call("cache_policy", state) if "cache_policy" in self.policy.slots else None

        logits, positions = self._forward(state, plan)                  # (B, q, V), (B, q) | None
        state.nfe += 1
        state.row_nfe += active
        # The mask token is never a candidate: committing it would leave the position masked.
        logits[..., self.mask_id] = NEG_INF
        if self.gen.eos.ban and self.eos_ids:
            logits[..., state.eos_ids] = NEG_INF

        # Shadow queries (ComputePlan.shadow, WINO's verification block) come back as extra
        # columns after the planned ones; score gets them apart (a Guided plan: its cond's)
        shadow = getattr(getattr(plan, "cond", plan), "shadow", None)
        shadow_logits = None
        if shadow is not None:
            logits, shadow_logits = logits[:, :-shadow.shape[1]], logits[:, -shadow.shape[1]:]
        cand = self._call("score", state, logits=logits, positions=positions, shadow_logits=shadow_logits)
        if not isinstance(cand, Candidates):
            raise self._error("score", state, f"returned {type(cand).__name__}, expected Candidates")
        q = logits.shape[1]
        self._check_tensor("score", state, cand.tokens, (B, q), (torch.long,), what="tokens")
        self._check_tensor("score", state, cand.confidence, (B, q), None, what="confidence")
        tokens, conf = cand.tokens, cand.confidence
        if positions is not None:                                        # scatter onto the canvas
            tokens = state.x.clone().scatter_(1, positions, tokens)
            conf = torch.full((B, L), NEG_INF, dtype=conf.dtype, device=conf.device).scatter_(1, positions, conf)
        masked = state.masked                                            # (B, L)
        masked_in_span = masked & state.in_span()
        eligible = masked_in_span & active[:, None]                      # (B, L)
        if positions is not None:
            queried = torch.zeros_like(eligible).scatter_(1, positions, True)
            eligible &= queried
        conf = torch.where(eligible, conf, NEG_INF)
        if self.gen.eos.deprioritize and self.eos_ids:
            lowest = torch.finfo(conf.dtype).min if conf.is_floating_point() else -(2 ** 62)
            conf = torch.where(eligible & torch.isin(tokens, state.eos_ids), lowest, conf)
        full = Candidates(tokens=tokens, confidence=conf, eligible=eligible, extra=cand.extra)

        chosen = self._call("select_tokens", state, candidates=full)
        commit, remask = (chosen.commit, chosen.remask) if isinstance(chosen, Selection) else (chosen, None)
        finish = chosen.finish if isinstance(chosen, Selection) else None
        self._check_tensor("select_tokens", state, commit, (B, L), (torch.bool,), what="commit mask")
        if remask is not None:
            self._check_tensor("select_tokens", state, remask, (B, L), (torch.bool,), what="remask mask")
        fill = None
        if finish is not None:
            # Early commit-all (Prophet): every mask left in a finished row takes this step's
            # candidate, whatever the span; the row's recorded span widens to the whole generation
            self._check_tensor("select_tokens", state, finish, (B,), (torch.bool,), what="finish rows")
            fill = (finish & active)[:, None] & masked                      # (B, L)

        # One host sync per step: every contract and the loop condition in one transfer.
        written = commit if fill is None else commit | fill
        n_commit = written.sum(dim=1)                                    # (B,)
        # gen_start <= start <= end <= L, as one difference check over [gen_start, start, end, L]
        ends = state.constant("span_bounds", lambda: (torch.full((B, 1), state.gen_start, device=span.device),
                                                      torch.full((B, 1), L, device=span.device)))
        bad_span = (torch.cat([ends[0], span, ends[1]], dim=1).diff(dim=1) < 0).any(dim=1)
        empty_span = active > masked_in_span.any(dim=1)                  # bools: a > b is a & ~b
        # the canvas after this step's writes, and the rows with a mask left on it (final
        # unless re-masks or eos.stop change the canvas further, see below)
        x = torch.where(written, tokens, state.x)                        # (B, L)
        masked_after = x == state.mask_id
        left = masked_after.any(dim=1)                                   # (B,)
        no_rows = state.constant("no_rows", lambda: torch.zeros(B, dtype=torch.bool, device=commit.device))
        # every check reduced per row, then all at once; amax propagates NaN, so one pass over
        # the logits finds any
        flags = torch.stack([
            bad_span, empty_span, (commit > eligible).any(dim=1), active & (n_commit == 0),
            torch.isnan(logits.amax(dim=(1, 2))) if logits.shape[1] else no_rows,
            torch.isnan(conf).any(dim=1),           # conf is -inf wherever not eligible
            no_rows if remask is None else remask.any(dim=1),
            # a fill needs a candidate at every mask: unqueried columns still hold the mask id
            no_rows if fill is None else (fill & (tokens == state.mask_id)).any(dim=1),
            left,
        ]).any(dim=1).tolist()
        (f_bad_span, f_empty_span, f_outside, f_stall, f_nan_logits, f_nan_conf, f_remask, f_bad_fill,
         f_left) = flags
        if f_bad_span:
            raise self._error("choose_span", state, f"returned spans outside [gen_start={state.gen_start}, "
                              f"length={L}]: {span[bad_span].tolist()}")
        if f_empty_span:
            rows = torch.nonzero(empty_span).flatten().tolist()
            raise self._error("choose_span", state, f"chose a span with no masked position for unfinished "
                              f"row(s) {rows}: {span[empty_span].tolist()}")
        if f_nan_logits:
            raise ModelOutputError(f"step {state.step}: the model returned NaN logits (plan from "
                                   f"{self.policy.plugin_for('cache_policy') or 'full forward'!r})")
        if f_nan_conf:
            raise self._error("score", state, "returned NaN confidence for committable positions")
        if f_outside:
            where = torch.nonzero(commit & ~eligible)[:5].tolist()
            raise self._error("select_tokens", state, "committed positions that are not masked, outside "
                              f"the span, or in a finished row (row, column): {where}")
        if f_stall and not self.policy.idle_steps:
            rows = torch.nonzero(active & (n_commit == 0)).flatten().tolist()
            raise self._error("select_tokens", state, f"committed nothing in unfinished row(s) {rows}")
        if f_bad_fill:
            where = torch.nonzero(fill & (tokens == state.mask_id))[:5].tolist()
            raise self._error("select_tokens", state, "finished rows whose masks have no candidate this step "
                              f"(the plan did not query them) at (row, column): {where}")
        if fill is not None:
            commit = written
            state.span = torch.where((finish & active)[:, None], state.gen_span(), state.span)

        commit_step = torch.where(commit, state.step, state.commit_step)
        remasked = None
        if f_remask:
            if not self.policy.revocable:
                raise self._error("select_tokens", state, "returned a re-mask but the plugin does not "
                                  "declare itself revocable (dllm_meta.revocable)")
            bad = remask & ((state.commit_step == UNCOMMITTED) | commit | state.prompt_mask)
            if bool(bad.any()):
                raise self._error("select_tokens", state, "re-masked positions that were not committed "
                                  f"by decoding or are committed this step: {torch.nonzero(bad)[:5].tolist()}")
            x = torch.where(remask, state.mask_id, x)
            commit_step = torch.where(remask, UNCOMMITTED, commit_step)
            state.remask_log.append((state.step, torch.nonzero(remask)))
            remasked = remask
        state.x, state.commit_step = x, commit_step
        if not f_remask:    # the new canvas's mask is computed already: hand it to state.masked
            state._memo["x"], state._memo["masked"] = x, masked_after
        eos_stop = bool(self.gen.eos.stop and self.eos_ids)
        if eos_stop:
            self._stop_at_eos(state)
        exact = f_remask or eos_stop
        state.done = ~state.masked.any(dim=1) if exact else ~left
        state.history.append(StepRecord(step=state.step, span=state.span, phase=state.phase,
                                        committed=commit, remasked=remasked,
                                        confidence=conf.to(torch.float32), active=active))
        state.step += 1
        self._observe("after_step", state)
        finished = bool(state.done.all()) if exact else not f_left
        return finished, n_commit.sum()

    # ------------------------------------------------------------------ helpers

    def _forward(self, state: DecodeState, plan: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, attn = state.x, state.attention_mask
        cfg = self.gen.cfg_scale
        if isinstance(plan, Guided):
            if cfg > 0:
                return self._guided_forward(state, plan, cfg)
            plan = plan.cond
        if cfg > 0:
            # Unconditional rows: the same canvas with every real prompt token masked (LLaDA).
            x = torch.cat([x, self._uncond_canvas(state)])
            attn = torch.cat([attn, attn])
        run = plan if plan is None or cfg <= 0 else plan.repeat_rows(2)
        logits = self.model(x, attention_mask=attn, plan=run, store=state.store)
        if cfg > 0:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + (cfg + 1) * (cond - uncond)
        return logits, self._positions(state, plan)

    def _guided_forward(self, state: DecodeState, plan: Guided, cfg: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Guidance with separate forwards: the conditional one always, the unconditional one
        only when the plan does not reuse the kept residual (then against its own store)."""
        attn = state.attention_mask
        cond = self.model(state.x, attention_mask=attn, plan=plan.cond, store=state.store)
        if plan.reuse:
            residual = state.guide_residual
            if residual is None or residual.shape != cond.shape:
                got = "none was kept yet" if residual is None else f"the kept one has shape {tuple(residual.shape)}"
                raise self._error("cache_policy", state, f"asked to reuse the guidance residual for logits of "
                                  f"shape {tuple(cond.shape)}, but {got}")
        else:
            if state.guide_store is None:
                state.guide_store = self._new_store()
            uncond = self.model(self._uncond_canvas(state), attention_mask=attn, plan=plan.uncond,
                                store=state.guide_store)
            if uncond.shape != cond.shape:
                raise self._error("cache_policy", state, f"the unconditional plan returned logits of shape "
                                  f"{tuple(uncond.shape)}, the conditional one {tuple(cond.shape)}")
            state.guide_nfe += 1
            residual = state.guide_residual = cond - uncond
        # cond + w (cond - uncond): LLaDA's uncond + (w + 1)(cond - uncond), rearranged so the
        # residual alone can be kept
        return cond + cfg * residual, self._positions(state, plan.cond)

    @staticmethod
    def _uncond_canvas(state: DecodeState) -> torch.Tensor:
        return torch.where(state.prompt_mask & state.attention_mask, state.mask_id, state.x)

    @staticmethod
    def _positions(state: DecodeState, plan: Any) -> torch.Tensor | None:
        if plan is None:
            return None
        # Always scattered, even when a plan covers every column: checking for that would cost
        # a host sync per step, the scatter does not.
        return plan.query_positions(state.length, state.batch_size, device=state.device)

    def _new_store(self) -> Any:
        # every request of a plan-executing model gets a store, so its FLOPs are counted too;
        # nothing is allocated in it unless a plan writes
        factory = getattr(self.model, "new_store", None)
        if callable(factory):
            return factory()
        from dllm_decode.models import CacheStore   # one fresh store per request
        return CacheStore()

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            return torch.device(getattr(self.model, "device", "cpu"))

    def _call(self, slot: str, state: DecodeState, **kwargs: Any) -> Any:
        bound = self.policy.slots[slot]
        name = bound.plugin_name
        try:
            return bound.caller(state=state, options=self.policy.options[name], scratch=state.scratch[name],
                                **kwargs)
        except DllmDecodeError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {name!r} raised in {slot} at step {state.step}: "
                              f"{type(exc).__name__}: {exc}", plugin=name, hook=slot, step=state.step) from exc

    def _observe(self, hook: str, state: DecodeState) -> None:
        for name, caller in self.policy.observers.get(hook, ()):
            try:
                caller(state=state, options=self.policy.options[name], scratch=state.scratch.setdefault(name, {}))
            except DllmDecodeError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {name!r} raised in {hook} at step {state.step}: "
                                  f"{type(exc).__name__}: {exc}", plugin=name, hook=hook, step=state.step) from exc

    def _error(self, slot: str, state: DecodeState, message: str) -> PluginError:
        name = self.policy.plugin_for(slot)
        return PluginError(f"{slot} plugin {name!r} at step {state.step}: {message}",
                           plugin=name, hook=slot, step=state.step)

    def _check_tensor(self, slot: str, state: DecodeState, value: Any, shape: tuple[int, ...],
                      dtypes: tuple[torch.dtype, ...] | None, what: str = "result") -> None:
        if not isinstance(value, torch.Tensor):
            raise self._error(slot, state, f"{what} is {type(value).__name__}, expected a tensor of shape {shape}")
        if tuple(value.shape) != shape:
            raise self._error(slot, state, f"{what} has shape {tuple(value.shape)}, expected {shape}")
        if dtypes is not None and value.dtype not in dtypes:
            raise self._error(slot, state, f"{what} has dtype {value.dtype}, expected {dtypes[0]}")

    def _stop_at_eos(self, state: DecodeState) -> None:
        """Finish rows whose committed text ends in EOS: fill their remaining masks with it."""
        gen = state.columns >= state.gen_start                           # (L,)
        is_eos = torch.isin(state.x, state.eos_ids) & gen                # (B, L)
        masked = state.masked
        L = state.length
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), L)   # (B,)
        first_mask = torch.where(masked.any(1), masked.long().argmax(1), L)  # (B,)
        stop = first_eos < first_mask
        fill = masked & stop[:, None]
        eos_tok = state.x.gather(1, first_eos.clamp(max=L - 1)[:, None])     # (B, 1) the EOS that ended it
        state.x = torch.where(fill, eos_tok, state.x)
        state.commit_step = torch.where(fill, state.step, state.commit_step)


def _progress(progress: bool | Callable[[int], Any], total: int) -> Any:
    if callable(progress) and not isinstance(progress, bool):
        return _CallbackBar(progress)
    if not progress:
        return None
    from tqdm.auto import tqdm
    # delay: short decodes print nothing; long ones get a bar on stderr.
    return tqdm(total=total, unit="tok", desc="decoding", delay=1.0, leave=False)


class _CallbackBar:
    def __init__(self, fn: Callable[[int], Any]):
        self.fn = fn

    def update(self, n: int) -> None:
        self.fn(n)

    def close(self) -> None:
        pass
