"""The HTTP API: a FastAPI app over a `textclf.serving.Classifiers`, with the request-edge middleware (body limit,
metrics) and the mapping of errors to JSON answers. Built per replica by the Serve deployment (serve_app/app.py),
and without Ray in the unit tests. Its metrics go to Ray's metrics system (serve_app/metrics.py), not to a route."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.metrics import AppMetrics
from textclf.serving import (
    BatchRequest,
    ClassificationResponse,
    Classifiers,
    ClassifyRequest,
    ErrorBody,
    ModelList,
    Prediction,
    ServingError,
    VllmClassifyRequest,
    classification_response,
    count_texts,
    error_body,
    parse_request,
    read_json,
    validate,
)
from textclf.serving.errors import encode_json

log = logging.getLogger("ray.serve")
ERRORS = {s: {"model": ErrorBody} for s in (404, 413, 422, 429, 503)}


def param_of(detail: Any) -> Optional[str]:
    """The request field a validation error names first (its loc after "body")."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = [str(part) for part in detail[0].get("loc", ())[1:]]
        return ".".join(loc) or None
    return None


class ErrorResponse(JSONResponse):
    """OpenAI's error shape, {"error": {"message", "type", "param", "code", "detail"?}}, as ASCII JSON: a name
    echoed from a request may hold a lone surrogate, which UTF-8 cannot encode."""

    def __init__(
        self,
        status: int,
        message: str,
        detail: Any = None,
        retry_after_s: Optional[int] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        headers = dict(headers or {})
        if retry_after_s is not None and status in (429, 503):
            headers["Retry-After"] = str(retry_after_s)
        body = error_body(status, message, param_of(detail), detail)
        super().__init__(body, status_code=status, headers=headers or None)

    @classmethod
    def of(cls, exc: ServingError, retry_after_s: int) -> "ErrorResponse":
        return cls(exc.status, exc.message, exc.detail, retry_after_s=retry_after_s)

    def render(self, content: Any) -> bytes:
        return encode_json(content)


def request_body(*models: type) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its body itself (parse_request): one model or any of several."""
    schemas = [m.model_json_schema() for m in models]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def is_vllm_request(data: Any) -> bool:
    """vLLM's classify request names its texts "input"; the project's own names its text "text"."""
    return isinstance(data, dict) and "input" in data and "text" not in data


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


CLASSIFY_PATHS = frozenset({"/classify", "/classify/batch"})
Admit = Callable[[], Optional[ErrorResponse]]  # None: admitted; else the refusal to answer


class HttpEdge:
    """Request counts and latency (AppMetrics); the overload refusal of a classify request while the replica is at
    its text limit (textclf/serving/admission.py), before its body is read or routed, so that a refusal costs
    little; and the body limit: bodies over max_body_bytes get 413, by Content-Length up front or while a chunked
    body is read. Plain ASGI on purpose: an `@app.middleware("http")`
    (Starlette's BaseHTTPMiddleware) runs each request through an extra task and stream, a cost that shows at
    hundreds of requests per second."""

    def __init__(
        self, app: ASGIApp, routes: Iterable[BaseRoute], max_body_bytes: int, metrics: AppMetrics, admit: Admit
    ):
        self.app, self.limit, self.metrics, self.admit = app, max_body_bytes, metrics, admit
        # built at the first request, when every route is registered; other paths count as "other"
        self.endpoints = frozenset(getattr(r, "path", "") for r in routes) - {""}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            if scope["path"] in CLASSIFY_PATHS and scope["method"] == "POST":
                refusal = self.admit()
                if refusal is not None:
                    return await refusal(scope, receive, send_status)
            limit = self.limit
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                resp = ErrorResponse(413, f"request body over the limit of {limit} bytes")
                return await resp(scope, receive, send_status)
            seen = 0

            async def limited() -> Message:
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > limit:
                        raise BodyTooLarge(limit)
                return msg

            return await self.app(scope, limited, send_status)
        finally:
            self.metrics.request(endpoint, status, time.perf_counter() - t0)


def add_error_handlers(api: FastAPI, retry_after_s: int) -> None:
    """Every error in OpenAI's JSON shape (ErrorResponse); 429 and 503 answers carry Retry-After."""

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # loc/msg/type only: the offending input can be a megabyte of text, not worth echoing
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return ErrorResponse(422, "invalid request", errors)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ErrorResponse(exc.status_code, str(exc.detail), retry_after_s=retry_after_s, headers=exc.headers)

    @api.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        return ErrorResponse.of(exc, retry_after_s)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("textclf: unexpected error on %s", request.url.path)
        return ErrorResponse(500, f"internal error: {type(exc).__name__}")


def create_api(classifiers: Classifiers, metrics: AppMetrics) -> FastAPI:
    """The app's routes over these classifiers, recording to these metrics."""
    cfg = classifiers.cfg
    started = int(time.time())
    api = FastAPI(
        title="textclf",
        version="0.1.0",
        description="Text classification with a fine-tuned LLM (vLLM engine): the answer is always one of the "
        "classifier's labels (or null below the abstain threshold), with its probability.",
    )

    def admit() -> Optional[ErrorResponse]:
        """None while the replica can take a text more; else the overload refusal the core would give."""
        try:
            classifiers.admit(1)
        except ServingError as exc:
            return ErrorResponse.of(exc, cfg.retry_after_s)
        return None

    api.add_middleware(HttpEdge, routes=api.routes, max_body_bytes=cfg.max_body_bytes, metrics=metrics, admit=admit)
    add_error_handlers(api, cfg.retry_after_s)

    @api.post(
        "/classify",
        response_model=Union[Prediction, ClassificationResponse],
        responses=ERRORS,
        openapi_extra=request_body(ClassifyRequest, VllmClassifyRequest),
        summary='Classify one text ({"text"}), or vLLM\'s request ({"input"}) with vLLM\'s answer',
    )
    async def classify(request: Request) -> dict[str, Any]:
        data = read_json(await request.body())
        count_texts(data, cfg.max_batch)
        if is_vllm_request(data):
            vreq = validate(data, VllmClassifyRequest)
            results = await classifiers.classify(vreq.texts, vreq.model, details=True)
            metrics.results(results)
            return classification_response(results[0]["model"], results)
        req = validate(data, ClassifyRequest)
        (r,) = await classifiers.classify([req.text], req.model, req.abstain_threshold)
        metrics.results([r])
        return r

    @api.post(
        "/classify/batch",
        response_model=list[Prediction],
        responses=ERRORS,
        openapi_extra=request_body(BatchRequest),
        summary="Classify several texts (at most max_batch) with one classifier",
    )
    async def classify_batch(request: Request) -> list[dict[str, Any]]:
        req = parse_request(await request.body(), BatchRequest, cfg.max_batch)
        results = await classifiers.classify(req.texts, req.model, req.abstain_threshold)
        metrics.results(results)
        return results

    @api.get("/health", summary="Liveness: the replica process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/ready",
        summary="Readiness: the engine is loaded and classifies a probe text",
        responses={503: {"model": ErrorBody}},
    )
    async def ready() -> JSONResponse:
        ok, reason = await classifiers.ready()
        headers = None if ok else {"Retry-After": str(cfg.retry_after_s)}
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503, headers=headers)

    @api.get("/v1/models", response_model=ModelList, summary="The classifiers, in OpenAI's model list shape")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": started,
                    "owned_by": "textclf",
                    "root": name,
                    "max_model_len": classifiers.plan.max_model_len,
                    "permission": [],
                }
                for name in classifiers.names
            ],
        }

    @api.get("/labels", summary="Each classifier's labels, and the default classifier")
    async def labels() -> dict[str, Any]:
        return {
            "default": classifiers.plan.default,
            "classifiers": classifiers.labels(),
            "abstain_threshold": cfg.abstain_threshold,
            "abstain_thresholds": classifiers.thresholds(),
            "max_batch": cfg.max_batch,
            "max_text_chars": cfg.max_text_chars,
        }

    return api
