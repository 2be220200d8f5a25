"""Errors of the classify core, each with the HTTP status the API answers it with."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any


def error_type(status: int) -> str:
    """The status as vLLM and OpenAI clients name it: NotFoundError, UnprocessableEntityError, ..."""
    try:
        name = HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"
    return name if name.endswith("Error") else name + "Error"


def encode_json(content: Any) -> bytes:
    """An answer's JSON as ASCII bytes: a name echoed from a request may hold a lone surrogate, which UTF-8 cannot
    encode."""
    return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(status: int, message: str, param: Any = None, detail: Any = None) -> dict[str, Any]:
    """OpenAI's error shape, {"error": {"message", "type", "param", "code", "detail"?}}: every error the API answers,
    and the overload refusals HAProxy answers for it (serve_app/haproxy_shed.py)."""
    error = {"message": message, "type": error_type(status), "param": param, "code": status}
    if detail is not None:
        error["detail"] = detail
    return {"error": error}


class ServingError(Exception):
    status = 500

    def __init__(self, message: str, detail: Any = None):
        super().__init__(message)
        self.message, self.detail = message, detail


class InvalidRequest(ServingError):
    status = 422


class UnknownClassifier(ServingError):
    status = 404


class TooLarge(ServingError):
    status = 413


class EngineUnavailable(ServingError):
    status = 503  # answered with Retry-After


class Overloaded(ServingError):
    status = 429  # with Retry-After; not 503, which HAProxy counts against a replica (serve_app/haproxy_shed.py)
