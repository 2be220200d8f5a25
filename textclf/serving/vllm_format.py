"""vLLM's (OpenAI-style) classification API, answered by the same classifiers: `POST /classify` with
`{"model", "input"}` (vLLM's ClassificationCompletionRequest) and `GET /v1/models`. Field names follow vLLM 0.32's
vllm/entrypoints/pooling/classify/protocol.py and vllm/entrypoints/serve/engine/protocol.py."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from .api import check_texts, text_problem


class VllmClassifyRequest(BaseModel):
    """vLLM's text input; token-id input, chat messages and the pooling options other than their defaults are not
    offered (refused)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[StrictStr] = Field(
        None, max_length=64, description=("Classifier name (GET /v1/models lists them); default: the server's default.")
    )
    input: Union[StrictStr, list[StrictStr]] = Field(
        ..., description=("One text or a list of texts (at most the server's max_batch).")
    )
    user: Optional[StrictStr] = Field(None, max_length=256, description="Accepted and ignored, as OpenAI's.")
    request_id: Optional[StrictStr] = Field(None, max_length=256, description="Accepted and ignored.")
    # vLLM's options, accepted at the values vLLM's own request model sends by default (a client that dumps the
    # whole model works); any other value asks for something this server does not do, and is refused.
    add_special_tokens: Literal[True] = Field(True, description="vLLM's default only: the prompt as trained.")
    use_activation: Optional[Literal[True]] = Field(None, description="null or true only: probs are softmaxed.")
    truncate_prompt_tokens: Optional[Literal[-1]] = Field(
        None, description="null or -1 only: long texts are always cut at the classifier's prompt length."
    )
    padding: None = Field(None, description="null only.")
    truncation_side: None = Field(None, description="null only.")
    priority: Literal[0] = Field(0, description="0 only.")
    mm_processor_kwargs: None = Field(None, description="null only.")
    cache_salt: None = Field(None, description="null only.")

    @field_validator("input")
    @classmethod
    def _readable(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(v, str):
            problem = text_problem(v)
            if problem:
                raise ValueError(f"input: {problem}")
            return v
        if not v:
            raise ValueError("input: an empty list")
        check_texts(v, "input")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassificationData(BaseModel):
    index: int
    label: Optional[str] = Field(..., description="The predicted label; null below the abstain threshold.")
    probs: list[float] = Field(..., description="Each label's probability, in the classifier's label order.")
    num_classes: int


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: Optional[int] = 0
    prompt_tokens_details: Optional[dict[str, Any]] = None


class ClassificationResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"classify-{uuid.uuid4().hex}")
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "textclf"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def classification_response(model: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Predictions of Classifiers.classify(..., details=True) in vLLM's response shape."""
    tokens = sum(r["prompt_tokens"] for r in results)
    data = [
        {"index": i, "label": r["label"], "probs": r["probs"], "num_classes": len(r["probs"])}
        for i, r in enumerate(results)
    ]
    return ClassificationResponse(
        model=model, data=data, usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)
    ).model_dump()
