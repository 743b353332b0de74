"""What the service is and how it is doing: model cards, liveness, readiness, Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, RegistryDep
from ..errors import PROBLEM_RESPONSES, NotReady
from ..schemas import CodeSizes, Domains, Health, ModelInfo, ModelsResponse, Readiness

router = APIRouter(tags=["service"])  # always open: health, readiness, metrics
cards = APIRouter(tags=["service"])  # behind the API keys like the model routes


@cards.get("/models", response_model=ModelsResponse, responses=PROBLEM_RESPONSES, summary="The loaded checkpoints and their model cards")
async def list_models(registry: RegistryDep) -> ModelsResponse:
    infos = []
    for e in registry.entries.values():
        cfg = e.config
        infos.append(ModelInfo(
            name=e.name, image_size=cfg.image_size, domains=Domains(a=cfg.domain_a, b=cfg.domain_b), variant=cfg.variant,
            code_sizes=CodeSizes(common=cfg.common_size, sep_a=cfg.sep_size, sep_b=cfg.sep_size),
            default=e.name == registry.default, card=e.card,
        ))
    return ModelsResponse(default=registry.default, models=infos)


@router.get("/healthz", response_model=Health, summary="Liveness: 200 while the process serves HTTP")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: PROBLEM_RESPONSES[503]},
            summary="Readiness: 200 once every model is loaded and warmed up, 503 before and while shutting down")
async def readyz(request: Request) -> Readiness:
    registry = request.app.state.registry
    if registry is None or not registry.ready:
        raise NotReady("models are still loading", retry_after=2)
    stalled = [e.name for e in registry.entries.values() if e.batcher is None or not e.batcher.running]
    if stalled:
        raise NotReady(f"the batcher of {', '.join(stalled)} is not running")
    return Readiness(status="ready", models=list(registry.entries), device=str(registry.device))


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format"}})
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)


