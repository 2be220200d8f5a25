"""Serving logic that needs neither Ray nor a running engine; `serve_app/` puts it behind FastAPI and Ray Serve.

    config   ServeConfig, EngineOptions: the `args:` of serve_app/config.yaml
    plan     the classifier registry: which model the engine loads, which classifiers it answers for
    api      the HTTP API's request and response models, and reading a request body into one
    vllm_format  vLLM's classification API (POST /classify with "input", GET /v1/models) over the same classifiers
    errors   the core's errors and their HTTP status codes
    core     the classify core (Classifiers) around the small Engine protocol: admission, health probe

Paths come only from the server configuration: a request names a classifier, which is looked up in a fixed
table built at start-up; an unknown name is refused with the list of valid ones.
"""

from .api import (
    BatchRequest,
    ClassifyRequest,
    ErrorBody,
    ErrorInfo,
    Prediction,
    count_texts,
    is_blank,
    parse_request,
    read_json,
    text_problem,
    validate,
)
from .config import NAME_RE, EngineOptions, ServeConfig
from .core import Classifiers, Engine, apply_abstain, engine_needs_tokenizer, load_classifiers
from .errors import EngineUnavailable, InvalidRequest, Overloaded, ServingError, TooLarge, UnknownClassifier, error_body
from .plan import LORA_RANKS, ClassifierSpec, ServingPlan, pin_model, project_path, resolve_plan
from .vllm_format import ClassificationResponse, ModelCard, ModelList, VllmClassifyRequest, classification_response

__all__ = [
    "BatchRequest",
    "ClassificationResponse",
    "ClassifierSpec",
    "Classifiers",
    "ClassifyRequest",
    "Engine",
    "EngineOptions",
    "EngineUnavailable",
    "ErrorBody",
    "ErrorInfo",
    "InvalidRequest",
    "LORA_RANKS",
    "ModelCard",
    "ModelList",
    "NAME_RE",
    "Overloaded",
    "Prediction",
    "ServeConfig",
    "ServingError",
    "ServingPlan",
    "TooLarge",
    "UnknownClassifier",
    "VllmClassifyRequest",
    "apply_abstain",
    "classification_response",
    "count_texts",
    "engine_needs_tokenizer",
    "error_body",
    "is_blank",
    "load_classifiers",
    "parse_request",
    "pin_model",
    "project_path",
    "read_json",
    "resolve_plan",
    "text_problem",
    "validate",
]
