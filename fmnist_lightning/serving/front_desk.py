"""What every request meets before LitServe's routes, in each HTTP server process: the API key, the body limit, the
content type of /predict, and the request metrics; and every error answered as JSON `{"error": "..."}`.

LitServe reads a body that is not a form as JSON, so a raw image body (`curl --data-binary @shoe.png -H
"Content-Type: image/png"`) is handed on as the one-file multipart form it reads (field `file`).
"""

import hmac
import secrets
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fmnist_lightning.serving.api import FILE_FIELD
from fmnist_lightning.serving.metrics import route_label, server_metrics

OPEN_PATHS = frozenset({"/health"})  # answered without the API key: load balancers and orchestrators probe it
KEY_HEADER = "X-API-Key"
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
HOW_TO_SEND = (
    "send the image as multipart field 'file' (curl -F file=@image.png) or as the raw body with an image content "
    "type (curl --data-binary @image.png -H 'Content-Type: image/png')"
)


class FrontDesk:
    """Pure ASGI middleware (LitServer's `middlewares`): refusals are answered here, before any body is parsed."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.answer(scope, receive, send_counted)
        finally:
            metrics, route = server_metrics(), route_label(scope["path"])
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        refusal = self.key_refusal(scope["path"], headers)
        if refusal is None and scope["path"] == "/predict" and scope["method"] == "POST":
            refusal = self.body_refusal(headers)
            if refusal is None:
                body = await read_body(receive, self.max_body_bytes)
                if body is None:
                    refusal = (413, self.too_large())
                else:
                    scope, body = as_form(scope, headers, body)
                    receive = replay(body, receive)
        if refusal is not None:
            await JSONResponse({"error": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def key_refusal(self, path: str, headers: Headers) -> tuple[int, str] | None:
        if self.api_key is None or path in OPEN_PATHS:
            return None
        given = headers.get(KEY_HEADER, "")
        if hmac.compare_digest(given.encode(), self.api_key.encode()):
            return None
        problem = "wrong API key" if given else "no API key"
        return 401, f"{problem}: send the server's key in the {KEY_HEADER} header (curl -H '{KEY_HEADER}: ...')"

    def body_refusal(self, headers: Headers) -> tuple[int, str] | None:
        """A wrong content type or a declared length over the limit, refused before the body is read."""
        content_type = headers.get("content-type", "").lower()
        if not (content_type.startswith("multipart/form-data") or content_type.startswith(RAW_IMAGE_TYPES)):
            shown = f"Content-Type {content_type}" if content_type else "no Content-Type"
            return 415, f"{shown} is not an image upload: {HOW_TO_SEND}"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self.too_large()
        return None

    def too_large(self) -> str:
        return f"request body over the server's limit of {self.max_body_bytes:,} bytes (fmnist serve --max_body_mb)"


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (the rest is not read)."""
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
        more = message.get("more_body", False)
    return b"".join(parts)


def as_form(scope: Scope, headers: Headers, body: bytes) -> tuple[Scope, bytes]:
    """A raw image body as a multipart form with the one field `file`; a form stays as it is."""
    content_type = headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        return scope, body
    boundary = secrets.token_hex(16)
    part_headers = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{FILE_FIELD}"; filename="body"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    )
    form = part_headers.encode("latin-1") + body + f"\r\n--{boundary}--\r\n".encode()
    kept = [(name, value) for name, value in scope["headers"] if name not in (b"content-type", b"content-length")]
    kept += [(b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
             (b"content-length", str(len(form)).encode())]  # fmt: skip
    return {**scope, "headers": kept}, form


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over the body already read, then waits on the client as the original would."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


ERROR_TEXT = {
    404: "no such route: POST /predict, GET /health, /info or /metrics",
    405: "method not allowed: POST /predict, GET /health, /info or /metrics",
}


def error_as_json(timeout: float) -> Any:
    """The app's handler of HTTP errors (LitServe's and FastAPI's own): `{"error": ...}` with the same status."""
    texts = ERROR_TEXT | {504: f"the request waited longer than the server's timeout of {timeout:g} s (--timeout)"}

    async def handler(request: Request, error: HTTPException) -> JSONResponse:
        text = texts.get(error.status_code, str(error.detail))
        return JSONResponse({"error": text}, status_code=error.status_code, headers=error.headers)

    return handler
