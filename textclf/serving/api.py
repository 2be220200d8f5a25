"""The HTTP API's request and response models (the OpenAPI schema at /docs is generated from them), and the
reading of a request body into one: cheap refusals (bad JSON, too many texts) come before pydantic validates."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr, ValidationError, field_validator

from .errors import InvalidRequest, TooLarge

# Characters nobody can read: whitespace, controls, zero-width and other format characters, separators, and the
# fillers and variation selectors that render as nothing.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_INVISIBLE = (
    frozenset("\u115f\u1160\u3164\uffa0\u2800")
    | frozenset(map(chr, range(0xFE00, 0xFE10)))
    | frozenset(map(chr, range(0xE0100, 0xE01F0)))
)
_SURROGATE = re.compile("[\ud800-\udfff]")
M = TypeVar("M", bound=BaseModel)


def is_blank(text: str) -> bool:
    """Nothing to classify: empty, or only invisible characters (stops at the first visible one)."""
    return all(c.isspace() or c in _INVISIBLE or unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in text)


def text_problem(text: str) -> Optional[str]:
    if _SURROGATE.search(text):
        return "a lone UTF-16 surrogate, not valid Unicode"
    if is_blank(text):
        return "empty, blank or only invisible characters"
    return None


def check_texts(texts: list[str], field: str) -> None:
    """Refuse unreadable texts, naming the indices (the first 10) of each kind of problem under `field`."""
    problems: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        problem = text_problem(t)
        if problem:
            problems.setdefault(problem, []).append(i)
    if problems:
        raise ValueError("; ".join(f"{field} {idx[:10]}: {p}" for p, idx in problems.items()))


Threshold = Optional[StrictFloat]  # strict: "0.5" or true are refused, not converted


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr = Field(..., description="The text to classify; must not be blank or only invisible characters.")
    model: Optional[StrictStr] = Field(
        None, max_length=64, description=("Classifier name (GET /labels lists them); default: the server's default.")
    )
    abstain_threshold: Threshold = Field(
        None,
        ge=0,
        le=1,
        description=("Overrides the server's and the classifier's abstain threshold (0: answer every text)."),
    )

    @field_validator("text")
    @classmethod
    def _readable(cls, v: str) -> str:
        problem = text_problem(v)
        if problem:
            raise ValueError(f"text: {problem}")
        return v


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(..., min_length=1, description="Texts to classify (at most the server's max_batch).")
    model: Optional[StrictStr] = Field(None, max_length=64)
    abstain_threshold: Threshold = Field(None, ge=0, le=1)

    @field_validator("texts")
    @classmethod
    def _readable(cls, v: list[str]) -> list[str]:
        check_texts(v, "texts")
        return v


class Prediction(BaseModel):
    label: Optional[str] = Field(
        ..., description=("One of the classifier's labels; null when below the abstain threshold.")
    )
    confidence: float = Field(..., description="Probability of the predicted label.")
    scores: dict[str, float] = Field(..., description="Top-k labels and their probabilities.")
    model: str
    latency_ms: float
    truncated: bool = Field(False, description="The text was cut by tokens to the model's prompt length.")
    needs_review: bool = False


class ErrorInfo(BaseModel):
    message: str
    type: str = Field(..., description="The status as a name, e.g. NotFoundError (vLLM's and OpenAI's error shape).")
    param: Optional[str] = Field(None, description="The request field at fault, when one is.")
    code: int = Field(..., description="The HTTP status code.")
    detail: Any = Field(None, description="More about the error, e.g. the valid classifier names or the fields.")


class ErrorBody(BaseModel):
    error: ErrorInfo


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Where and why, not the input: a rejected input can be a megabyte of text."""
    return [{"loc": ["body", *e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]


def read_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise InvalidRequest("request body is not usable JSON: nested too deeply") from exc
    except ValueError as exc:  # not JSON, not UTF-8, a number too long
        raise InvalidRequest("request body is not valid JSON", {"reason": str(exc)[:200]}) from exc


def count_texts(data: Any, max_batch: int) -> None:
    """A batch over max_batch is refused by its length, before each text is validated."""
    for key in ("texts", "input"):
        texts = data.get(key) if isinstance(data, dict) else None
        if isinstance(texts, list) and len(texts) > max_batch:
            raise TooLarge(f"batch of {len(texts)} texts is over the limit of {max_batch}")


def validate(data: Any, model: type[M]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest("invalid request", validation_errors(exc)) from exc


def parse_request(body: bytes, model: type[M], max_batch: int) -> M:
    """A request body as `model`, every refusal a ServingError (422, or 413 for too many texts)."""
    data = read_json(body)
    count_texts(data, max_batch)
    return validate(data, model)
