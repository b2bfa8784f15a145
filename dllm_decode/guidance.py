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
              blame: Callable[[str], Exception]) -> ForwardOutput:
    """Logits of this step's queries under ``plan`` (a ComputePlan, a Guided pair or None).
    ``blame(message)`` builds the error naming the cache_policy plugin, for a Guided pair that
    cannot be honoured."""
    if isinstance(plan, Guided):
        if scale > 0:
            return _guided_apart(model, state, plan, scale, blame)
        plan = plan.cond
    if scale <= 0:
        return execute(model, state.x, state.attention_mask, plan, state.store)
    # both halves as one batch: per-row plan tensors are tiled for the stacked rows
    out = execute(model, torch.cat([state.x, unconditional_canvas(state)]),
                  torch.cat([state.attention_mask, state.attention_mask]),
                  None if plan is None else plan.repeat_rows(2), state.store)
    cond, uncond = out.logits.chunk(2, dim=0)
    half = state.batch_size
    return ForwardOutput(uncond + (scale + 1) * (cond - uncond),
                         None if out.positions is None else out.positions[:half],
                         None if out.shadow_logits is None else _combine(out.shadow_logits, scale))


def _combine(logits: torch.Tensor, scale: float) -> torch.Tensor:
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (scale + 1) * (cond - uncond)


def _guided_apart(model: Any, state: DecodeState, plan: Guided, scale: float,
                  blame: Callable[[str], Exception]) -> ForwardOutput:
    """The conditional forward always; the unconditional one only when the plan does not reuse
    the kept residual (then against the request's guidance store)."""
    attn = state.attention_mask
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

