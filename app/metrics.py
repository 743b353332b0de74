"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process).

With several uvicorn workers each process counts its own requests; scrape them one by one or run one worker per
container (the usual layout behind a load balancer).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
        self.active = 0  # HTTP requests in flight, read by the batchers (a plain int: no lock, one event loop)

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.active -= 1
            self.metrics.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
