"""What bounds one request: the cap on its whole body, enforced before any parsing (a declared Content-Length above
it is answered 413 at once; a body without one is counted while it streams in and stopped at the cap), its deadline
(`DID_REQUEST_TIMEOUT_S` from its arrival), and its client staying connected. The batcher reads the last two through
`current()`, so a job whose request has run out of time or lost its client is dropped before its model call."""
from __future__ import annotations

import asyncio
import math
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import problem_response


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's form parser passes it on to the problem handler instead of calling it a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


@dataclass
class RequestLimits:
    """The deadline (event-loop time; inf: none) of the request being served and a way to wait for its client to go."""

    deadline: float = math.inf
    _receive: Receive | None = None
    _body_done: bool = False

    async def disconnected(self) -> None:
        """Return once the client has closed the connection. Only after the body has been read (until then the
        messages are the body's); before that, this waits forever."""
        if self._receive is None or not self._body_done:
            await asyncio.Event().wait()
        while (await self._receive())["type"] != "http.disconnect":
            pass


_current: ContextVar[RequestLimits | None] = ContextVar("did_request_limits", default=None)


def current() -> RequestLimits | None:
    """The limits of the request this task serves (None outside a request, e.g. the warm-up)."""
    return _current.get()


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 0.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            detail = f"the request body ({int(declared)} bytes) is larger than the limit of {self.max_bytes} bytes"
            await problem_response(413, detail, slug="too-large", headers={"Connection": "close"})(scope, receive, send)
            return
        limits = RequestLimits(asyncio.get_running_loop().time() + self.timeout_s if self.timeout_s else math.inf, receive)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                limits._body_done = not message.get("more_body", False)
            return message

        token = _current.set(limits)
        try:
            await self.app(scope, counted, send)
        finally:
            _current.reset(token)
