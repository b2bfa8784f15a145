"""What a request gets back: its answer cut from the generated tokens, and the OpenAI bodies
(a whole response, or the chunks of a stream) that carry it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from dllm_decode.engine import Decoder
from dllm_decode.eos import first_stop
from dllm_decode.serve.stream import RowUpdate


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: list[int]             # the answer's tokens: up to a stop, at most max_tokens
    finish_reason: str            # "stop": a stop id or string ended it; "length": the canvas or max_tokens did


def answer_of(tokens: list[int], decoder: Decoder, cut: int | None, stops: Sequence[str] = ()) -> Answer:
    """The answer in a request's generated tokens: up to the first stop id, no longer than ``cut``
    (max_tokens), and its text up to the first of the ``stops`` strings (left out, as OpenAI
    does), counting the tokens written until that string was complete. Its text is
    ``Decoder.generate``'s for the same tokens."""
    stop = first_stop(tokens, decoder.eos_ids)
    end = len(tokens) if cut is None else min(cut, len(tokens))
    n = min(stop, end)
    text = decoder.tokenizer.decode(tokens[:n], skip_special_tokens=True)
    at = stop_at(text, stops)
    if at is None:
        return Answer(text, tokens[:n], "stop" if stop < end else "length")
    # the fewest tokens whose text holds a stop string (the shortest prefix that does: a bisection)
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if stop_at(decoder.tokenizer.decode(tokens[:mid], skip_special_tokens=True), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return Answer(text[:at], tokens[:lo], "stop")


def settled(update: RowUpdate, decoder: Decoder, cut: int | None, stops: Sequence[str]) -> bool:
    """Whether a step's committed prefix already decides the answer (under a policy that never
    takes committed tokens back): it holds ``cut`` tokens, or a stop string. The rest of the
    canvas cannot change it, so the request may leave."""
    if cut is not None and len(update.prefix) >= cut:
        return True
    return bool(stops) and stop_at(prefix_text(update, decoder, cut), stops) is not None


def stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text`` (None: nowhere)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def prefix_text(update: RowUpdate, decoder: Decoder, cut: int | None) -> str:
    """The text of a step's committed prefix (cut at ``cut``), less a trailing incomplete
    character: a byte-level tokenizer decodes half a UTF-8 sequence as U+FFFD, which the next
    token completes, so it is sent once whole."""
    prefix = update.prefix if cut is None else update.prefix[:cut]
    if update.text is not None and len(prefix) == len(update.prefix):
        text = update.text
    else:
        text = decoder.tokenizer.decode(prefix, skip_special_tokens=True)
    return text.rstrip("\ufffd")


class Shape:
    """The response bodies of one request, completions or chat, under one id and time."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):     # prompt_tokens: of every prompt
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, answers: Sequence[Answer]) -> dict[str, int]:
        n = sum(len(a.tokens) for a in answers)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def body(self, answers: Sequence[Answer]) -> dict[str, Any]:
        """The whole (non-streaming) response: one choice per prompt, in the prompts' order."""
        choices = []
        for i, answer in enumerate(answers):
            choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": answer.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": answer.text}
            else:
                choice["text"] = answer.text
            choices.append(choice)
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage(answers)}

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        """One stream chunk: a text delta, the first (chat: the role), or the last (``finish``)."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self, answer: Answer) -> dict[str, Any]:
        """The extra last chunk ``stream_options.include_usage`` asks for: no choices, the usage."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage([answer])}
