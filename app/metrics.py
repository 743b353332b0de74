"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process).

With several uvicorn workers each process counts its own requests; scrape them one by one or run one worker per
container (the usual layout behind a load balancer).

`did_stage_duration_seconds` splits a request's time by where it goes: `decode` (uploads to tensors or images),
`queue` (a model job waiting for its batch), `model` (the batch's model call), `encode` (the answer's image),
`faces` (the face detection of /faces). Jobs dropped before their model call (the request's deadline passed, or its
client went away) count in `did_jobs_dropped_total`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("did_requests_total", "HTTP requests answered", ["method", "route", "status"], registry=r)
        self.latency = Histogram("did_request_duration_seconds", "HTTP request latency", ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("did_requests_in_flight", "HTTP requests being served", registry=r)
        self.batch_size = Histogram("did_batch_size", "images per model call", ["model", "kind"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("did_batch_duration_seconds", "time of one model call", ["model", "kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("did_queue_depth", "model jobs waiting in the batcher's queue", ["model"], registry=r)
        self.rejected = Counter("did_queue_rejected_total", "model jobs refused because the queue was full (503)", ["model"], registry=r)
        self.ready = Gauge("did_ready", "1 when every model is loaded and warmed up", registry=r)
        self.models = Gauge("did_models_loaded", "checkpoints loaded", registry=r)
        self.stages = Histogram("did_stage_duration_seconds", "time of one request in each stage", ["stage"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.dropped = Counter("did_jobs_dropped_total", "model jobs dropped before their model call", ["model", "reason"],
                               registry=r)
        self.active = 0  # HTTP requests in flight, read by the batchers (a plain int: no lock, one event loop)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_current: ContextVar[Metrics | None] = ContextVar("did_metrics", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the enclosed work as stage `name` of the current request (no-op outside a request)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        m = _current.get()
        if m is not None:
            m.stages.labels(name).observe(time.perf_counter() - start)


def route_label(scope: Scope) -> str:
    """The template of the route that answered: `/latents/{id}` for a route, `/docs/assets/{path}` for a mount
    (static files), `unmatched` when none did (a 404).

    FastAPI's router names only its own routes (APIRoute) in scope["route"]; for any other route or mount the
    label is found from the endpoint it ran, among the app's routes."""
    route = scope.get("route")
    if isinstance(route, Mount):
        return route.path_format
    if route is not None and getattr(route, "path", None):
        return route.path
    endpoint, router = scope.get("endpoint"), scope.get("router")
    if endpoint is None or router is None:
        return "unmatched"
    return _find(router.routes, endpoint) or "unmatched"


def _find(routes: list[BaseRoute], endpoint: object, prefix: str = "") -> str | None:
    for route in routes:
        if isinstance(route, Mount):
            if route.app is endpoint:
                return prefix + route.path_format
            if found := _find(route.routes, endpoint, prefix + route.path):
                return found
        elif getattr(route, "endpoint", None) is endpoint:
            return prefix + route.path
    return None


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not its raw path, to bound label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        self.metrics.active += 1
        token = _current.set(self.metrics)
        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            self.metrics.active -= 1
            self.metrics.in_flight.dec()
            path = route_label(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
