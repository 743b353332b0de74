"""Every error answer of the service: typed exceptions, rendered as RFC 9457 problem details in one place.

Routes and helpers raise a `Problem` subclass; `install` maps those, FastAPI's validation errors and Starlette's
HTTP exceptions (404/405 of the router, 413 of the body limit) to `application/problem+json`. Anything else is a
bug of ours: it is logged with its traceback and answered as a 500 problem without details.
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("did.app")

PROBLEM_TYPE = "https://did.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class ProblemBody(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str | None = None


class Problem(Exception):
    """An error answer; subclasses fix the status and the problem type."""

    status: int = 500
    slug: str | None = None  # None: type is about:blank

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, title: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.title = title or HTTPStatus(self.status).phrase


class BadRequest(Problem):
    status, slug = 400, "bad-request"


class Unauthorized(Problem):
    status, slug = 401, "unauthorized"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="did"'})


class NotFound(Problem):
    status, slug = 404, "not-found"


class UnknownModel(NotFound):
    slug = "unknown-model"


class UnknownLatent(NotFound):
    slug = "unknown-latent"


class TooLarge(Problem):
    status, slug = 413, "too-large"


class UnsupportedImage(Problem):
    status, slug = 415, "unsupported-image"


class Unavailable(Problem):
    status, slug = 503, "unavailable"

    def __init__(self, detail: str, *, retry_after: int = 1):
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class Overloaded(Unavailable):
    slug = "overloaded"


class NotReady(Unavailable):
    slug = "not-ready"


class NoFace(Problem):
    """An edit that works on a detected face (a model trained on aligned faces) found none, or not the one asked for."""

    status, slug = 422, "no-face"


class OutOfDomain(Problem):
    """strict=true and an upload lies outside what the model was trained on (its card's calibration)."""

    status, slug = 422, "out-of-domain"


class DeadlineExceeded(Problem):
    status, slug = 504, "timeout"


class ClientGone(Problem):
    """The client closed the connection before its answer was ready; nobody reads this answer, but the access log
    and the request metrics record it under 499 (nginx's "client closed request")."""

    status, slug = 499, "client-closed-request"

    def __init__(self, detail: str):
        super().__init__(detail, title="Client Closed Request")


def problem_response(status: int, detail: str | None, *, slug: str | None = None, title: str | None = None,
                     headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> JSONResponse:
    body = {
        "type": PROBLEM_TYPE + slug if slug else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **(extra or {}),
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


# OpenAPI: the problem answers every route may give, for `responses=` of routers.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemBody, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": HTTPStatus(status).phrase}
    for status in (400, 401, 404, 413, 415, 422, 503, 504)
}


async def _problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.detail, slug=exc.slug, title=exc.title, headers=exc.headers)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{'.'.join(e['loc'][1:] or e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
    return problem_response(422, detail, slug="validation", extra={"errors": errors})


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem_response(exc.status_code, detail, headers=getattr(exc, "headers", None))


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal error; it has been logged")


def install(app: FastAPI) -> None:
    """Register the one set of error handlers."""
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _bug)
