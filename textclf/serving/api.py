"""The HTTP API's request and response models (the OpenAPI schema at /docs is generated from them)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr = Field(..., description="The text to classify; must not be blank.")
    model: Optional[StrictStr] = Field(None, max_length=64, description=(
        "Classifier name (GET /labels lists them); default: the server's default."))
    abstain_threshold: Optional[float] = Field(None, ge=0, le=1, description=(
        "Overrides the server's and the classifier's abstain threshold (0: answer every text)."))

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is empty or blank")
        return v


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(..., min_length=1, description="Texts to classify (at most the server's max_batch).")
    model: Optional[StrictStr] = Field(None, max_length=64)
    abstain_threshold: Optional[float] = Field(None, ge=0, le=1)

    @field_validator("texts")
    @classmethod
    def _not_blank(cls, v: list[str]) -> list[str]:
        blank = [i for i, t in enumerate(v) if not t.strip()]
        if blank:
            raise ValueError(f"texts {blank[:10]} are empty or blank")
        return v


class Prediction(BaseModel):
    label: Optional[str] = Field(..., description=(
        "One of the classifier's labels; null when below the abstain threshold."))
    confidence: float = Field(..., description="Probability of the predicted label.")
    scores: dict[str, float] = Field(..., description="Top-k labels and their probabilities.")
    model: str
    latency_ms: float
    truncated: bool = Field(False, description="The text was cut by tokens to the model's prompt length.")
    needs_review: bool = False


class ErrorBody(BaseModel):
    error: str
    detail: Any = None
