"""Continuous batching: a running batch of up to ``max_batch`` requests, refilled between steps.

Every request keeps its own :class:`DecodeState` (its own canvas, step counter, plugin scratch,
cache store and per-row random draws), so its tokens are exactly those it gets decoded alone:
no plugin sees another request's rows. What is shared is the forward. At each step the
scheduler asks every running request for its plan (``Decoder.begin_step``); the requests that
need a plain forward of their canvas (no cache plan, no guidance) are left-padded to one width
and run as one batch, as the engine pads its own batches; the rest run their own planned
forward. Each request then finishes its step from its slice of the logits
(``Decoder.end_step``). Between steps, finished and cancelled requests leave and waiting ones
join, each with its own prompt length, recipe and seed.

The scheduler is synchronous and holds no thread: a server calls :meth:`Scheduler.step` from one
worker and reads the updates it returns.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dllm_decode.engine import Decoder
from dllm_decode.errors import InputError
from dllm_decode.guidance import execute
from dllm_decode.models.output import ForwardOutput
from dllm_decode.models.store import CacheStore
from dllm_decode.request import check_prompts, row_seeds
from dllm_decode.serve.stream import RowUpdate, row_updates
from dllm_decode.state import DecodeState


@dataclass(eq=False)
class Job:
    """One request in the scheduler: a prompt, its decoder (model + recipe) and its seed."""

    id: int
    decoder: Decoder
    prompt: list[int]
    seed: int
    state: DecodeState | None = None      # set when admitted
    done: bool = False                    # its last step finished it
    error: Exception | None = None        # why it stopped, when a step failed
    cancelled: bool = False
    meta: dict[str, Any] = field(default_factory=dict)   # the caller's own (e.g. a stream queue)

    _update: RowUpdate | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.error is not None or self.cancelled or self.done

    @property
    def update(self) -> RowUpdate | None:
        """What its latest step wrote (:class:`RowUpdate`), read from the state when first asked
        after a step: a caller that does not stream pays nothing for it."""
        if self.state is None or self.state.last is None:
            return None
        if self._update is None or self._update.step != self.state.step:
            self._update = row_updates(self.state, self.decoder.tokenizer)[0]
        return self._update

    @property
    def tokens(self) -> list[int]:
        """The generated region (``gen_length`` ids, or as many as a canvas rule grew it to)."""
        return self.state.generated_rows()[0] if self.state is not None else []


class Scheduler:
    """Keep up to ``max_batch`` requests decoding; admit waiting ones as others finish."""

    def __init__(self, model: Any, max_batch: int = 8, max_waiting: int | None = None):
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch, self.max_waiting = model, max_batch, max_waiting
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self._ids = itertools.count()
        self.forwards = 0                  # model calls, a merged one counted once

    def submit(self, decoder: Decoder, prompt: Sequence[int], seed: int | None = None,
               meta: dict[str, Any] | None = None) -> Job:
        """Queue one prompt. Refused at once (nothing queued) when the prompt cannot be decoded,
        the decoder runs another model, or the waiting queue is full."""
        if decoder.model is not self.model:
            raise InputError("the decoder runs another model than this scheduler's")
        prompt, = check_prompts([prompt], decoder.spec, decoder.gen.gen_length, decoder.mask_id,
                                names=["prompt 0"], where="Scheduler.submit")
        seed, = row_seeds(None if seed is None else [seed], 1, decoder.gen.seed)
        # requests the next step admits into free rows are not waiting for a row
        queued = len(self.waiting) - max(0, self.max_batch - len(self.running))
        if self.max_waiting is not None and queued >= self.max_waiting:
            raise QueueFull(f"{queued} requests are waiting for a row already (max_waiting {self.max_waiting})")
        job = Job(next(self._ids), decoder, prompt, seed, meta=dict(meta or {}))
        self.waiting.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Drop a request (a client that went away): it leaves before the next step and its
        state, cache store included, is freed. A waiting one gives its place in the queue back
        at once (``max_waiting`` counts the live requests only)."""
        job.cancelled = True
        if job in self.waiting:
            self.waiting.remove(job)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    @torch.inference_mode()
    def step(self) -> list[Job]:
        """Admit waiting requests, advance every running one by one step, retire finished ones.
        Returns the jobs that took a step (each with its new ``update``)."""
        self._retire()
        self._admit()
        plans = {j.id: self._guard(j, self._plan, j) for j in self.running}
        jobs = [j for j in self.running if j.error is None]       # a failed plan takes no forward
        plain = [j for j in jobs if plans[j.id] is None and j.decoder.gen.cfg_scale <= 0]
        outputs = self._merged_forward(plain) if plain else {}
        for job in jobs:
            if job.error is None:
                self._guard(job, self._finish, job, outputs.get(job.id), plans[job.id])
        self._retire()
        return jobs

    def run(self) -> None:
        """Step until nothing is running or waiting."""
        while not self.idle:
            self.step()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _guard(job: Job, fn: Any, *args: Any) -> Any:
        """``fn(*args)``; any exception (a plugin's, a model's, out of memory) fails this job
        only, which then leaves the batch at the end of the step."""
        try:
            return fn(*args)
        except Exception as exc:          # noqa: BLE001 - one request's failure is its own
            job.error = exc
            return None

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            self.running.append(job)      # listed first: a failed start still leaves cleanly
            self._guard(job, self._start, job)

    @staticmethod
    def _start(job: Job) -> None:
        job.state = job.decoder.start([job.prompt], seeds=[job.seed])
        job.decoder.open(job.state)

    @staticmethod
    def _plan(job: Job) -> Any:
        job.decoder.check_budget(job.state)
        return job.decoder.begin_step(job.state)

    def _finish(self, job: Job, out: ForwardOutput | None, plan: Any) -> None:
        if out is None:                   # not merged: its own planned (or guided) forward
            out = job.decoder.forward(job.state, plan)
            self.forwards += 1
        job.done = job.decoder.end_step(job.state, out)

    def _merged_forward(self, jobs: list[Job]) -> dict[int, ForwardOutput]:
        """One plain forward for ``jobs``' canvases, left-padded to the widest."""
        L = max(j.state.length for j in jobs)
        xs, masks = [], []
        for job in jobs:                  # one row per request: building the batch, not the step
            s = job.state
            pad = L - s.length
            xs.append(torch.nn.functional.pad(s.x, (pad, 0), value=job.decoder.pad_id))
            masks.append(torch.nn.functional.pad(s.attention_mask, (pad, 0), value=False))
        try:
            logits = execute(self.model, torch.cat(xs), torch.cat(masks), None, self._store()).logits  # (N, L, V)
        except Exception as exc:          # noqa: BLE001 - the merged rows fail together
            for job in jobs:
                job.error = exc
            return {}
        self.forwards += 1
        return {j.id: ForwardOutput(logits[i:i + 1, L - j.state.length:].clone()) for i, j in enumerate(jobs)}

    def _store(self) -> Any:
        factory = getattr(self.model, "new_store", None)
        return factory() if callable(factory) else CacheStore()

    def _retire(self) -> None:
        """Finished requests leave the batch; their observers run and their stores are freed."""
        leaving = [j for j in self.running if j.finished]
        self.running = [j for j in self.running if not j.finished]
        for job in leaving:
            if job.state is None:
                continue
            if job.error is None and not job.cancelled:
                self._guard(job, job.decoder.close, job.state)     # an observer may still fail it
            else:
                job.state.close()


class QueueFull(InputError):
    """The scheduler's waiting queue is full; try again later."""
