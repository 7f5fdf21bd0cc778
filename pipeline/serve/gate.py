"""The front door of every route: API key, body type and body size, checked before any route runs.

An ASGI middleware, so that it covers every route the app has, FastAPI's own documentation
routes (``/docs``, ``/redoc``, ``/openapi.json``) and routes added later included, rather
than a check each route must remember to call. Only :data:`OPEN_PATHS` (``/healthz``, which
probes call without a key) pass without one.

Bodies: only ``application/json`` (UTF-8; the only charset JSON has) is read. Anything
else is 415 before a route runs, because a web page can POST ``text/plain`` (or a form)
to a server on the user's machine without the browser asking first (no CORS preflight);
``application/json`` needs that preflight, and the front answers no CORS headers, so the
browser never sends it. (OpenAI's multipart routes, image edits and variations, do not
exist here.) A body longer than ``serve.max_body_bytes`` is 413: by its ``Content-Length``
before any of it is read, or, sent in chunks without one, as soon as it passes the limit
(a replica never holds more of it than the limit and one chunk).
"""

from __future__ import annotations

from typing import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.serve.auth import KeyCheck
from pipeline.serve.http_api import error

OPEN_PATHS = frozenset({"/healthz"})
# Methods whose requests carry no body the front reads.
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class BodyTooLarge(Exception):
    """Raised from a route's read of a body that passed the limit (caught by :class:`Gate`)."""


class Gate:
    """ASGI middleware: 401 without a valid key (every path but :data:`OPEN_PATHS`, when
    keys are set), 415 for a body that is not JSON, 413 for one longer than
    ``max_body()`` bytes. The key's identity (its digest) is left in
    ``scope["state"]["api_key"]`` for per-key limits; None without keys.

    ``keys`` and ``max_body`` are called per request: the replica that holds them is made
    after the app (Serve builds the app first)."""

    def __init__(self, app: ASGIApp, keys: Callable[[], KeyCheck], max_body: Callable[[], int]):
        self.app = app
        self.keys = keys
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = None
        if route_path(scope) not in OPEN_PATHS:
            check = self.keys()
            key = check.identify(headers.get("authorization"))
            if check.required and key is None:
                await unauthorized()(scope, receive, send)
                return
        if scope["method"] not in _BODYLESS and not is_json(headers.get("content-type")):
            await error(
                415,
                "invalid_request_error",
                [(None, "the body must be JSON, sent with the header 'Content-Type: application/json'")],
                code="unsupported_media_type",
            )(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        limit = self.max_body()
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await too_large(limit)(scope, receive, send)
            return
        received, started = 0, False

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded, watched)
        except BodyTooLarge:
            if started:
                raise
            await too_large(limit)(scope, receive, send)


def too_large(limit: int):
    return error(
        413,
        "invalid_request_error",
        [(None, f"the request body is longer than serve.max_body_bytes ({limit} bytes); send a shorter prompt")],
        code="request_too_large",
    )


def unauthorized():
    # Never echo what was sent: it may be a key of something else.
    return error(
        401,
        "invalid_request_error",
        [(None, "a valid API key is needed: send the header 'Authorization: Bearer KEY' (OpenAI clients: api_key=KEY)")],
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def is_json(content_type: str | None) -> bool:
    """``application/json``, with no parameter but ``charset=utf-8``."""
    if not content_type:
        return False
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    return media == "application/json" and all(p.replace(" ", "") in ("charset=utf-8", "charset=\"utf-8\"", "") for p in params)


def route_path(scope: Scope) -> str:
    """The path as the app's routes see it: without the app's ``route_prefix`` (``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path
