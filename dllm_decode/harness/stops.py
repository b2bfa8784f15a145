"""From a generated canvas to lm-eval's answer string: EOS, ``max_gen_toks`` and ``until``.

A diffusion model fills its whole canvas (the recipe's ``gen_length``) at once, so, as in
LLaDA's and Fast-dLLM's harness adapters, lm-eval's stop strings are applied after generation:
the text is cut at the first EOS id, then at ``max_gen_toks`` tokens, then before the first
occurrence of any ``until`` string.
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

from dllm_decode.eos import first_stop


def stop_strings(gen_kwargs: dict[str, Any]) -> list[str]:
    until = gen_kwargs.get("until")
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs until={until!r}: expected a string or a list of strings")
    return [s for s in until if s]


def answer_tokens(tokens: Sequence[int], eos_ids: Collection[int], max_gen_toks: int | None) -> list[int]:
    """The generated ids before the first EOS id, at most ``max_gen_toks`` of them."""
    kept = list(tokens[:first_stop(tokens, eos_ids)])
    return kept if max_gen_toks is None else kept[:max(0, int(max_gen_toks))]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]
