"""serve_app/serve_errors.py: Serve's own plain-text error answers get the API's JSON error body, status and headers
kept; everything else passes untouched. A small ASGI app stands in for Serve's server here; the e2e overload test
(tests/test_serve.py) sees it around Serve's real proxy."""

import asyncio
import os
import subprocess
import sys

import httpx
from starlette.types import Receive, Scope, Send

from serve_app.local import BASE_ENV, SERVE_ERRORS_ENV
from serve_app.serve_errors import JsonServeErrors


def answering(status: int, body: list[bytes], content_type: bytes, extra=()):
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", content_type), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(body):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(body) - 1})

    return app


def get(app) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=JsonServeErrors(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/classify", json={"text": "x"})

    return asyncio.run(go())


def test_serves_backpressure_answer_becomes_the_apis_json_with_its_headers():
    # Ray 2.60's direct-ingress refusal: text, 503, Retry-After
    plain = answering(503, [b"Request dropped ", b"due to backpressure"], b"text/plain", [(b"retry-after", b"1")])
    r = get(plain)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/json" and int(r.headers["content-length"]) == len(r.content)
    err = r.json()["error"]
    assert err["message"] == "Request dropped due to backpressure" and err["code"] == 503
    assert err["type"] == "ServiceUnavailableError"


def test_an_empty_error_gets_the_status_phrase():
    r = get(answering(408, [b""], b"text/plain"))
    assert r.status_code == 408 and r.json()["error"]["message"] == "Request Timeout"


def test_json_errors_and_answers_pass_untouched():
    body = b'{"error":{"message":"server busy","code":503}}'
    r = get(answering(503, [body], b"application/json", [(b"retry-after", b"2")]))
    assert r.content == body and r.headers["retry-after"] == "2"
    r = get(answering(200, [b"plain ", b"ok"], b"text/plain"))
    assert r.status_code == 200 and r.text == "plain ok"


def test_serve_builds_its_servers_middlewares_from_the_serving_environment():
    """What Serve does as a proxy or a replica starts its HTTP server, under SERVE_ERRORS_ENV: the JSON middleware, and
    the replica's door outside it (in a subprocess: importing ray.serve here would fix its settings for the serve
    tests)."""
    code = (
        "from ray.serve._private.http_util import configure_http_middlewares; from ray.serve.config import "
        "HTTPOptions; print([m.cls.__name__ for m in configure_http_middlewares(HTTPOptions()).middlewares])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **SERVE_ERRORS_ENV}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['JsonServeErrors', 'AdmissionGate']"
    assert SERVE_ERRORS_ENV.items() <= BASE_ENV.items()
