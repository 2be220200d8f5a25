"""Serving logic that needs neither Ray nor a running engine: the app's typed configuration, the request and
response models, the classifier registry (which model folders and adapters a server may use), and the classify
core around a small engine protocol. `serve_app/app.py` puts this behind Ray Serve and FastAPI.

Paths come only from the server configuration: a request names a classifier, which is looked up in a fixed
table built at start-up; an unknown name is refused with the list of valid ones.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from .export import META_FILE, latest_run, prompt_format, read_meta
from .inference import top_k
from .kinds import kind_of
from .kinds.base import Scorer
from .prompts import PromptFormat

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


# ---------------------------------------------------------------------------------------------------------------
# configuration (the `args:` of serve_app/config.yaml)


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(64, ge=1)
    kv_cache_gib: float = Field(0.5, gt=0)  # CPU: the KV cache size
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # GPU: the usual fraction
    max_lora_rank: Optional[int] = None  # default: the largest adapter rank, rounded up to one vLLM supports


class ServeConfig(BaseModel):
    """What a server serves and its limits. Relative paths are taken from the project root."""

    model_config = ConfigDict(extra="forbid")

    run: Optional[str] = None  # a run folder (runs/<name>); default: $TEXTCLF_RUN, else the latest under runs_dir
    runs_dir: str = "runs"
    model_dir: Optional[str] = None  # an exported model folder instead of a run (merged/ or adapter/)
    name: Optional[str] = None  # the single classifier's name (default: the run folder's name)
    # Several classifiers on one base model: {name: run folder or adapter folder}, served with vLLM multi-LoRA.
    adapters: dict[str, str] = Field(default_factory=dict)
    default_classifier: Optional[str] = None  # used when a request names none (default: the first)
    max_text_chars: int = Field(20_000, ge=1)  # longer texts are refused with 413
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger request bodies are refused with 413
    max_batch: int = Field(64, ge=1)  # /classify/batch refuses more texts with 413
    # below it: label null, needs_review true; unset: each classifier's own (classifier.json, chosen by evaluation)
    abstain_threshold: Optional[float] = Field(None, ge=0, le=1)
    top_k: int = Field(5, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    ready_timeout_s: float = Field(10.0, gt=0)
    # CPU cores per replica's engine (VLLM_CPU_OMP_THREADS_BIND): "slot" gives each replica on a node its own
    # `cores_per_replica` cores; "auto"/"nobind"/an explicit list like "0-3" go to vLLM as given.
    cpu_binding: str = "slot"
    cores_per_replica: Optional[int] = Field(None, ge=1)  # default: the replica's num_cpus, at least 1
    engine: EngineOptions = Field(default_factory=EngineOptions)

    @field_validator("adapters")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"classifier name {name!r}: use letters, digits, '_', '-', '.' (at most 64)")
        return v


def project_path(p: str | os.PathLike) -> Path:
    """A local path (relative ones from the project root), or a URI's folder fetched into its local cache."""
    from .config import PROJECT_ROOT
    from .storage import download, is_uri
    from .tracking import is_model_uri, resolve_model_uri

    if is_model_uri(p):  # models:/<name>/<version>: a registered model, shaped as a run folder and a model folder
        return resolve_model_uri(str(p))
    if is_uri(p):
        return download(str(p))
    path = Path(p).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


# ---------------------------------------------------------------------------------------------------------------
# the classifier registry


@dataclass(frozen=True)
class ClassifierSpec:
    name: str
    meta: dict[str, Any]
    tokenizer_dir: str
    adapter_dir: Optional[str] = None  # a LoRA adapter on the engine's model
    lora_id: int = 0

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])


@dataclass(frozen=True)
class ServingPlan:
    engine_model: str  # what the engine loads
    classifiers: dict[str, ClassifierSpec]
    default: str
    max_model_len: int
    enable_lora: bool
    max_loras: int
    max_lora_rank: int
    runner: str = "generate"  # vLLM's runner for the classifiers' kind ("pooling": a classification head)


def _adapter_folder(p: Path) -> Path:
    if (p / "adapter" / META_FILE).exists():
        return p / "adapter"
    if (p / META_FILE).exists() and (p / "adapter_config.json").exists():
        return p
    raise FileNotFoundError(f"{p}: neither a run folder with adapter/ nor an exported adapter folder")


def _lora_rank(adapter: Path) -> int:
    return int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 8))


def resolve_plan(cfg: ServeConfig, model_cache_dir: Optional[str] = None) -> ServingPlan:
    """Which model the engine loads and which classifiers it answers for, from the configuration alone."""
    from .models import resolve_model

    specs: dict[str, ClassifierSpec] = {}
    if cfg.adapters:
        bases = set()
        for i, (name, path) in enumerate(cfg.adapters.items(), start=1):
            folder = _adapter_folder(project_path(path))
            meta = read_meta(folder)
            if not kind_of(meta).serves_adapters:
                raise ValueError(f"adapters: {name} is a {kind_of(meta).name} classifier; serve it merged, on its own "
                                 f"(run: ...)")
            bases.add(meta["base_model"])
            specs[name] = ClassifierSpec(name, meta, str(folder), str(folder), i)
        if len(bases) != 1:
            raise ValueError(f"adapters on one engine need one base model, got {sorted(bases)}")
        engine_model = resolve_model(bases.pop(), model_cache_dir)
        ranks = [_lora_rank(Path(s.adapter_dir)) for s in specs.values()]
    else:
        if cfg.model_dir:
            folder = project_path(cfg.model_dir)
            run_name = folder.parent.name if folder.name in ("merged", "adapter") else folder.name
        else:
            run = project_path(cfg.run or os.environ.get("TEXTCLF_RUN") or latest_run(project_path(cfg.runs_dir)))
            folder = run / "merged" if (run / "merged" / META_FILE).exists() else _adapter_folder(run)
            run_name = run.name
        meta = read_meta(folder)
        name = cfg.name or (run_name if NAME_RE.match(run_name) else "default")
        kind_of(meta).check_servable(meta, str(folder))
        if meta["kind"] == "adapter":  # base + adapter (slower on CPU than a merged model)
            specs[name] = ClassifierSpec(name, meta, str(folder), str(folder), 1)
            engine_model = resolve_model(meta["base_model"], model_cache_dir)
            ranks = [_lora_rank(folder)]
        else:
            specs[name] = ClassifierSpec(name, meta, str(folder))
            engine_model = str(folder)
            ranks = []
    default = cfg.default_classifier or next(iter(specs))
    if default not in specs:
        raise ValueError(f"default_classifier {default!r} is not one of {sorted(specs)}")
    rank = cfg.engine.max_lora_rank or (min(r for r in LORA_RANKS if r >= max(ranks)) if ranks else 16)
    # A prompt may use all of max_length (PromptFormat cuts long texts to it, as evaluation does): leave the engine
    # room for the label tokens after it.
    max_len = max(prompt_format(s.meta).max_length for s in specs.values())
    kind = kind_of(specs[default].meta)  # several classifiers are adapters of one kind (checked above)
    return ServingPlan(engine_model, specs, default, max_len + kind.label_room, enable_lora=bool(ranks),
                       max_loras=max(1, len(ranks)), max_lora_rank=rank, runner=kind.runner)


def pin_model(cfg: ServeConfig, plan: ServingPlan) -> ServeConfig:
    """Fix the single classifier chosen now (args.run, $TEXTCLF_RUN or the latest run) into cfg.model_dir, so that
    every replica serves the same one whatever its environment. A run behind a URI stays a URI: each replica's node
    fetches its own copy."""
    if cfg.adapters or cfg.model_dir:
        return cfg
    from .storage import is_uri, join

    spec = next(iter(plan.classifiers.values()))
    run = cfg.run or os.environ.get("TEXTCLF_RUN")
    folder = join(run, Path(spec.tokenizer_dir).name) if run and is_uri(run) else spec.tokenizer_dir
    return cfg.model_copy(update={"model_dir": folder, "name": spec.name})


# ---------------------------------------------------------------------------------------------------------------
# API models


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr = Field(..., description="The text to classify; must not be blank.")
    model: Optional[StrictStr] = Field(None, max_length=64, description="Classifier name (GET /labels lists them); default: the server's default.")
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
    label: Optional[str] = Field(..., description="One of the classifier's labels; null when below the abstain threshold.")
    confidence: float = Field(..., description="Probability of the predicted label.")
    scores: dict[str, float] = Field(..., description="Top-k labels and their probabilities.")
    model: str
    latency_ms: float
    truncated: bool = Field(False, description="The text was cut by tokens to the model's prompt length.")
    needs_review: bool = False


class ErrorBody(BaseModel):
    error: str
    detail: Any = None


# ---------------------------------------------------------------------------------------------------------------
# errors the HTTP layer maps to status codes


class ServingError(Exception):
    status = 500

    def __init__(self, message: str, detail: Any = None):
        super().__init__(message)
        self.message, self.detail = message, detail


class UnknownClassifier(ServingError):
    status = 404


class TooLarge(ServingError):
    status = 413


class EngineUnavailable(ServingError):
    status = 503


# ---------------------------------------------------------------------------------------------------------------
# the classify core


class Engine(Protocol):
    """What the core needs from an engine: one finished completion for a prompt of token ids (for an encoder,
    given pooling params: the pooling output, class probabilities)."""

    async def complete(self, prompt_token_ids: list[int], params: Any, request_id: str, spec: ClassifierSpec) -> Any: ...

    async def check_health(self) -> None: ...

    @property
    def errored(self) -> bool: ...


def apply_abstain(result: dict[str, Any], threshold: Optional[float]) -> dict[str, Any]:
    """Below the threshold the label is withheld (null) and the prediction flagged for review; scores stay."""
    if threshold is not None and not (result["confidence"] >= threshold):
        return {**result, "label": None, "needs_review": True}
    return {**result, "needs_review": False}


@dataclass
class _Loaded:
    spec: ClassifierSpec
    fmt: PromptFormat
    scorer: Scorer  # the kind's encode, engine params and parse

    def encode(self, text: str):
        return self.scorer.encode(text)

    @property
    def params(self) -> Any:
        return self.scorer.params

    def parse(self, out: Any) -> dict[str, Any]:
        return self.scorer.parse(out)


class Classifiers:
    """Classifies texts with the engine for each configured classifier; the same prompt tokens and scoring as the
    evaluation job (`textclf.inference`)."""

    def __init__(self, cfg: ServeConfig, plan: ServingPlan, engine: Engine, tokenizers: Optional[dict[str, Any]] = None):
        self.cfg, self.plan, self.engine = cfg, plan, engine
        self.loaded: dict[str, _Loaded] = {}
        for name, spec in plan.classifiers.items():
            tok = (tokenizers or {}).get(name)
            if tok is None:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(spec.tokenizer_dir)
            fmt = prompt_format(spec.meta)
            self.loaded[name] = _Loaded(spec, fmt, kind_of(spec.meta).scorer(fmt, tok))

    @property
    def names(self) -> list[str]:
        return list(self.loaded)

    def labels(self) -> dict[str, list[str]]:
        return {n: list(c.fmt.labels) for n, c in self.loaded.items()}

    def get(self, name: Optional[str]) -> _Loaded:
        name = name or self.plan.default
        if name not in self.loaded:
            raise UnknownClassifier(f"unknown classifier {name[:64]!r}", {"valid": self.names})
        return self.loaded[name]

    def threshold(self, c: _Loaded, requested: Optional[float] = None) -> Optional[float]:
        """The request's threshold, else the server's, else the one the evaluation chose for this classifier."""
        for t in (requested, self.cfg.abstain_threshold, c.spec.meta.get("abstain_threshold")):
            if t is not None:
                return float(t)
        return None

    def thresholds(self) -> dict[str, Optional[float]]:
        """Each classifier's default threshold (no request override)."""
        return {n: self.threshold(c) for n, c in self.loaded.items()}

    def check_texts(self, texts: Sequence[str]) -> None:
        if len(texts) > self.cfg.max_batch:
            raise TooLarge(f"batch of {len(texts)} texts is over the limit of {self.cfg.max_batch}")
        long = [i for i, t in enumerate(texts) if len(t) > self.cfg.max_text_chars]
        if long:
            raise TooLarge(f"text over the limit of {self.cfg.max_text_chars} characters", {"indices": long[:10]})

    async def _one(self, c: _Loaded, text: str, threshold: Optional[float]) -> dict[str, Any]:
        t0 = time.perf_counter()
        enc = c.encode(text)
        try:
            out = await asyncio.wait_for(
                self.engine.complete(enc.input_ids, c.params, uuid.uuid4().hex, c.spec), self.cfg.request_timeout_s
            )
            r = c.parse(out)
        except ServingError:
            raise
        except asyncio.TimeoutError as exc:
            raise EngineUnavailable(f"the engine did not answer within {self.cfg.request_timeout_s}s") from exc
        except Exception as exc:  # a dead or failing engine
            raise EngineUnavailable(f"engine failure: {type(exc).__name__}: {exc}"[:500]) from exc
        r = {"label": r["label"], "confidence": float(r["confidence"]), "scores": top_k(r["scores"], self.cfg.top_k),
             "model": c.spec.name, "truncated": enc.truncated}
        r = apply_abstain(r, threshold)
        r["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return r

    async def classify(self, texts: Sequence[str], model: Optional[str] = None,
                       abstain_threshold: Optional[float] = None) -> list[dict[str, Any]]:
        c = self.get(model)
        self.check_texts(texts)
        threshold = self.threshold(c, abstain_threshold)
        if self.engine.errored:
            raise EngineUnavailable("the engine is not running")
        return list(await asyncio.gather(*(self._one(c, t, threshold) for t in texts)))

    async def ready(self) -> tuple[bool, str]:
        """Engine loaded and answering: a health check and one real classification within ready_timeout_s."""
        try:
            await asyncio.wait_for(self.engine.check_health(), self.cfg.ready_timeout_s)
            await asyncio.wait_for(self.classify(["ready?"]), self.cfg.ready_timeout_s)
            return True, "ok"
        except asyncio.TimeoutError:
            return False, f"the engine did not answer within {self.cfg.ready_timeout_s}s"
        except ServingError as exc:
            return False, exc.message
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"[:500]
