"""Dynamic batching of model calls, one batcher per loaded model.

Every endpoint is encode -> cheap code recombination -> decode. Three job kinds carry all the model work:
`encode(images) -> Codes`, `decode(Codes) -> images`, and `render(images, plan, parts) -> Rendered`, an edit
in one trip through the queue (an edit that went encode, back to the event loop, then decode would wait for two
batches instead of one): its images are encoded, its `plan` turns their codes into a core `Edit`, and the core's
`render` carries it out (mask models composite the result over the uploaded image itself). `parts` says which codes
of each image the edit reads (the core's `*_parts`), so an encoder runs only on the images that need its code.
A plan is data (`Plan`): the plans of one type whose jobs read the same parts are planned in one call over all
their rows, so a batch costs a few tensor operations per kind of edit, not per request.
Requests put jobs on a bounded asyncio queue (full: 503 with Retry-After). One worker task per model takes the
first waiting job, then gathers more for up to `max_wait_ms` or until `max_batch` images, and runs the whole batch
in the model's own thread (torch.inference_mode), off the event loop: one call per encoder for the images of every
encode and render job that need its code, the render jobs' plans (one call per kind), then one decode call for
every decode job and one render call for every render job. While that thread computes, new jobs queue up and form the
next batch. The batcher does not wait when every request in flight already has a job in the batch
(one client alone is not slowed down by max_wait_ms). `call` runs any other function of the model (interpolation
paths) in the same thread.

A request waits for its job until its deadline or until its client disconnects (app/limits.py), whichever
comes first; then it answers 504 (or gives up, for a client that is gone) and its job, unless already in the
model's thread, is dropped before the model call.

Every net is per-sample (instance and group norms; no batch statistics), so a batched answer equals the answer
computed alone, up to float rounding. max_batch 1 and max_wait 0 is the naive configuration: one job per call.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Protocol, Sequence

import torch

from models import Codes, Disentangler, Edit
from models.calibration import reconstruction_error
from models.disentangler import PARTS, Part

from . import limits
from .errors import ClientGone, DeadlineExceeded, NotReady, Overloaded
from .metrics import Metrics

log = logging.getLogger("did.app")

Kind = Literal["encode", "decode", "render", "call"]
ALL: frozenset[Part] = frozenset(PARTS)


class Plan(Protocol):
    """What a render job asks of the model: how to make an Edit of its images' codes. The job's first `rows` images
    are the ones edited (their Edit's rows); any images after them only lend codes (guides).

    `many` runs in the model's thread and plans every job of one batch that has this plan's type and reads the same
    parts, in one go: codes[i] holds the Codes of job i's images (one row each, on the model's device; a code the
    job's parts did not ask for is None). It returns one Edit whose rows are the jobs' edited images in order, and
    one value per job to hand back (`Rendered.extra`). A plan may only recombine codes."""

    rows: int

    @classmethod
    def many(cls, model: Disentangler, plans: Sequence[Any], codes: Sequence[list[Codes]]) -> tuple[Edit, list[Any]]: ...


class Rendered(NamedTuple):
    """What a render job answers: the edited images (M, 3, S, S) and masks (M, 1, S, S; None for a plain model) on
    the CPU, the plan's extra, and with `score` the reconstruction error of each of its N images (else None)."""

    images: torch.Tensor
    masks: torch.Tensor | None
    extra: Any
    errors: torch.Tensor | None


@dataclass(slots=True)
class _Job:
    kind: Kind
    payload: Any
    rows: int
    future: asyncio.Future
    queued: float = 0.0  # perf_counter() when it entered the queue
    request: bool = False  # a request's job (its stages are timed), not the warm-up's
    dropped: str = ""  # why its request stopped waiting ("deadline", "disconnected"); the batcher drops it


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

    async def render(self, images: torch.Tensor, plan: Plan, parts: tuple[frozenset[Part], ...] | None = None,
                     score: bool = False) -> Rendered:
        """Encode (N, 3, S, S) CPU images (of image i only the codes in parts[i]; None: all three of every image),
        plan an Edit on their codes (`Plan`), carry it out on the first plan.rows images (the ones edited; guides
        follow them). `score` also measures every image's reconstruction error (`models.calibration`: all three
        codes and one more decode per image)."""
        n = images.shape[0]
        parts = (ALL,) * n if parts is None or score else tuple(frozenset(p) for p in parts)
        if len(parts) != n or not all(p <= ALL for p in parts):
            raise ValueError(f"parts needs one subset of {PARTS} per image ({n}), not {parts}")
        if not 1 <= plan.rows <= n:
            raise ValueError(f"a plan edits 1 to {n} of the job's images, not {plan.rows}")
        return await self._submit("render", (images, plan, parts, score), n)

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
        loop = asyncio.get_running_loop()
        bounds = limits.current()
        if bounds is not None and loop.time() >= bounds.deadline:
            self._count_drop("deadline")
            raise DeadlineExceeded("the request ran out of time before its model call (DID_REQUEST_TIMEOUT_S)")
        job = _Job(kind, payload, rows, loop.create_future(), time.perf_counter(), bounds is not None)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            if self.metrics:
                self.metrics.rejected.labels(self.name).inc()
            raise Overloaded(f"model {self.name!r} has {self._queue.maxsize} jobs waiting; try again shortly") from None
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(self.depth)
        if bounds is None:
            return await job.future
        gone = asyncio.ensure_future(bounds.disconnected())

        def stop(reason: str) -> None:  # the request stops waiting; the batcher drops its job unless already computing
            if not job.future.done():
                job.dropped = reason
                job.future.cancel()

        gone.add_done_callback(lambda task: None if task.cancelled() else stop("disconnected"))
        timer = None if bounds.deadline == float("inf") else loop.call_at(bounds.deadline, stop, "deadline")
        try:
            return await job.future
        except asyncio.CancelledError:
            if job.dropped == "disconnected":
                raise ClientGone("the client closed the connection before its answer was ready") from None
            if job.dropped == "deadline":
                raise DeadlineExceeded("the request ran out of time waiting for the model (DID_REQUEST_TIMEOUT_S)") from None
            raise
        finally:
            gone.cancel()
            if timer is not None:
                timer.cancel()

    def _count_drop(self, reason: str) -> None:
        if self.metrics:
            self.metrics.dropped.labels(self.name, reason).inc()

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
        kept = []
        for job in jobs:  # a job whose request stopped waiting (deadline, client gone) never reaches the model
            if job.future.cancelled():
                self._count_drop(job.dropped or "cancelled")
            else:
                kept.append(job)
        if self.metrics:
            now = time.perf_counter()
            for job in kept:
                if job.request:
                    self.metrics.stages.labels("queue").observe(now - job.queued)
        return kept

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            if self.metrics:
                self.metrics.queue_depth.labels(self.name).set(self.depth)
            if not jobs:
                continue
            self._running = jobs
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run, jobs)
            except Exception as e:  # a bug in a batch fails that batch's requests, never the worker
                log.exception("model %s: batch of %d jobs failed", self.name, len(jobs))
                results = [e] * len(jobs)
            if self.metrics:
                took = time.perf_counter() - start
                for job in jobs:
                    if job.request:
                        self.metrics.stages.labels("model").observe(took)
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
        """The whole batch in the model's thread: one call per encoder, the render jobs' plans (one call per kind of
        plan), one decode call for the reconstructions of the scored render jobs, one decode call, one render call."""
        results: dict[int, Any] = {}
        with torch.inference_mode():
            encoding = [j for j in jobs if j.kind in ("encode", "render")]
            to_decode: list[tuple[_Job, Codes]] = [(j, Codes(*(self._to_model(t) for t in j.payload))) for j in jobs if j.kind == "decode"]
            to_render: list[tuple[list[_Job], Edit]] = []
            to_score: list[tuple[_Job, list[Codes]]] = []
            if encoding:
                planned: dict[tuple, list[tuple[_Job, list[Codes]]]] = {}
                for job, codes in zip(encoding, self._timed("encode", encoding, self._encode)):
                    if job.kind == "encode":
                        results[id(job)] = Codes.cat([Codes(*(t.float().cpu() for t in c)) for c in codes])
                        continue
                    planned.setdefault((type(job.payload[1]), job.payload[2]), []).append((job, codes))
                for group in planned.values():
                    to_render.extend(self._plan(group, results))
                # a job whose plan failed is answered with its error, not scored
                to_score = [(job, codes) for group in planned.values() for job, codes in group
                            if job.payload[3] and not isinstance(results[id(job)], BaseException)]
            errors = dict(zip((id(j) for j, _ in to_score), self._timed("score", to_score, self._score))) if to_score else {}
            if to_decode:
                for (job, _), image in zip(to_decode, self._timed("decode", to_decode, self._decode)):
                    results[id(job)] = image
            if to_render:
                rendering = [job for group, _ in to_render for job in group]
                for job, (image, mask) in zip(rendering, self._timed("render", to_render, self._render)):
                    results[id(job)] = Rendered(image, mask, results[id(job)], errors.get(id(job)))
            for job in jobs:
                if job.kind == "call":
                    try:
                        results[id(job)] = job.payload(self.model)
                    except Exception as e:  # e.g. a ValueError of the core: that request's problem only
                        results[id(job)] = e
        return [results[id(j)] for j in jobs]

    def _plan(self, group: list[tuple[_Job, list[Codes]]], results: dict[int, Any]) -> list[tuple[list[_Job], Edit]]:
        """The Edits of render jobs whose plans share a type and parts: planned together; if that fails, each job
        alone, so a plan that raises fails its own request only. Each job's extra goes into `results`."""
        plans = [job.payload[1] for job, _ in group]
        try:
            edit, extras = type(plans[0]).many(self.model, plans, [codes for _, codes in group])
        except Exception as e:  # that request's problem, or one of the group's: find which
            if len(group) == 1:
                results[id(group[0][0])] = e
                return []
            return [planned for one in group for planned in self._plan([one], results)]
        for (job, _), extra in zip(group, extras):
            results[id(job)] = extra
        return [([job for job, _ in group], edit)]

    def _timed(self, kind: str, group: list, fn: Callable[[list], list]) -> list:
        start = time.perf_counter()
        out = fn(group)
        if self.metrics:
            rows = sum(len(o) if isinstance(o, list) else len(o[0]) if isinstance(o, tuple) else len(o) for o in out)
            self.metrics.batch_size.labels(self.name, kind).observe(rows)
            self.metrics.batch_seconds.labels(self.name, kind).observe(time.perf_counter() - start)
        return out

    def _to_model(self, t: torch.Tensor) -> torch.Tensor:
        """CPU tensor -> the model's device and dtype; to CUDA through pinned memory, so the copy is asynchronous."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(self.device, self.dtype, non_blocking=True)

    @staticmethod
    def _slices(sizes: list[int]) -> list[slice]:
        out, start = [], 0
        for n in sizes:
            out.append(slice(start, start + n))
            start += n
        return out

    def _encode(self, group: list[_Job]) -> list[list[Codes]]:
        """The Codes of each image of each job (one row each, on the model's device; None where the job's parts
        did not ask for a code), from one call per encoder on the images that need its code."""
        images = [j.payload[0] if j.kind == "render" else j.payload for j in group]
        wants = [p for j, i in zip(group, images) for p in (j.payload[2] if j.kind == "render" else (ALL,) * len(i))]
        x = self._to_model(torch.cat(images) if len(images) > 1 else images[0])
        rows: list[list[torch.Tensor | None]] = [[None] * len(PARTS) for _ in wants]
        for k, name in enumerate(PARTS):
            need = [i for i, w in enumerate(wants) if name in w]
            if not need:
                continue
            every = len(need) == len(wants)
            code = self.model.encode(x if every else x[torch.tensor(need, device=x.device)], (name,))[k]
            for i, t in zip(need, code.split(1)):
                rows[i][k] = t
        per_row = [Codes(*r) for r in rows]
        return [per_row[s] for s in self._slices([len(i) for i in images])]

    def _decode(self, group: list[tuple[_Job, Codes]]) -> list[torch.Tensor]:
        """CPU float32 images of each entry's codes, from one decode call."""
        parts = [codes for _, codes in group]
        codes = Codes.cat(parts)
        images = self.model.decode(*codes).float().cpu()
        return [images[s] for s in self._slices([len(c.common) for c in parts])]

    def _score(self, group: list[tuple[_Job, list[Codes]]]) -> list[torch.Tensor]:
        """(N,) CPU float32 reconstruction errors of each job's images, from one decode call."""
        x = self._to_model(torch.cat([job.payload[0] for job, _ in group]))
        codes = Codes.cat([c for _, rows in group for c in rows])
        errors = reconstruction_error(self.model, x, codes)
        return list(errors.split([len(rows) for _, rows in group]))

    def _render(self, group: list[tuple[list[_Job], Edit]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(CPU float32 images, CPU masks or None) of each job of each entry's Edit, from one render call."""
        jobs = [job for entry, _ in group for job in entry]
        sizes = [job.payload[1].rows for job in jobs]
        x = torch.cat([job.payload[0][:n] for job, n in zip(jobs, sizes)])
        images, masks = self.model.render(self._to_model(x), Edit.cat([edit for _, edit in group]))
        images = images.float().cpu()
        masks = masks.float().cpu() if masks is not None else None
        return [(images[s], masks[s] if masks is not None else None) for s in self._slices(sizes)]
