"""Errors of the classify core, each with the HTTP status the API answers it with."""

from __future__ import annotations

from typing import Any


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
    status = 503  # answered with Retry-After
