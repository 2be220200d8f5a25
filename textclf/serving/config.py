"""The server's typed configuration: the `args:` of serve_app/config.yaml, checked when the app is built."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..inference import EngineSettings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(64, ge=1)
    kv_cache_gib: float = Field(0.5, gt=0)  # CPU: the most the KV cache takes (textclf.inference.kv_cache_bytes)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # GPU: the usual fraction
    max_lora_rank: Optional[int] = None  # default: the largest adapter rank, rounded up to one vLLM supports
    process: Literal["separate", "inline"] = Field(
        "separate",
        description="where the engine runs: separate, in an EngineCore process of its own (vLLM's AsyncLLM); or "
        "inline, inside the replica process, stepped by a thread of its own: a replica starts 2-3 s sooner on CPU "
        "(than separate with preload) but serves fewer requests/s (serve_app/README.md, 'Where the engine runs')",
    )
    preload: bool = Field(
        True,
        description="CPU, separate: the EngineCore process is forked from a server that imports vLLM while the "
        "replica does, instead of spawned after it (serve_app/engine_preload.py); false: vLLM's own spawn",
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU, separate with preload: how far the engine's process is niced below the replica (0-19). "
        "Where the replica's HTTP server shares cores with an engine, it then runs first: its door refuses an "
        "overload at once instead of after the engine's compute (serve_app/README.md, 'The engine's niceness'); "
        "0: equal",
    )
    stats: bool = Field(
        True,
        description="vLLM's engine statistics (queue, KV cache, token and latency histograms) as Ray metrics "
        "(ray_vllm_*, tagged ReplicaId); false: the engine keeps none",
    )

    def settings(self) -> EngineSettings:
        return EngineSettings(self.max_num_seqs, self.kv_cache_gib, self.gpu_memory_utilization)


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
    request_timeout_s: float = Field(60.0, gt=0)  # an engine slower than this: 503
    ready_timeout_s: float = Field(10.0, gt=0)
    # Serve's health check classifies a probe text within this (keep it under the deployment's
    # health_check_timeout_s); skipped while real requests are being answered
    health_probe_timeout_s: float = Field(10.0, gt=0)
    # texts in the engine at once at most (a batch counts its texts); beyond it 429 at once. Default: 4 x max_num_seqs
    max_inflight_texts: Optional[int] = Field(None, ge=1)
    target_latency_s: Optional[float] = Field(
        1.0,
        gt=0,
        description="the latency admitted requests are kept near: a replica admits texts up to a limit that starts "
        "at 16, grows while answers come back within the target and shrinks while they take longer, at most "
        "max_inflight_texts; beyond it 429 at once. Never under twice the replica's fastest answer "
        "(textclf/serving/admission.py). null: a fixed max_inflight_texts",
    )
    retry_after_s: int = Field(1, ge=0)  # the Retry-After header of 429 and 503 answers
    # CPU cores per replica's engine (VLLM_CPU_OMP_THREADS_BIND): "slot" gives each replica on a node its own
    # `cores_per_replica` cores; "auto"/"nobind"/an explicit list like "0-3" go to vLLM as given.
    cpu_binding: str = "slot"
    cores_per_replica: Optional[int] = Field(None, ge=1)  # default: the replica's num_cpus, at least 1
    engine: EngineOptions = Field(default_factory=EngineOptions)

    @property
    def inflight_limit(self) -> int:
        return self.max_inflight_texts or 4 * self.engine.max_num_seqs

    @model_validator(mode="after")
    def _a_full_batch_fits(self) -> "ServeConfig":
        if self.inflight_limit < self.max_batch:
            raise ValueError(
                f"max_inflight_texts {self.inflight_limit} is under max_batch {self.max_batch}: a full "
                f"batch could never be admitted"
            )
        return self

    @field_validator("adapters")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"classifier name {name!r}: use letters, digits, '_', '-', '.' (at most 64)")
        return v
