"""A request: the prompts of one batch checked and laid out on a canvas, and what decoding them
returns (one :class:`RowResult` per prompt)."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dllm_decode import block_mode
from dllm_decode.eos import first_stop
from dllm_decode.errors import InputError
from dllm_decode.noise import RowNoise
from dllm_decode.state import DecodeState


@dataclass
class RowResult:
    """One decoded prompt."""

    prompt: list[int]
    tokens: list[int]             # the whole generated region (gen_length ids, or the row's own
                                  # length when a canvas rule grew it)
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


def rows_of(state: DecodeState, prompts: Sequence[Sequence[int]], tokenizer: Any,
            eos_ids: Sequence[int]) -> list[RowResult]:
    """One :class:`RowResult` per row of a decoded batch (``text`` when there is a tokenizer)."""
    gen = state.generated_rows()
    steps = state.generated_rows(state.commit_step)
    texts = decode_text(tokenizer, gen, eos_ids) if tokenizer is not None else [None] * len(gen)
    flops = state.counters.get("flops", 0.0) / state.batch_size
    return [RowResult(prompt=list(p), tokens=g, nfe=n, steps=state.step,
                      seconds=state.timings.get("seconds", 0.0), commit_step=c, text=t, flops=flops)
            for p, g, n, c, t in zip(prompts, gen, state.row_nfe.tolist(), steps, texts)]


def decode_text(tokenizer: Any, token_rows: list[list[int]], eos_ids: Sequence[int]) -> list[str]:
    """Text of each row up to its first EOS id (special tokens skipped)."""
    return [tokenizer.decode(row[:first_stop(row, eos_ids)], skip_special_tokens=True) for row in token_rows]


def as_prompts(prompts: Any, where: str = "Decoder.generate", empty_ok: bool = False) -> list[list[int]]:
    """``prompts`` as lists of int token ids, or an InputError saying what was expected: the two
    usual slips (text where ids belong, one prompt's ids without the outer list) would otherwise
    surface as a bare ``int()`` error. An empty prompt is refused as the CLI refuses one (most
    likely an empty text encoded) unless ``empty_ok``: the request API (``Decoder.start``) takes
    it as an unconditional row. ``where``: the call named in the error."""
    encode = "encode text with the tokenizer first: tokenizer(text, add_special_tokens=False)['input_ids']"
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise InputError(f"{where}: prompts is a {type(prompts).__name__}; expected a list of prompts, "
                         f"each a list of token ids ({encode})")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise InputError(f"{where}: prompts[{i}] is text ({p[:40]!r}); prompts are lists of token "
                             f"ids: {encode}")
        if hasattr(p, "tolist"):                # a tensor or array row: one conversion, not one per id
            p = p.tolist()
        if not isinstance(p, Iterable):
            raise InputError(f"{where}: prompts[{i}] is {p!r}, not a list of token ids; for one prompt "
                             "pass [ids], a list holding its list of ids")
        try:
            row = [operator.index(t) for t in p]     # ints only: int() would truncate 5.7 or parse "5"
        except TypeError:
            bad = next(t for t in p if not _is_index(t))
            raise InputError(f"{where}: prompts[{i}] holds {bad!r} ({type(bad).__name__}); token ids "
                             "are integers") from None
        if not row and not empty_ok:
            raise InputError(f"{where}: prompts[{i}] is empty; give at least one token id")
        out.append(row)
    return out


def _is_index(t: Any) -> bool:
    try:
        operator.index(t)
        return True
    except TypeError:
        return False


def check_prompts(prompts: Any, spec: Any, gen_length: int, mask_id: int, names: Sequence[str] | None = None,
                  where: str = "Decoder.generate", empty_ok: bool = False) -> list[list[int]]:
    """The prompts as lists of token ids (:func:`as_prompts`), or an InputError refusing one the
    model cannot decode, named ``names[i]`` (default ``prompt i``, the caller's 0-based index: a
    CLI passes the numbering its user typed)."""
    prompts = as_prompts(prompts, where, empty_ok)
    if not prompts:
        raise InputError("no prompts to decode")
    limit, vocab = getattr(spec, "max_length", None), getattr(spec, "vocab_size", None)
    for i, p in enumerate(prompts):
        name = names[i] if names is not None else f"prompt {i}"
        if limit is not None and len(p) + gen_length > limit:
            raise InputError(f"{name} has {len(p)} tokens; with gen_length {gen_length} the canvas needs "
                             f"{len(p) + gen_length} positions but the model allows {limit}")
        if mask_id in p:
            raise InputError(f"{name} contains the mask token id {mask_id}")
        if vocab is not None and any(t < 0 or t >= vocab for t in p):
            raise InputError(f"{name} has token ids outside the vocabulary [0, {vocab})")
    return prompts


def row_seeds(seeds: Sequence[int] | None, n: int, default: int) -> list[int]:
    """Each row's seed: ``seeds`` when given (one per prompt), else the recipe's ``seed``."""
    if seeds is None:
        return [default] * n
    seeds = list(seeds)
    if len(seeds) != n:
        raise InputError(f"seeds has {len(seeds)} entries for {n} prompts; give one per prompt")
    bad = [i for i, s in enumerate(seeds) if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise InputError(f"seeds[{bad[0]}] is {seeds[bad[0]]!r}; seeds are integers >= 0")
    return seeds


def new_state(prompts: Sequence[Sequence[int]], gen: Any, *, mask_id: int, pad_id: int, eos_ids: list[int],
              device: torch.device, store: Any, plugins: Sequence[str],
              seeds: Sequence[int] | None = None, max_length: int | None = None,
              block_size: int | None = None) -> DecodeState:
    """The state of one request: canvas ``[pad * k | prompt | MASK * gen_length]`` per row; each
    row's random draws are keyed by its seed and prompt (``seeds``, default the recipe's). With
    ``block_size`` (a block-causal model) a row holds only the masks of its first block and the
    columns past its end are padding (:mod:`dllm_decode.block_mode`)."""
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    blocks, ends = None, [P + gen.gen_length] * len(prompts)
    if block_size:
        blocks, ends = block_mode.layout(lengths, P, gen.gen_length, block_size, max_length, device)
    W = max(ends)
    x = torch.full((len(prompts), W), mask_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), W), dtype=torch.bool)
    prompt_mask = torch.zeros_like(attn)
    prompt_mask[:, :P] = True
    for i, p in enumerate(prompts):        # building the request, not the hot loop
        x[i, :P - len(p)] = pad_id
        x[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):ends[i]] = True
        x[i, ends[i]:] = pad_id             # past a row's end: padding, never written
        prompt_mask[i, ends[i]:] = True
    generator = torch.Generator(device=device).manual_seed(gen.seed)
    return DecodeState(x=x.to(device), attention_mask=attn.to(device), prompt_mask=prompt_mask.to(device),
                       gen_start=P, gen_length=W - P, mask_id=mask_id,
                       eos_ids=torch.tensor(eos_ids, dtype=torch.long, device=device),
                       config=gen, generator=generator, store=store,
                       noise=RowNoise.for_rows(prompts, row_seeds(seeds, len(prompts), gen.seed), device),
                       prompt_lengths=torch.tensor(lengths, dtype=torch.long, device=device), max_length=max_length,
                       ends=torch.tensor(ends, dtype=torch.long, device=device), blocks=blocks,
                       scratch={name: {} for name in plugins})


def progress_bar(progress: bool | Callable[[int], Any], total: int) -> Any:
    """None, a callback wrapper, or a tqdm bar on stderr counting committed tokens."""
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
