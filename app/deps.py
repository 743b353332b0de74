"""What routes receive through `Annotated[..., Depends(...)]`: settings, the model registry, the latent store,
the multipart forms, the Accept header and the API-key check. All are `async def`: FastAPI would run plain
functions in its thread pool, a thread hop per dependency per request."""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form, Header, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .errors import BadRequest, NotReady, Unauthorized
from .imaging import Format, PathFormat, negotiate
from .metrics import Metrics
from .registry import Registry
from .schemas import EncodeForm, FacesForm, RemoveForm, SegmentForm, TransferForm
from .settings import Settings
from .store import LatentStore


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_registry(request: Request) -> Registry:
    registry: Registry | None = request.app.state.registry
    if registry is None or not registry.ready:
        raise NotReady("models are still loading", retry_after=2)
    return registry


async def get_store(request: Request) -> LatentStore:
    store = request.app.state.store
    if store is None:
        raise NotReady("the latent store is not open yet", retry_after=2)
    return store


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
StoreDep = Annotated[LatentStore, Depends(get_store)]

# The multipart bodies, one pydantic model each (one schema per endpoint in OpenAPI; unknown fields are a 422).
MULTIPART = "multipart/form-data"
TransferBody = Annotated[TransferForm, Form(media_type=MULTIPART)]
RemoveBody = Annotated[RemoveForm, Form(media_type=MULTIPART)]
EncodeBody = Annotated[EncodeForm, Form(media_type=MULTIPART)]
SegmentBody = Annotated[SegmentForm, Form(media_type=MULTIPART)]
FacesBody = Annotated[FacesForm, Form(media_type=MULTIPART)]

AcceptHeader = Annotated[str | None, Header(alias="accept", description="image/png, image/jpeg, image/webp or application/json when no format= is given")]

# --- API keys -----------------------------------------------------------------------------------------------------

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of DID_API_KEYS")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <one of DID_API_KEYS>")


async def require_api_key(
    settings: SettingsDep,
    api_key: Annotated[str | None, Security(_api_key)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> None:
    """No-op unless DID_API_KEYS is set; then X-API-Key or a Bearer token must equal one of the keys."""
    if not settings.api_keys:
        return
    given = api_key or (bearer.credentials if bearer else None)
    if not given:
        raise Unauthorized("this service needs an API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    token = given.encode()
    match = False
    for key in settings.api_keys:  # compare with every key, each in constant time
        match |= hmac.compare_digest(token, key.encode())
    if not match:
        raise Unauthorized("the API key is not valid")


# --- the answer's format and size -----------------------------------------------------------------------------------

STILL: tuple[str, ...] = ("png", "jpeg", "webp", "json")
PATH: tuple[str, ...] = ("png", "jpeg", "gif", "webp", "json")


@dataclass(frozen=True)
class Output:
    format: str
    size: int | None
    png_level: int = 3  # zlib effort of PNG answers (DID_PNG_LEVEL)


def output(settings: Settings, fmt: str | None, accept: str | None, size: int | None, allowed: tuple[str, ...] = STILL) -> Output:
    """The answer's format (format= first, then Accept, then png) and size (bounded by DID_MAX_OUTPUT_SIZE)."""
    if size is not None and size > settings.max_output_size:
        raise BadRequest(f"size {size} is larger than the limit of {settings.max_output_size}")
    return Output(negotiate(fmt, accept, allowed), size, settings.png_level)


SizeQuery = Annotated[int | None, Query(ge=16, description="answer at this many pixels per side (default: the model's resolution)")]


async def output_from_query(settings: SettingsDep, accept: AcceptHeader = None, size: SizeQuery = None,
                            format: Annotated[Format | None, Query(description="png (default), jpeg, webp or json; else the Accept header decides")] = None) -> Output:
    return output(settings, format, accept, size)


async def output_for_path(settings: SettingsDep, accept: AcceptHeader = None, size: SizeQuery = None,
                          format: Annotated[PathFormat | None, Query(description="png strip (default), jpeg strip, json (base64 strip), gif or webp animation")] = None) -> Output:
    return output(settings, format, accept, size, PATH)


QueryOutput = Annotated[Output, Depends(output_from_query)]
PathOutput = Annotated[Output, Depends(output_for_path)]
