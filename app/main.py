"""The FastAPI application: `create_app(settings)` wires settings, models, latent store, routers, errors, docs, metrics.

`uvicorn app.main:create_app --factory` serves it with settings from DID_* variables; `did serve` does the same
after checking every checkpoint first.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator

import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import docs, errors, web
from .deps import require_api_key
from .limits import LimitsMiddleware
from .metrics import Metrics, MetricsMiddleware
from .registry import Registry
from .routes import edit, faces, latents, meta
from .settings import Settings
from .store import open_store

log = logging.getLogger("did.app")

DESCRIPTION = """Domain intersection and domain difference (Benaim et al., ICCV 2019) as a service.

Every image splits into three codes: **common** (what both domains share), **sep_a** and **sep_b** (what only
domain a or b has). Edits recombine codes and decode them. Uploads are multipart; images are answered as PNG unless
`format=` or the Accept header asks for JPEG, WebP or JSON. Errors are RFC 9457 problem details.
"""


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """The app; `registry` may be loaded already (did serve loads it first to report bad checkpoints cleanly)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Image decoding and encoding (app/imaging.py) run in the loop's default executor: one thread per core, as
        # Pillow is CPU-bound and more threads only switch more.
        images = ThreadPoolExecutor(settings.image_threads or os.cpu_count() or 1, thread_name_prefix="did-image")
        asyncio.get_running_loop().set_default_executor(images)
        reg = registry or await anyio.to_thread.run_sync(Registry.load, settings)
        store = open_store(settings.redis_url, settings.latent_ttl_s, settings.latent_cache_size)
        reg.start(settings, metrics)
        try:
            await reg.warmup(settings.max_batch)
            gc.collect()
            gc.freeze()  # models, routes and settings live as long as the process: keep them out of every collection
            app.state.registry, app.state.store = reg, store
            metrics.ready.set(1)
            log.info("ready: %s on %s (default %s), latent store %s", ", ".join(reg.entries), reg.device, reg.default,
                     "redis" if settings.redis_url else "in-process")
            yield
        finally:
            metrics.ready.set(0)
            await reg.stop()
            await store.close()
            images.shutdown(wait=False)

    app = FastAPI(
        title="did: domain intersection and domain difference",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # docs.install serves /docs and /redoc with their assets, not the CDN's
        redoc_url=None,
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.state.registry = app.state.store = None
    errors.install(app)
    docs.install(app)
    web.install(app, settings.examples)
    # The key check is a dependency only when keys are configured (then OpenAPI lists the two schemes, too).
    auth = [Depends(require_api_key)] if settings.api_keys else []
    for router in (edit.router, latents.router, faces.router, meta.cards):
        app.include_router(router, dependencies=auth)
    app.include_router(meta.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"],
            expose_headers=["X-Model", "X-Detected-Domain", "X-Target-Domain", "X-Removed", "X-Attribute", "X-Mask-Area",
                            "Retry-After"],
        )
    app.add_middleware(LimitsMiddleware, max_bytes=settings.max_request_bytes, timeout_s=settings.request_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
