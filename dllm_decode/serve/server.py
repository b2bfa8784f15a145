"""An OpenAI-compatible HTTP server over the continuous-batching scheduler.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (also streamed, as server-sent
events carrying the growth of the committed prefix), ``GET /v1/models`` and ``GET /health``.
One worker thread owns the scheduler (:mod:`dllm_decode.serve.worker`); the event loop only
parses requests, builds decoders (:mod:`dllm_decode.serve.decoders`) and forwards results.
Every request's answer is the one ``Decoder.generate`` gives its prompt and seed alone.

FastAPI and uvicorn are the ``serve`` extra: they are imported when an app is created, so the
rest of the package works without them.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (``Request``,
# imported inside _routes) at run time, and a string could not be resolved there
import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Sequence

from dllm_decode.engine import Decoder
from dllm_decode.errors import DllmDecodeError, InputError
from dllm_decode.serve.answer import Answer, Shape, answer_of, prefix_text, settled
from dllm_decode.serve.api import ApiError, ChatRequest, CompletionRequest, parse_body, prompts_of, stop_strings
from dllm_decode.serve.decoders import DecoderPool, FieldError
from dllm_decode.serve.scheduler import QueueFull
from dllm_decode.serve.stream import RowUpdate
from dllm_decode.serve.worker import Finished, Ticket, Worker

#: how often a request waiting for its next event checks that its client is still connected
POLL_S = 0.5


def require() -> None:
    """Refuse, saying how to install them, when FastAPI or uvicorn is missing."""
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DllmDecodeError(f"serving needs {' and '.join(missing)}: pip install 'dllm-decode[serve]' "
                              "(or pip install fastapi uvicorn)")


def create_app(model: Any, tokenizer: Any, *, recipe: str = "llada", overrides: Sequence[str] = (),
               model_name: str = "dllm-decode", max_batch: int = 8, max_waiting: int | None = 64,
               timeout_s: float = 600.0, pm: Any = None) -> Any:
    """A FastAPI app serving ``model`` under ``recipe`` (a file or shipped name, with ``overrides``
    as ``--set`` texts; a request may name another shipped recipe). Its worker starts and stops
    with the app's lifespan (as uvicorn runs it)."""
    require()
    if tokenizer is None:
        raise InputError("the server needs the model's tokenizer (its answers are text)")
    if timeout_s <= 0:
        raise InputError(f"timeout_s must be positive, got {timeout_s}")
    if max_waiting is not None and max_waiting < 1:
        # every request waits in the queue until the next step admits it, so 0 would refuse all
        raise InputError(f"max_waiting must be at least 1, got {max_waiting}")
    if pm is None:                          # one plugin manager for every decoder the app builds
        from dllm_decode.plugins import get_plugin_manager
        pm = get_plugin_manager()
    service = Service(DecoderPool(model, tokenizer, recipe, overrides, pm=pm),
                      Worker(model, max_batch=max_batch, max_waiting=max_waiting), model_name, timeout_s)
    return _routes(service)


class _TimedOut(Exception):
    pass


class _Gone(Exception):
    pass


class Service:
    """What the app holds: its decoders, its worker and its limits."""

    def __init__(self, pool: DecoderPool, worker: Worker, model_name: str, timeout_s: float):
        self.pool, self.worker, self.model_name, self.timeout_s = pool, worker, model_name, timeout_s
        self.tokenizer = pool.tokenizer
        self.created = int(time.time())

    async def complete(self, request: Any, chat: bool) -> Any:
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.background import BackgroundTask

        tickets: list[Ticket] = []
        try:
            req = parse_body(await request.body(), ChatRequest if chat else CompletionRequest)
            if req.model != self.model_name:
                raise ApiError(404, f"model {req.model!r} is not served here (this server serves "
                               f"{self.model_name!r})", param="model", code="model_not_found")
            decoder, cut = await self._decoder(req)
            prompts = self._prompts(req, chat)
            if req.stream and len(prompts) > 1:
                raise ApiError(400, f"prompt holds {len(prompts)} prompts; a stream carries one (send one "
                               "request per prompt, or leave stream out)", param="prompt")
            stops = stop_strings(req)
            # a prefix that settles the answer (max_tokens of it, a stop string) ends the request
            # early, so its steps are followed
            follow = req.stream or not decoder.policy.revocable and (bool(stops) or cut is not None)
            for i, prompt in enumerate(prompts):
                tickets.append(await self._submit(decoder, prompt, req, _field(chat, i, len(prompts)), follow))
        except ApiError as exc:
            for ticket in tickets:
                self.worker.cancel(ticket)
            return _error(exc)
        shape = Shape(chat, self.model_name, sum(map(len, prompts)))
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._events(tickets[0], request, shape, decoder, cut, stops, usage, deadline)
            # the background task cancels the request too when the stream never started
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(self.worker.cancel, tickets[0]))
        tasks = [asyncio.ensure_future(self._answer(t, request, decoder, cut, stops, deadline)) for t in tickets]
        try:
            answers = await asyncio.gather(*tasks)
        except (_Gone, _TimedOut, ApiError) as exc:
            for task, ticket in zip(tasks, tickets):        # one prompt failed: the others are dropped
                task.cancel()
                self.worker.cancel(ticket)
            if isinstance(exc, _Gone):
                return JSONResponse({}, status_code=499)   # nobody reads it
            return _error(self._timeout_error() if isinstance(exc, _TimedOut) else exc)
        return JSONResponse(shape.body(answers))

    async def _answer(self, ticket: Ticket, request: Any, decoder: Decoder, cut: int | None,
                      stops: Sequence[str], deadline: float) -> Answer:
        """One prompt's answer: at its end, or as soon as its committed prefix settles it."""
        while not isinstance(event := await self._next(ticket, request, deadline), Finished):
            if (answer := self._settled(ticket, event, decoder, cut, stops)) is not None:
                return answer
        _raise_failure(event)
        return answer_of(event.tokens, decoder, cut, stops)

    def _settled(self, ticket: Ticket, update: RowUpdate, decoder: Decoder, cut: int | None,
                 stops: Sequence[str]) -> Answer | None:
        """The answer a step's committed prefix already decides (the request then leaves), or None."""
        if decoder.policy.revocable or not settled(update, decoder, cut, stops):
            return None
        self.worker.cancel(ticket)
        return answer_of(update.prefix, decoder, cut, stops)

    async def _decoder(self, req: Any) -> tuple[Decoder, int | None]:
        try:            # off the event loop: a first build may load a model while other requests stream
            return await asyncio.to_thread(self.pool.for_request, req.recipe, req.max_tokens, req.temperature)
        except FieldError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None

    def _prompts(self, req: Any, chat: bool) -> list[list[int]]:
        if chat:
            return [self._chat_prompt(req)]
        many = prompts_of(req)
        return [p if isinstance(p, list) else self._encode(p, _field(chat, i, len(many))) for i, p in enumerate(many)]

    def _chat_prompt(self, req: Any) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "the model's tokenizer has no chat template; send the prompt as text to "
                           "/v1/completions instead", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 -- a template refuses what it cannot render, in its own words
            raise ApiError(400, f"the chat template refused the messages: {exc}", param="messages") from None
        return self._encode(text, "messages")

    def _encode(self, text: str, field: str) -> list[int]:
        from dllm_decode.cli import _check_vocabulary     # the refusal `generate` gives the same text

        if not text:
            raise ApiError(400, f"{field} is empty", param=field.split()[0])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            _check_vocabulary(self.tokenizer, text, ids, field)
        except InputError as exc:
            raise ApiError(400, str(exc), param=field.split()[0]) from None
        return ids

    async def _submit(self, decoder: Decoder, prompt: list[int], req: Any, field: str, follow: bool) -> Ticket:
        try:
            return await self.worker.submit(decoder, prompt, req.seed, follow)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", type="rate_limit_error",
                           code="queue_full") from None
        except InputError as exc:         # the prompt (the scheduler checked it as generate does)
            message = str(exc).replace("prompt 0 ", f"{field} ")
            if req.max_tokens is not None and "gen_length" in message:
                message += f" (max_tokens {req.max_tokens} asks for gen_length {decoder.gen.gen_length})"
            raise ApiError(400, message, param=field.split()[0]) from None
        except DllmDecodeError as exc:
            raise ApiError(503, str(exc), type="server_error") from None

    async def _next(self, ticket: Ticket, request: Any, deadline: float) -> RowUpdate | Finished:
        """The request's next event; :class:`_TimedOut` past ``deadline``, :class:`_Gone` when the
        client disconnected (then the request is cancelled, freeing its row)."""
        loop = asyncio.get_running_loop()
        while True:
            event = ticket.take()
            if isinstance(event, Finished):
                return event                # an answer that made it is never thrown away
            now = loop.time()
            if now >= deadline:
                raise _TimedOut
            # every POLL_S, also while steps keep coming (a followed request gets one each step)
            if now >= ticket.check_at:
                ticket.check_at = now + POLL_S
                if await request.is_disconnected():
                    self.worker.cancel(ticket)
                    raise _Gone
            if event is not None:
                return event
            try:
                await asyncio.wait_for(ticket.ready.wait(), min(deadline - now, POLL_S))
            except asyncio.TimeoutError:
                pass

    async def _events(self, ticket: Ticket, request: Any, shape: Shape, decoder: Decoder, cut: int | None,
                      stops: Sequence[str], usage: bool, deadline: float) -> AsyncIterator[str]:
        """The stream: text deltas as the committed prefix grows, the finish, ``[DONE]``. A
        re-masking policy may take back committed text, so its answer is sent whole at the end.
        The last characters that could begin a stop string are held back until they cannot."""
        sent, revocable = "", decoder.policy.revocable
        hold = max(map(len, stops), default=1) - 1
        try:
            if shape.chat:
                yield _sse(shape.chunk(role=True))
            while isinstance(event := await self._next(ticket, request, deadline), RowUpdate):
                if (answer := self._settled(ticket, event, decoder, cut, stops)) is not None:
                    break
                text = "" if revocable else prefix_text(event, decoder, cut)
                text = text[:max(0, len(text) - hold)]
                if len(text) > len(sent) and text.startswith(sent):
                    yield _sse(shape.chunk(text[len(sent):]))
                    sent = text
            else:
                _raise_failure(event)
                answer = answer_of(event.tokens, decoder, cut, stops)
            if len(answer.text) > len(sent):
                yield _sse(shape.chunk(answer.text[len(sent):]))
            yield _sse(shape.chunk(finish=answer.finish_reason))
            if usage:
                yield _sse(shape.usage_chunk(answer))
            yield "data: [DONE]\n\n"
        except _TimedOut:
            self.worker.cancel(ticket)
            yield _sse(self._timeout_error().body())
        except ApiError as exc:
            yield _sse(exc.body())
        except _Gone:
            pass
        finally:                            # a client that went away: its row is freed
            self.worker.cancel(ticket)

    def _timeout_error(self) -> ApiError:
        return ApiError(504, f"the request did not finish within {self.timeout_s:g} s (the server's "
                        "timeout) and was cancelled", type="timeout_error", code="timeout")


def _field(chat: bool, i: int, n: int) -> str:
    """The request field a prompt came from, as errors name it."""
    return "messages" if chat else "prompt" if n == 1 else f"prompt {i}"


def _raise_failure(event: Finished) -> None:
    """A request that ended without an answer, as the error its client gets."""
    if event.cancelled:
        why = f": {event.error}" if event.error is not None else ""
        raise ApiError(503, f"the request was cancelled{why}", type="server_error")
    if isinstance(event.error, InputError):
        raise ApiError(400, str(event.error))
    if event.error is not None:
        raise ApiError(500, f"decoding failed: {event.error}", type="server_error")


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _error(exc: ApiError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status)


def _routes(service: Service) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.worker.close, 60)

    app = FastAPI(title="dllm-decode", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:     # unknown path, wrong method
        return _error(ApiError(exc.status_code, str(exc.detail)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await service.complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await service.complete(request, chat=True)

    card = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "dllm-decode"}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id != service.model_name:
            return _error(ApiError(404, f"model {model_id!r} is not served here (this server serves "
                                   f"{service.model_name!r})", param="model", code="model_not_found"))
        return card

    @app.get("/health")
    async def health() -> Any:
        running, waiting = service.worker.counts
        return JSONResponse({"status": "ok", "running": running, "waiting": waiting})

    return app


def run(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
