"""Adaptive Parallel Decoding (arXiv 2506.00413; danielmisrael/apd ``dream/generation_utils.py
apd_sample``) as span / cache / score / selection plugins.

Left to right from each row's first mask ``t``: the dLLM drafts every position of the window
``[t, t + max_lookahead)`` from its marginals in one forward (the rest of the canvas hidden from
it, as the reference cuts its input there); a small autoregressive verifier scores the draft in
one causal forward; the longest prefix of the draft that agrees with
``argmax(R * dLLM logits + (1 - R) * verifier logits)`` is committed, always at least its first
token. The verifier keeps a KV cache of the committed prefix (cropped after every step to what
all rows have committed).

``variant: code`` (default) follows the released code, ``variant: paper`` the paper's
Algorithm 1; they differ only at T > 0:
  - the code draws the draft as ``argmax(l/T + T*g)``, i.e. at temperature T**2; the paper at T;
  - the code takes the target as the plain argmax of the mixture; the paper perturbs it with
    the same Gumbel noise as the draft.

``kv_window`` (W) is the reference's dLLM-side KV cache: each forward recomputes only the
window from ``t - W - n + 1`` (n: tokens accepted by the previous step) to the lookahead end and
attends to the K/V the earlier forwards left for the positions before it (approximate: those
were computed before later tokens were committed). ``None`` recomputes the whole visible canvas.
The verifier is any ``AutoModelForCausalLM`` directory whose tokenizer agrees with the model's
(checked when the recipe names ``model.path``), declared in ``dllm_meta.auxiliary`` and loaded once
per decoder by the engine. APD is sequential by design: each step reads a few integers (window bounds, the verifier cache length)
to the host to slice the verifier's input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from dllm_decode import Candidates, ComputePlan, PluginMeta, PluginOptions, hookimpl
from dllm_decode.blocks import first_masked
from dllm_decode.noise import gumbel_draws
from dllm_decode.sampling import top_k_filter, top_p_filter


class Options(PluginOptions):
    verifier: str = Field(..., description="Directory of the autoregressive verifier "
                          "(AutoModelForCausalLM, same tokenizer as the model).")
    mixture_weight: float = Field(0.7, ge=0.0, le=1.0, description="R: weight of the dLLM in the "
                                  "mixture R*dLLM + (1-R)*AR (higher: longer accepted prefixes).")
    max_lookahead: int | None = Field(None, ge=1, description="M: draft window after the first "
                                      "mask; the dLLM sees nothing beyond it. None: the whole canvas.")
    kv_window: int | None = Field(None, ge=0, description="W: committed positions before the "
                                  "first mask whose K/V are recomputed each forward (older ones come "
                                  "from the previous forwards); None: no dLLM KV cache.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus filter of the draft.")
    top_k: int | None = Field(None, ge=1, description="Top-k filter of the draft.")
    variant: Literal["code", "paper"] = Field("code", description="Sampling details at T > 0 (see "
                                              "the module doc); identical at T = 0.")


dllm_meta = PluginMeta(summary="APD: left-to-right drafts accepted against a dLLM x AR mixture "
                       "(auxiliary verifier model)", options=Options,
                       pairs=(("select_tokens", "score"),), auxiliary=("verifier",), drops_rows=True)


def _vocab(path: Path) -> dict[str, int] | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    model = json.loads(file.read_text()).get("model", {})
    vocab = model.get("vocab")
    return vocab if isinstance(vocab, dict) else None


@hookimpl
def check_recipe(recipe, options, slots):
    problems = []
    vpath = Path(options.verifier)
    if not (vpath / "config.json").is_file():
        problems.append(f"verifier: {options.verifier!r} is not a model directory (no config.json)")
    elif recipe.model.path:
        ours, theirs = _vocab(Path(recipe.model.path)), _vocab(vpath)
        if ours is not None and theirs is not None:
            diff = [t for t, i in theirs.items() if ours.get(t) != i]
            if diff:
                t = diff[0]
                problems.append(f"verifier: the tokenizer of {options.verifier!r} differs from the model's "
                                f"({len(diff)} tokens, e.g. {t!r} is id {theirs[t]} there and "
                                f"{ours.get(t)} in {recipe.model.path!r}); APD needs one vocabulary")
    for key in ("max_lookahead", "kv_window"):
        if getattr(options, key) is not None and "cache_policy" not in slots:
            problems.append(f"{key} needs `cache_policy: apd` (the plan that feeds the model APD's window)")
    return problems


@hookimpl
def choose_span(state, options):
    t = first_masked(state)                                                 # (B,)
    end = state.length if options.max_lookahead is None else (t + options.max_lookahead).clamp(max=state.length)
    end = torch.as_tensor(end, device=t.device).expand_as(t)
    return torch.stack([t, end], dim=1)


@hookimpl
def cache_policy(state, options, scratch):
    if options.max_lookahead is None and options.kv_window is None:
        return None
    right = state.span[:, 1]                                                # (B,) lookahead end
    if options.kv_window is None:
        return ComputePlan.lookahead(right)
    t = state.span[:, 0]
    active = ~state.done
    b = int(torch.where(active, right, 0).max())
    if not scratch["primed"]:
        # the first forward fills the store; columns past a row's own end hold K/V it cannot see
        # yet, and every later forward rewrites them before its window reaches them
        scratch.update(primed=True, fed_start=0)
        return ComputePlan.refresh(end=b, key_limit=right, name="apd-prefill")
    left = (t - options.kv_window - scratch["accepted"] + 1).clamp(min=0)
    a = int(torch.where(active, left, state.length).min())
    scratch["fed_start"] = a
    return ComputePlan.cached_window(a, b, write_window=torch.stack([left, right], 1), key_limit=right,
                                     name="apd-window")


@hookimpl
def on_request_start(state, scratch):
    scratch.update(cache=None, verifier_forwards=0, primed=False, fed_start=0,
                   accepted=torch.zeros(state.batch_size, dtype=torch.long, device=state.device))


@hookimpl
def score(state, logits, positions, options, scratch):
    active = ~state.done
    starts = torch.where(active, first_masked(state, state.in_span()), state.length)
    ends = torch.where(active, state.span[:, 1], 0)
    a, b = torch.stack([starts.min(), ends.max()]).tolist()                # the batch's draft window
    T = state.config.temperature
    off = 0 if positions is None else scratch["fed_start"]                  # logits column 0 = canvas column off
    window = logits[:, a - off:b - off].to(torch.float64)                   # (B, w, V)
    tokens = logits.argmax(-1)                                              # (B, q); only [a, b) is used
    noise = None
    if T > 0:
        scaled = window / T
        if options.top_p is not None and options.top_p < 1:
            scaled = top_p_filter(scaled, options.top_p)
        if options.top_k is not None:
            scaled = top_k_filter(scaled, options.top_k)
        cols = torch.arange(a, b, device=scaled.device).expand(scaled.shape[0], -1)   # (B, w)
        noise = gumbel_draws(state, cols, "apd.sample", scaled.shape[-1])    # (B, w, V)
        tokens[:, a - off:b - off] = (scaled + (T * noise if options.variant == "code" else noise)).argmax(-1)
    else:
        tokens[:, a - off:b - off] = window.argmax(-1)
    # a confidence for plugins that might replace select_tokens: the draft's probability in the
    # window, 0 elsewhere (computed on the window only: the canvas x vocabulary can be large)
    conf = torch.zeros(tokens.shape, dtype=torch.float64, device=tokens.device)
    draft = tokens[:, a - off:b - off]
    conf[:, a - off:b - off] = torch.softmax(window, -1).gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    return Candidates(tokens=tokens, confidence=conf, info={"window": (a, b), "logits": window, "noise": noise})


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: ``cache`` since transformers 5.25, where the older
    ``past_key_values`` (the name up to 5.24) still works but warns, and goes away in 5.40."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def verifier_logits(verifier, scratch: dict, x: torch.Tensor, attn: torch.Tensor, end: int) -> tuple[torch.Tensor, int]:
    """Causal logits for canvas columns [c, end) -> ((B, end - c, V), c), feeding only what the
    cached prefix [0, c) does not hold."""
    from transformers import DynamicCache

    cache = scratch["cache"]
    c = 0 if cache is None else cache.get_seq_length()
    if cache is None:                   # a request's first verifier forward: read the signature once
        cache = DynamicCache()
        scratch["cache_keyword"] = cache_keyword(verifier)
    pos = (attn.long().cumsum(1) - 1).clamp(min=0)                          # (B, L) padding-aware
    kw = scratch["cache_keyword"]
    out = verifier(input_ids=x[:, c:end], attention_mask=attn[:, :end].long(), position_ids=pos[:, c:end],
                   use_cache=True, **{kw: cache})
    scratch["cache"] = getattr(out, kw)
    scratch["verifier_forwards"] += 1
    return out.logits, c


@hookimpl
def select_tokens(state, candidates, options, scratch, aux):
    a, b = candidates.info["window"]
    dl = candidates.info["logits"]                                         # (B, b - a, V) float64
    eligible = candidates.eligible                                          # (B, L): the drafts
    draft = torch.where(eligible, candidates.tokens, state.x)              # (B, L)
    ar, c = verifier_logits(aux["verifier"], scratch, draft, state.attention_mask, b)
    if c > a - 1:
        raise RuntimeError(f"verifier cache holds {c} columns, more than the committed prefix {a}")
    ar = ar[:, a - 1 - c: b - 1 - c].to(torch.float64)                      # (B, b - a, V): predicts [a, b)
    V = min(dl.shape[-1], ar.shape[-1])                                     # the shared vocabulary
    mix = options.mixture_weight * dl[..., :V] + (1 - options.mixture_weight) * ar[..., :V]
    noise = candidates.info["noise"]
    if options.variant == "paper" and noise is not None:
        mix = mix / state.config.temperature + noise[..., :V]
    target = mix.argmax(-1)                                                 # (B, b - a)
    cols = state.columns[None, :]                                           # (1, L)
    first = first_masked(state, eligible)[:, None]                          # (B, 1): its draft always stays
    agree = torch.ones_like(eligible)
    agree[:, a:b] = draft[:, a:b] == target
    reject = eligible & ~agree & (cols > first)
    stop = torch.where(reject.any(1), torch.where(reject, cols, state.length).amin(1), state.length)
    commit = eligible & (cols < stop[:, None])
    # the verifier's cache may keep only columns that every unfinished row has committed
    left = state.masked & ~commit
    frontier = torch.where(~state.done & left.any(1), left.long().argmax(1), state.length)   # (B,)
    keep = frontier.min() - 1
    keep_prefix(scratch["cache"], int(keep))
    scratch["accepted"] = commit.sum(1)
    return commit


def keep_prefix(cache, keep: int) -> None:
    """Drop every cached position from ``keep`` on (transformers' crop takes a negative count)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


@hookimpl
def on_request_end(state, scratch):
    state.counters["verifier_forwards"] = scratch.get("verifier_forwards", 0)
