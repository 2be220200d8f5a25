"""Serve's own error answers in the API's JSON error body.

Ray Serve answers some requests itself, before the app sees them, in plain text: "Request dropped due to
backpressure" (503 with Retry-After, a replica's `max_queued_requests` full: on a replica's own port, or in Serve's
proxy), a request past `http_options.request_timeout_s` (408), an unexpected failure (500). A client then gets two
error shapes from one service. Serve runs the middlewares that `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names
around the HTTP servers it starts in its proxies and in replicas with direct ingress (ray.serve._private.http_util,
configure_http_middlewares); serve_app.local.SERVE_ERRORS_ENV names `middlewares` below, so those answers keep their
status and headers and get the API's body. Outside it `middlewares` puts the replica's door
(serve_app/replica_gate.py), which refuses an overload's classify requests before Serve's request path: the app's
own refusal, after that path, cost lost requests under an overload on a replica's port (bench/results/chaos-*-s14-*.md).

Light imports only: Serve calls this as each proxy and replica starts its server.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textclf.serving.errors import encode_json, error_body


class JsonServeErrors:
    """Pure ASGI: an error answer (status >= 400) that is not JSON gets the API's JSON error body, its text as the
    message; its status and other headers (Retry-After) stay. Anything else passes through untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict[str, Any] = {}
        body = bytearray()

        async def rewrite(msg: Message) -> None:
            if msg["type"] == "http.response.start" and msg["status"] >= 400:
                headers = dict(msg.get("headers") or [])
                if not headers.get(b"content-type", b"").startswith(b"application/json"):
                    start.update(msg)  # held until the whole text is in
                    return
            elif msg["type"] == "http.response.body" and start:
                body.extend(msg.get("body", b""))
                if msg.get("more_body"):
                    return
                return await send_json(start, bytes(body), send)
            await send(msg)

        await self.app(scope, receive, rewrite)


async def send_json(start: dict[str, Any], text: bytes, send: Send) -> None:
    status = start["status"]
    message = text.decode("utf-8", "replace").strip() or HTTPStatus(status).phrase
    dropped = (b"content-type", b"content-length", b"transfer-encoding")
    kept = [(k, v) for k, v in start.get("headers") or [] if k.lower() not in dropped]
    await answer_json(send, status, encode_json(error_body(status, message)), kept)


async def answer_json(send: Send, status: int, payload: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """A whole answer, `payload` being JSON, with `headers` besides its type and length."""
    headers = [*headers, (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def middlewares() -> list[Middleware]:
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH calls (serve_app.serve_errors:middlewares)."""
    from serve_app.replica_gate import AdmissionGate  # it writes its refusals with answer_json above

    return [Middleware(JsonServeErrors), Middleware(AdmissionGate)]  # the last is outermost: the gate refuses first
