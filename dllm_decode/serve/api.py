"""The OpenAI request bodies the server takes, checked field by field.

A body is parsed here, not by the web framework, so that every refusal is one OpenAI-style
error naming the field at fault: ``{"error": {"message", "type", "param", "code"}}``. Unknown
fields are refused (a typo must not be ignored silently); the sampling fields OpenAI clients may
send with their neutral value (``n: 1``, ``top_p: 1``, ...) are accepted with that value only,
since no recipe has a counterpart for the others. Numbers are strict, as OpenAI's are: ``"0.5"``
is not a temperature.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

#: 2**64: seeds wrap at 64 bits (dllm_decode.noise), so larger ones would alias smaller ones
SEED_LIMIT = 1 << 64
#: OpenAI's limit on stop sequences
MAX_STOPS = 4
#: a temperature below this decodes greedily, as vLLM's does: dividing logits by it overflows
GREEDY_BELOW = 1e-5


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Common(_Strict):
    """Fields both endpoints take. ``recipe`` is this server's extension: a shipped recipe name."""

    model: StrictStr
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=100.0)   # generation.temperature's range
    seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT)
    recipe: StrictStr | None = None
    user: StrictStr | None = None
    # accepted with their neutral value only (see NEUTRAL)
    n: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None     # checked by stop_strings
    top_p: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None


class CompletionRequest(_Common):
    prompt: Any = None                # strings or token ids; checked by prompts_of for a clear message
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)   # newer clients' name for max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


#: field -> the values it is accepted with (None: absent or null, always accepted)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "top_p": (1.0,), "frequency_penalty": (0.0,), "presence_penalty": (0.0,),
    "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},), "suffix": ("",),
}

WHY_NOT = {
    "n": "one choice per request; send the request again (with another seed) for more",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
}


def parse_body(raw: bytes, kind: type[_Common]) -> _Common:
    """The request of a raw JSON body, or an :class:`ApiError` naming the field at fault."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        req = kind.model_validate(data)
    except ValidationError as exc:
        raise _field_error(exc) from None
    if req.logit_bias and not any(req.logit_bias.values()):
        req.logit_bias = {}                 # biases of zero change nothing
    for name, allowed in NEUTRAL.items():
        value = getattr(req, name, None)
        if value is not None and value not in allowed:
            why = WHY_NOT.get(name, f"only {json.dumps(allowed[0])} (or leaving it out) is supported")
            raise ApiError(400, f"{name} {json.dumps(value)}: {why}", param=name)
    if req.temperature is not None and not math.isfinite(req.temperature):
        raise ApiError(400, f"temperature must be a finite number, got {req.temperature}", param="temperature")
    if req.temperature is not None and req.temperature < GREEDY_BELOW:
        req.temperature = 0.0
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    stop_strings(req)
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")
        req.max_tokens = req.max_completion_tokens
    return req


def _field_error(exc: ValidationError) -> ApiError:
    """The first validation error, as 400 naming its field (``messages.0.role``)."""
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p)) or None
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}", param=param)
    if err["type"] == "missing":
        return ApiError(400, f"{param} is required", param=param)
    return ApiError(400, f"{param}: {err['msg']} (got {err['input']!r})", param=param)


def _is_type_tag(part: Any) -> bool:
    """pydantic names the union member it tried in the location (``str``, ``list[...]``)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def stop_strings(req: _Common) -> tuple[str, ...]:
    """The request's stop sequences (``stop``: a string or up to four), each non-empty."""
    stop = req.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop holds {len(stops)} sequences; at most {MAX_STOPS}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    return stops


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request, as OpenAI takes them: a string, token ids, or a list of
    either (one choice each)."""
    p = req.prompt
    if p is None:
        raise ApiError(400, "prompt is required", param="prompt")
    many = isinstance(p, list) and bool(p) and all(isinstance(t, (str, list)) for t in p)
    prompts = p if many else [p]
    for i, one in enumerate(prompts):
        if isinstance(one, str) or (isinstance(one, list) and one and all(_is_int(t) for t in one)):
            continue
        where = f"prompt {i}" if many else "prompt"
        raise ApiError(400, f"{where} must be a string or a non-empty list of token ids, got "
                       f"{json.dumps(one)[:80]}", param="prompt")
    return prompts


def _is_int(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)
