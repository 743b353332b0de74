"""Dynamic batching of model calls, one batcher per loaded model.

Every endpoint is encode -> cheap code recombination -> decode. Four job kinds carry all the model work:
`encode(images) -> Codes`, `decode(Codes) -> images`, `edit(images, recombine) -> images`, which does all three
steps in one trip through the queue (an edit that went encode, back to the event loop, then decode would wait for
two batches instead of one), and `render(images, plan) -> (images, masks)`, an edit whose recombination is a core
`Edit` carried out by the core's `render` (mask models composite the result over the uploaded image itself). Requests put jobs on a bounded asyncio queue (full: 503 with Retry-After). One worker
task per model takes the first waiting job, then gathers more for up to `max_wait_ms` or until `max_batch` images,
and runs the whole batch in the model's own thread (torch.inference_mode), off the event loop: one encode call for
the images of every encode and edit job, each edit's recombination (the core's `transfer_codes`/`remove_codes`) on
its own rows, then one decode call for every decode and edit job and one render call for every render job. While that thread computes, new jobs queue up
and form the next batch. The batcher does not wait when every request in flight already has a job in the batch
(one client alone is not slowed down by max_wait_ms). `call` runs any other function of the model (interpolation
paths) in the same thread.

Every net is per-sample (instance and group norms; no batch statistics), so a batched answer equals the answer
computed alone, up to float rounding. max_batch 1 and max_wait 0 is the naive configuration: one job per call.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from models import Codes, Disentangler, Edit

from .errors import NotReady, Overloaded
from .metrics import Metrics

log = logging.getLogger("did.app")

Kind = Literal["encode", "decode", "edit", "render", "call"]
# An edit's recombination: its rows' Codes (on the model's device) -> (Codes to decode, anything to hand back).
Recombine = Callable[[Codes], tuple[Codes, Any]]
# A render job's plan: its rows' Codes -> (the Edit of its first len(Edit) images, anything to hand back).
Plan = Callable[[Codes], tuple[Edit, Any]]


@dataclass(slots=True)
class _Job:
    kind: Kind
    payload: Any
    rows: int
    future: asyncio.Future


class Batcher:
    def __init__(self, name: str, model: Disentangler, *, max_batch: int, max_wait_ms: float, queue_size: int,
                 metrics: Metrics | None = None, dtype: torch.dtype = torch.float32, in_flight: Callable[[], int] | None = None):
        self.name, self.model = name, model
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.device, self.dtype = model.device, dtype
        self.metrics = metrics
        self._in_flight = in_flight or (lambda: max_batch)  # requests that may still send a job; unknown: wait
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(queue_size)
        self._held: _Job | None = None  # a job that did not fit the last batch; it opens the next one
        self._running: list[_Job] = []  # the batch in the model's thread
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"did-model-{name}")
        self._task: asyncio.Task | None = None

    # --- the API of the routes ----------------------------------------------------------------------------------

    async def encode(self, images: torch.Tensor) -> Codes:
        """(N, 3, S, S) CPU images in [-1, 1] -> Codes of N rows (CPU float32)."""
        return await self._submit("encode", images, images.shape[0])

    async def decode(self, codes: Codes) -> torch.Tensor:
        """Codes of N rows -> (N, 3, S, S) CPU float32 images in [-1, 1]."""
        return await self._submit("decode", codes, codes.common.shape[0])

    async def edit(self, images: torch.Tensor, recombine: Recombine) -> tuple[torch.Tensor, Any]:
        """Encode (N, 3, S, S) CPU images, recombine their codes, decode: ((M, 3, S, S) CPU images, recombine's extra).
        `recombine` runs in the model's thread; it must only recombine codes (cheap tensor arithmetic)."""
        return await self._submit("edit", (images, recombine), images.shape[0])

    async def render(self, images: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Encode (N, 3, S, S) CPU images, plan an Edit on their codes, carry it out on the first M images (the
        ones edited; guides follow them): ((M, 3, S, S) CPU images, (M, 1, S, S) CPU masks or None for a plain
        model, plan's extra). `plan` runs in the model's thread; it must only recombine codes."""
        return await self._submit("render", (images, plan), images.shape[0])

    async def call(self, fn: Callable[[Disentangler], Any], rows: int = 1) -> Any:
        """fn(model) in the model's thread, between batches (for work that is not encode or decode)."""
        return await self._submit("call", fn, rows)

    @property
    def depth(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    # --- life cycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"did-batcher-{self.name}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        pending = self._running + ([self._held] if self._held else [])
        self._held, self._running = None, []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(NotReady("the service is shutting down"))
        self._executor.shutdown(wait=True)

    # --- internals ----------------------------------------------------------------------------------------------

    async def _submit(self, kind: Kind, payload: Any, rows: int) -> Any:
        if not self.running:
            raise NotReady(f"model {self.name!r} is not serving yet")
        job = _Job(kind, payload, rows, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            if self.metrics:
                self.metrics.rejected.labels(self.name).inc()
            raise Overloaded(f"model {self.name!r} has {self._queue.maxsize} jobs waiting; try again shortly") from None
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(self.depth)
        return await job.future

    async def _gather(self) -> list[_Job]:
        """The next batch: the first waiting job, then more until max_batch images or max_wait has passed."""
        first = self._held or await self._queue.get()
        self._held = None
        jobs, rows = [first], first.rows
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while rows < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - loop.time()
                if timeout <= 0 or len(jobs) >= self._in_flight():
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    break
            if rows + job.rows > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            rows += job.rows
        return [j for j in jobs if not j.future.cancelled()]  # the client went away while it waited

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            if self.metrics:
                self.metrics.queue_depth.labels(self.name).set(self.depth)
            if not jobs:
                continue
            self._running = jobs
            try:
                results = await loop.run_in_executor(self._executor, self._run, jobs)
            except Exception as e:  # a bug in a batch fails that batch's requests, never the worker
                log.exception("model %s: batch of %d jobs failed", self.name, len(jobs))
                results = [e] * len(jobs)
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            self._running = []
            del jobs, results  # the batch's tensors go as soon as their requests have them

    def _run(self, jobs: list[_Job]) -> list[Any]:
        """The whole batch in the model's thread: one encode call, the edits' recombinations, one decode call."""
        results: dict[int, Any] = {}
        with torch.inference_mode():
            encoding = [j for j in jobs if j.kind in ("encode", "edit", "render")]
            to_decode: list[tuple[_Job, Codes]] = [(j, Codes(*(self._to_model(t) for t in j.payload))) for j in jobs if j.kind == "decode"]
            to_render: list[tuple[_Job, Edit]] = []
            if encoding:
                for job, codes in zip(encoding, self._timed("encode", encoding, self._encode)):
                    if job.kind == "encode":
                        results[id(job)] = Codes(*(t.float().cpu() for t in codes))
                        continue
                    try:
                        mixed, extra = job.payload[1](codes)
                    except Exception as e:  # that request's problem only
                        results[id(job)] = e
                        continue
                    results[id(job)] = extra
                    (to_render if job.kind == "render" else to_decode).append((job, mixed))
            if to_decode:
                images = self._timed("decode", to_decode, self._decode)
                for (job, _), image in zip(to_decode, images):
                    results[id(job)] = (image, results[id(job)]) if job.kind == "edit" else image
            if to_render:
                for (job, _), (image, mask) in zip(to_render, self._timed("render", to_render, self._render)):
                    results[id(job)] = (image, mask, results[id(job)])
            for job in jobs:
                if job.kind == "call":
                    try:
                        results[id(job)] = job.payload(self.model)
                    except Exception as e:  # e.g. a ValueError of the core: that request's problem only
                        results[id(job)] = e
        return [results[id(j)] for j in jobs]

    def _timed(self, kind: str, group: list, fn: Callable[[list], list]) -> list:
        start = time.perf_counter()
        out = fn(group)
        if self.metrics:
            rows = sum(len(o.common) if isinstance(o, Codes) else len(o[0]) if isinstance(o, tuple) else len(o) for o in out)
            self.metrics.batch_size.labels(self.name, kind).observe(rows)
            self.metrics.batch_seconds.labels(self.name, kind).observe(time.perf_counter() - start)
        return out

    def _to_model(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype, non_blocking=True)

    @staticmethod
    def _slices(sizes: list[int]) -> list[slice]:
        out, start = [], 0
        for n in sizes:
            out.append(slice(start, start + n))
            start += n
        return out

    def _encode(self, group: list[_Job]) -> list[Codes]:
        """Codes (on the model's device) of each job's images, from one encode call."""
        images = [j.payload[0] if j.kind in ("edit", "render") else j.payload for j in group]
        x = torch.cat(images) if len(images) > 1 else images[0]
        codes = self.model.encode(self._to_model(x))
        return [codes.index(s) for s in self._slices([len(i) for i in images])]

    def _decode(self, group: list[tuple[_Job, Codes]]) -> list[torch.Tensor]:
        """CPU float32 images of each entry's codes, from one decode call."""
        parts = [codes for _, codes in group]
        codes = Codes.cat(parts) if len(parts) > 1 else parts[0]
        images = self.model.decode(*codes).float().cpu()
        return [images[s] for s in self._slices([len(c.common) for c in parts])]

    def _render(self, group: list[tuple[_Job, Edit]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(CPU float32 images, CPU masks or None) of each entry's Edit, from one render call."""
        edits = [edit for _, edit in group]
        sizes = [len(e.codes.common) for e in edits]
        x = torch.cat([job.payload[0][:n] for (job, _), n in zip(group, sizes)])
        images, masks = self.model.render(self._to_model(x), Edit.cat(edits) if len(edits) > 1 else edits[0])
        images = images.float().cpu()
        masks = masks.float().cpu() if masks is not None else None
        return [(images[s], masks[s] if masks is not None else None) for s in self._slices(sizes)]
