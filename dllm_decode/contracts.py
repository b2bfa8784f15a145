"""What the engine checks of every plugin's output, and the errors it raises, each naming the
plugin, the hook and the step. The checks themselves are cheap tensor reductions (commit.py);
this module only runs when one fails, or checks shapes and types, which costs no host sync."""

from __future__ import annotations

from typing import Any

import torch

from dllm_decode import block_mode
from dllm_decode.commit import Committed
from dllm_decode.errors import InputError, ModelOutputError, PluginError, RecipeError
from dllm_decode.guidance import Guided
from dllm_decode.plugins import PluginOptions
from dllm_decode.state import UNCOMMITTED, Candidates, DecodeState, Selection

LONG = (torch.long, torch.int32, torch.int64)


def slot_error(plugin: str | None, slot: str, step: int, message: str) -> PluginError:
    return PluginError(f"{slot} plugin {plugin!r} at step {step}: {message}", plugin=plugin, hook=slot, step=step)


def check_tensor(blame: Any, value: Any, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] | None,
                 what: str = "result") -> None:
    """``blame(message)`` builds the error naming the plugin, hook and step."""
    if not isinstance(value, torch.Tensor):
        raise blame(f"{what} is {type(value).__name__}, expected a tensor of shape {shape}")
    if tuple(value.shape) != shape:
        raise blame(f"{what} has shape {tuple(value.shape)}, expected {shape}")
    if dtypes is not None and value.dtype not in dtypes:
        raise blame(f"{what} has dtype {value.dtype}, expected {dtypes[0]}")


def check_model(recipe: Any, policy: Any, spec: Any, eos_ids: list[int], runs_plans: bool, model_name: str) -> None:
    """Refuse, before decoding, what the recipe asks and the model cannot give."""
    where = recipe.source or "<recipe>"
    eos = recipe.generation.eos
    if (eos.ban or eos.stop or eos.deprioritize) and not eos_ids:
        raise InputError(f"{where}: generation.eos is enabled but the model declares no EOS id; "
                         "set generation.eos.ids")
    vocab = getattr(spec, "vocab_size", None)
    bad = [i for i in eos_ids if vocab is not None and not 0 <= i < vocab]
    if bad:
        raise InputError(f"{where}: generation.eos.ids {bad} lie outside the model's vocabulary [0, {vocab})")
    family = getattr(spec, "family", None)
    block = getattr(spec, "block_size", None)
    for name in policy.plugin_names:
        meta = policy.metas[name]
        options = policy.options.get(name)
        needs = meta.requires + (options.requires() if isinstance(options, PluginOptions) else ())
        if "compute_plans" in needs and not runs_plans:
            raise InputError(f"{where}: plugin {name!r} builds compute plans, but {model_name} runs only "
                             "plain forwards; use a model loaded by dllm_decode.models.load_model")
        if "block_causal" in needs and not block:
            what = "caches the blocks of" if "block_causal" in meta.requires else \
                f"with options {options.model_dump(exclude_defaults=True)} needs"
            raise RecipeError(f"{where}: plugin {name!r} {what} a block-causal model, but "
                              f"{model_name} is a {family} model that attends over the whole canvas")
        if "bidirectional" in needs and block:
            raise RecipeError(f"{where}: plugin {name!r} needs attention over the whole canvas, but "
                              f"{model_name} is a block-causal {family} model (blocks of {block})")
        if meta.families and family is not None and family not in meta.families:
            raise RecipeError(f"{where}: plugin {name!r} supports model families {list(meta.families)}, "
                              f"not this {family} model ({model_name})")
    found = block_mode.problems(recipe, policy, block) if block and runs_plans else []
    if found:
        raise RecipeError("\n".join(found))


def check_plan(blame: Any, plan: Any, plan_type: type, runs_plans: bool) -> None:
    """``cache_policy`` returns None, a compute plan, or a Guided pair of them."""
    parts = (plan.cond, plan.uncond) if isinstance(plan, Guided) else (plan,)
    for part in parts:
        if part is not None and not isinstance(part, plan_type):
            raise blame(f"returned {type(part).__name__}, expected a ComputePlan, a Guided pair or None")
    if any(p is not None for p in parts) and not runs_plans:
        raise blame("returned a compute plan, but the model runs only plain forwards")


def check_candidates(blame: Any, cand: Any, B: int, q: int) -> None:
    if not isinstance(cand, Candidates):
        raise blame(f"returned {type(cand).__name__}, expected Candidates")
    check_tensor(blame, cand.tokens, (B, q), (torch.long,), what="tokens")
    check_tensor(blame, cand.confidence, (B, q), None, what="confidence")
    for key, value in cand.extra.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != (B, q):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise blame(f"extra[{key!r}] is {got}; extra holds per-position tensors (B, q, ...) = "
                        f"({B}, {q}, ...), anything else goes in Candidates.info")


def as_selection(blame: Any, chosen: Any, B: int, L: int) -> Selection:
    sel = chosen if isinstance(chosen, Selection) else Selection(commit=chosen)
    check_tensor(blame, sel.commit, (B, L), (torch.bool,), what="commit mask")
    if sel.remask is not None:
        check_tensor(blame, sel.remask, (B, L), (torch.bool,), what="remask mask")
    if sel.finish is not None:
        check_tensor(blame, sel.finish, (B,), (torch.bool,), what="finish rows")
    return sel


def raise_violations(done: Committed, state: DecodeState, sel: Selection, cand: Candidates, *,
                     plugin_for: Any, revocable: bool, idle_steps: bool, vocab_size: int) -> None:
    """Raise the first contract this step broke (``done.flags``), naming whom it blames."""
    f, rows, step = done.flags, done.rows, state.step

    def blame(slot: str, message: str) -> PluginError:
        return slot_error(plugin_for(slot), slot, step, message)

    def where(mask: torch.Tensor) -> list:
        return torch.nonzero(mask)[:5].tolist()

    span = state.span
    if f["bad_span"]:
        raise blame("choose_span", f"returned spans outside [gen_start={state.gen_start}, "
                    f"length={state.length}]: {span[rows['bad_span']].tolist()}")
    if f["empty_span"]:
        raise blame("choose_span", f"chose a span with no masked position for unfinished row(s) "
                    f"{torch.nonzero(rows['empty_span']).flatten().tolist()}: {span[rows['empty_span']].tolist()}")
    if f["nan_logits"]:
        raise ModelOutputError(f"step {step}: the model returned NaN logits (plan from "
                               f"{plugin_for('cache_policy') or 'full forward'!r})")
    if f["nan_conf"]:
        raise blame("score", "returned NaN confidence for committable positions")
    if f["outside"]:
        raise blame("select_tokens", "committed positions that are not masked, outside the span, or in "
                    f"a finished row (row, column): {where(sel.commit & ~cand.eligible)}")
    if f["stall"] and not idle_steps:
        raise blame("select_tokens", f"committed nothing in unfinished row(s) "
                    f"{torch.nonzero(rows['stall']).flatten().tolist()}")
    if f["bad_fill"]:
        raise blame("select_tokens", "finished rows whose masks have no candidate this step (the plan "
                    f"did not query them) at (row, column): {where(done.fill & (cand.tokens == state.mask_id))}")
    if f["bad_token"]:
        bad = (cand.tokens < 0) | (cand.tokens >= vocab_size) | (cand.tokens == state.mask_id)
        raise blame("score", f"proposed token ids outside the vocabulary [0, {vocab_size}) or the mask id "
                    f"{state.mask_id}, and they were committed at (row, column): {where(sel.commit & bad)}")
    if f["remask"] and not revocable:
        raise blame("select_tokens", "returned a re-mask but the plugin does not declare itself "
                    "revocable (dllm_meta.revocable)")
    if f["bad_remask"]:
        bad = sel.remask & ((state.commit_step == UNCOMMITTED) | done.written | state.prompt_mask)
        raise blame("select_tokens", "re-masked positions that were not committed by decoding or are "
                    f"committed this step: {where(bad)}")
