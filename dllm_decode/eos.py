"""Stop ids: the token ids that end an answer, and where a row's answer ends.

One place decides both, so that the engine's EOS switches, the decoded text, the token counts of
bench and the lm-eval request logs agree."""

from __future__ import annotations

from typing import Any, Collection, Sequence


def stop_ids(spec: Any, configured: Sequence[int] | None = None) -> list[int]:
    """``configured`` (the recipe's ``generation.eos.ids``) or the model's EOS and end-of-turn
    ids, without duplicates, in that order."""
    if configured is None:
        configured = [i for i in (getattr(spec, "eos_token_id", None), getattr(spec, "eot_token_id", None))
                      if i is not None]
    return list(dict.fromkeys(int(i) for i in configured))


def first_stop(ids: Sequence[int], stops: Collection[int]) -> int:
    """Index of the first stop id in ``ids`` (``len(ids)`` when there is none)."""
    return next((i for i, t in enumerate(ids) if t in stops), len(ids))
