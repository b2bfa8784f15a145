"""The forward stage: one model call for the step's plan, or a classifier-free guided pair.

Unsupervised classifier-free guidance (LLaDA): the unconditional canvas is the same canvas with
every real prompt token masked, and the logits are ``u + (w + 1)(c - u)``. A plain plan runs on
both halves stacked as one batch; a :class:`Guided` plan (dLLM-Cache's cached
guidance residual) runs them apart, the unconditional one against its own store, or reuses the
kept residual ``c - u`` instead of running it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from dllm_decode.models.output import ForwardOutput
from dllm_decode.state import DecodeState


@dataclass(frozen=True)
class Guided:
    """What ``cache_policy`` may return under classifier-free guidance (``cfg_scale > 0``)
    instead of one plan for both halves of the guided batch.

    ``cond`` is the plan of the conditional forward (``None``: a plain forward). With ``reuse``
    the unconditional forward is skipped and the engine reuses the guidance residual
    ``cond - uncond`` of the last step that ran it (dLLM-Cache's cached CFG residual); otherwise
    the unconditional canvas runs on its own with ``uncond`` against a store of its own
    (``state.guide_store``), so its cached features follow their own schedule. Both plans must
    query the same positions. Without guidance the engine runs ``cond`` alone.
    """

    cond: Any = None              # ComputePlan | None
    uncond: Any = None            # ComputePlan | None
    reuse: bool = False


def run_model(model: Any, state: DecodeState, plan: Any, scale: float,
              blame: Callable[[str], Exception], drop_rows: bool = False) -> ForwardOutput:
    """Logits of this step's queries under ``plan`` (a ComputePlan, a Guided pair or None).
    ``blame(message)`` builds the error naming the cache_policy plugin, for a Guided pair that
    cannot be honoured.

    Once some rows have finished, a forward runs only the rows still decoding
    (``state.live_rows``) where it can: always when it keeps nothing (no plan, or one with no
    store read or write), and against the store when ``drop_rows`` (the cache plugin reads the
    store's rows only through ``CacheStore.batch_rows``, no row can come back): the finished
    rows' part of the store is then dropped for good (``CacheStore.keep_rows``; under guidance
    the store's row B + r, r's unconditional half, with r). A finished row gets zero
    logits, which the engine never reads. Rows are independent: each gets the logits of a batch
    of the live rows, which differ from the whole batch's only in float rounding, as any two
    batches' do."""
    if isinstance(plan, Guided):
        if scale > 0:
            return _guided_apart(model, state, plan, scale, blame)
        plan = plan.cond
    elif scale > 0 and plan is not None and state.guide_store is not None:
        raise blame("returned a plain plan after a Guided pair under guidance (whose store holds the "
                    "conditional half alone); return one kind of plan for the whole request")
    rows = state.live_rows
    if rows is not None and plan is not None and not plan.keeps_nothing:
        keep = getattr(state.store, "keep_rows", None)
        if not drop_rows or keep is None:
            rows = None
        else:
            keep(rows if scale <= 0 else torch.cat([rows, rows + state.batch_size]))
    if rows is None:
        return _run(model, state.x, state.attention_mask, state, plan, scale)
    out = _run(model, state.x.index_select(0, rows), state.attention_mask.index_select(0, rows), state,
               None if plan is None else plan.take_rows(rows), scale, rows)
    return _to_batch(out, rows, state.batch_size)


def live_rows(state: DecodeState, changed: bool, remasked: bool) -> torch.Tensor | None:
    """The rows still decoding after a step, (b,) long, or None when every row is. Read from the
    host only when the set may have changed: a row finished or grew, or (some row being
    finished) a row was re-masked."""
    if not (changed or (remasked and state.live_rows is not None)):
        return state.live_rows
    rows = torch.nonzero(~state.done).flatten()
    return None if rows.numel() == state.batch_size else rows


def _run(model: Any, x: torch.Tensor, attn: torch.Tensor, state: DecodeState, plan: Any, scale: float,
         rows: torch.Tensor | None = None) -> ForwardOutput:
    """One forward of the rows ``rows`` of the canvas (None: all), given as ``x`` / ``attn``;
    under guidance with their unconditional canvases stacked as one batch, per-row plan
    tensors tiled for the stacked rows."""
    if scale <= 0:
        return execute(model, x, attn, plan, state.store)
    uncond = unconditional_canvas(state)
    out = execute(model, torch.cat([x, uncond if rows is None else uncond.index_select(0, rows)]),
                  torch.cat([attn, attn]), None if plan is None else plan.repeat_rows(2), state.store)
    cond, uncond = out.logits.chunk(2, dim=0)
    half = x.shape[0]
    return ForwardOutput(uncond + (scale + 1) * (cond - uncond),
                         None if out.positions is None else out.positions[:half],
                         None if out.shadow_logits is None else _combine(out.shadow_logits, scale))


def _to_batch(out: ForwardOutput, rows: torch.Tensor, B: int) -> ForwardOutput:
    """A forward of rows ``rows`` (b,) spread back to the batch of B: the other rows get zero
    logits at the first live row's positions (canvas positions of this plan's queries, so a hook
    indexing by them stays in range; a finished row has no eligible candidate)."""
    def spread_rows(t: torch.Tensor | None, fill: torch.Tensor | None = None) -> torch.Tensor | None:
        if t is None:
            return None
        fill = t.new_zeros(B, *t.shape[1:]) if fill is None else fill
        return fill.index_copy(0, rows, t)
    positions = None if out.positions is None else spread_rows(out.positions, out.positions[:1].expand(B, -1))
    return ForwardOutput(spread_rows(out.logits), positions, spread_rows(out.shadow_logits))


def _combine(logits: torch.Tensor, scale: float) -> torch.Tensor:
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (scale + 1) * (cond - uncond)


def _guided_apart(model: Any, state: DecodeState, plan: Guided, scale: float,
                  blame: Callable[[str], Exception]) -> ForwardOutput:
    """The conditional forward always; the unconditional one only when the plan does not reuse
    the kept residual (then against the request's guidance store)."""
    attn = state.attention_mask
    held = getattr(state.store, "shape", None)
    if getattr(state.store, "rows", None) is not None or (held is not None and held[0] != state.batch_size):
        raise blame("returned a Guided pair after a plain plan under guidance (whose store holds both "
                    "halves of the guided batch); return one kind of plan for the whole request")
    cond = execute(model, state.x, attn, plan.cond, state.store)
    if plan.reuse:
        residual = state.guide_residual
        if residual is None or residual.shape != cond.logits.shape:
            got = "none was kept yet" if residual is None else f"the kept one has shape {tuple(residual.shape)}"
            raise blame(f"asked to reuse the guidance residual for logits of shape "
                              f"{tuple(cond.logits.shape)}, but {got}")
    else:
        if state.guide_store is None:
            state.guide_store = model.new_store()
        uncond = execute(model, unconditional_canvas(state), attn, plan.uncond, state.guide_store)
        if uncond.logits.shape != cond.logits.shape:
            raise blame(f"the unconditional plan returned logits of shape "
                              f"{tuple(uncond.logits.shape)}, the conditional one {tuple(cond.logits.shape)}")
        state.guide_nfe += 1
        residual = state.guide_residual = cond.logits - uncond.logits
    # c + w (c - u): LLaDA's u + (w + 1)(c - u), rearranged so the residual alone can be kept
    return ForwardOutput(cond.logits + scale * residual, cond.positions, cond.shadow_logits)


def execute(model: Any, x: torch.Tensor, attention_mask: torch.Tensor, plan: Any, store: Any) -> ForwardOutput:
    """One call of ``model``: a dllm_decode model executes the plan and returns its
    :class:`ForwardOutput`; any other model runs a plain forward returning (B, L, V) logits."""
    run = getattr(model, "execute", None)
    if callable(run):
        return run(x, attention_mask=attention_mask, plan=plan, store=store)
    return ForwardOutput(model(x, attention_mask=attention_mask))


def unconditional_canvas(state: DecodeState) -> torch.Tensor:
    return torch.where(state.prompt_mask & state.attention_mask, state.mask_id, state.x)

