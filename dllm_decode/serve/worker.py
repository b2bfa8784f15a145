"""The one thread that owns a :class:`Scheduler` and steps it while anything is running or waiting.

The scheduler is synchronous and not thread-safe, so nothing else touches it: the server's event
loop hands submissions and cancellations to the worker through a command queue, and the worker
sends each request's progress back to the loop (``call_soon_threadsafe`` onto the request's
:class:`Ticket`). Between two steps it takes every queued command, so a request joins the running
batch at the next step and a cancelled one leaves it there.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from dllm_decode.engine import Decoder
from dllm_decode.errors import DllmDecodeError
from dllm_decode.serve.scheduler import Job, Scheduler
from dllm_decode.serve.stream import RowUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """A request's last event: its generated tokens, or why it has none."""

    tokens: list[int]
    error: DllmDecodeError | None = None
    cancelled: bool = False


@dataclass(eq=False)
class Ticket:
    """One request's line to the worker. The worker sends it a :class:`RowUpdate` after each of
    its steps (when ``stream``) and then one :class:`Finished`; the request's coroutine reads the
    newest update with :meth:`take`, so a slow reader skips steps instead of piling them up."""

    loop: asyncio.AbstractEventLoop
    stream: bool
    job: Job | None = None           # set by the worker when the scheduler took the request
    sent: RowUpdate | None = None    # the worker's: the last update it sent
    latest: RowUpdate | None = None  # the loop's from here on: the newest update not yet taken
    finished: Finished | None = None
    closed: bool = False             # Finished was taken
    check_at: float = 0.0            # the loop's: when to ask next whether the client is still there
    ready: asyncio.Event = field(default_factory=asyncio.Event)    # something to take

    def send(self, event: RowUpdate | Finished) -> None:
        """From the worker thread: hand ``event`` to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self._arrive, event)
        except RuntimeError:          # the loop is closed: nobody is listening any more
            pass

    def _arrive(self, event: RowUpdate | Finished) -> None:
        if isinstance(event, Finished):
            self.finished = event
        else:
            self.latest = event
        self.ready.set()

    def take(self) -> RowUpdate | Finished | None:
        """In the loop: the newest unread update, else the end, else None (then wait on ``ready``)."""
        if self.latest is not None:
            update, self.latest = self.latest, None
            return update
        if self.finished is not None:
            self.closed = True
            return self.finished
        self.ready.clear()
        return None


class Worker:
    """Owns a scheduler on its own thread; :meth:`submit` and :meth:`cancel` are the only way in."""

    def __init__(self, model: Any, max_batch: int = 8, max_waiting: int | None = None):
        self.scheduler = Scheduler(model, max_batch=max_batch, max_waiting=max_waiting)
        self.counts = (0, 0)                 # (running, waiting), written by the worker only
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._live: dict[int, Ticket] = {}   # job id -> ticket, the worker's only
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="dllm-decode-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop after the current step; every request still open gets an error."""
        self._closing = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def submit(self, decoder: Decoder, prompt: Sequence[int], seed: int | None, stream: bool) -> Ticket:
        """Queue a request; raises the scheduler's refusal (``InputError``, ``QueueFull``)."""
        if self._closing or not self._thread.is_alive():
            raise DllmDecodeError("the server is shutting down")
        loop = asyncio.get_running_loop()
        ticket, accepted = Ticket(loop, stream), loop.create_future()
        self._send(("submit", ticket, (decoder, list(prompt), seed), accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.cancel(ticket)          # the caller went away while the worker was stepping
            raise
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop the request (its client went away or ran out of time); a finished one is kept."""
        if not ticket.closed:
            self._send(("cancel", ticket, None, None))

    # ------------------------------------------------------------------ the worker thread

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.clear()           # before taking commands: one sent after this wakes the wait
            self._take_commands()
            if self._closing:
                break
            if self.scheduler.idle:
                self._publish()
                self._wake.wait()
                continue
            try:
                self.scheduler.step()
            except Exception as exc:     # noqa: BLE001 -- a failure no single request can be blamed for
                log.exception("decoding step failed")
                self._fail_in_flight(exc)
            self._publish()
        self._shut_down()

    def _take_commands(self) -> None:
        while True:
            try:
                kind, ticket, args, accepted = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                try:
                    ticket.job = self.scheduler.submit(*args)
                except DllmDecodeError as exc:
                    _resolve(ticket.loop, accepted, exc)
                    continue
                self._live[ticket.job.id] = ticket
                _resolve(ticket.loop, accepted, None)
            elif ticket.job is not None and not ticket.job.finished:
                self.scheduler.cancel(ticket.job)
        self._count()

    def _publish(self) -> None:
        """Send every live request its new update, and the finished ones their end."""
        for job_id, ticket in list(self._live.items()):
            job = ticket.job
            if ticket.stream and job.update is not None and job.update is not ticket.sent:
                ticket.sent = job.update
                ticket.send(job.update)
            if job.finished:
                del self._live[job_id]
                ok = job.error is None and not job.cancelled
                ticket.send(Finished(job.tokens if ok else [], job.error, job.cancelled))
        self._count()

    def _fail_in_flight(self, exc: Exception) -> None:
        """After an unexpected failure inside a step, fail every request taken out of the queue:
        which one broke the step is unknown, a half-admitted one may be in no list, and a failed
        one is retired without its observers (which may be what failed)."""
        error = DllmDecodeError(f"the decoding step failed: {type(exc).__name__}: {exc}")
        waiting = set(map(id, self.scheduler.waiting))
        for ticket in self._live.values():
            job = ticket.job
            if id(job) not in waiting and job.error is None and not job.cancelled:
                job.error = error

    def _shut_down(self) -> None:
        gone = DllmDecodeError("the server is shutting down")
        for ticket in self._live.values():
            self.scheduler.cancel(ticket.job)
            ticket.send(Finished([], gone, cancelled=True))
        self._live.clear()
        while True:
            try:
                _, ticket, _, accepted = self._commands.get_nowait()
            except queue.Empty:
                break
            if accepted is not None:
                _resolve(ticket.loop, accepted, gone)

    def _count(self) -> None:
        self.counts = (len(self.scheduler.running), len(self.scheduler.waiting))


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: Exception | None) -> None:
    """Settle ``future`` from the worker thread (unless its awaiting coroutine was cancelled)."""
    def settle() -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(None)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
