"""Typed run configuration: dataclass defaults, overridden by a YAML file, then by CLI flags.

Every field name is unique across sections, so `--learning-rate 1e-3` and `--train.learning_rate 1e-3`
both work; YAML may be flat or nested by section.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .prompts import DEFAULT_INSTRUCTION

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_KINDS = ("generative", "encoder")

# Defaults that differ by model kind; a value given in the YAML or on the command line always wins.
# encoder: all-MiniLM-L6-v2 (BERT) with a classification head; CLINC queries are short (p95 ~20 tokens).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {
        "model": "all-minilm-l6-v2",
        "max_length": 64,
        "target_modules": ["query", "key", "value", "dense"],
        "max_steps": -1,
        "num_epochs": 5.0,
        "per_device_batch_size": 32,
        # Bundled data, 5 epochs: 1e-3 gave test macro-F1 0.960-0.964 over 4 seeds; 3e-3 swung the eval loss early on
        # and ended at 0.945-0.951 in 3 runs; 5e-4 gave 0.956.
        "learning_rate": 1e-3,
        "warmup_steps": 20,
        "eval_steps": 50,
        "save_steps": 50,
    },
}


@dataclass
class DataConfig:
    # Bundled 10-domain CLINC150 subset; relative paths resolve against the working directory first, then the
    # project root (so `ray job submit --working-dir .` finds them too).
    train_file: Optional[str] = "data/clinc150/train.jsonl"
    validation_file: Optional[str] = "data/clinc150/validation.jsonl"
    test_file: Optional[str] = "data/clinc150/test.jsonl"
    hf_dataset: Optional[str] = None  # a Hub id or a `save_to_disk` folder; replaces the files when set
    hf_config: Optional[str] = None
    text_field: str = "text"
    label_field: str = "label"
    labels: Optional[list[str]] = None  # the allowed label set; inferred from the training data when unset
    test_size: float = 0.2  # used only when no test file is given
    validation_size: float = 0.1  # used only when no validation file is given
    split_seed: int = 42
    max_train_examples: Optional[int] = None  # a stratified subsample, for quick runs
    max_eval_examples: Optional[int] = None
    oos_label: Optional[str] = None  # "none of these" label; unset: oos/out_of_scope/out-of-scope if any; none: none


@dataclass
class ModelConfig:
    # generative: a causal LM that answers with the label (TRL SFT); encoder: a sequence classification head
    model_kind: str = "generative"
    model: str = DEFAULT_MODEL  # a Hub id, a local path, or a bundled alias (the encoder kind defaults to all-minilm-l6-v2)
    model_cache_dir: Optional[str] = None  # where converted bundled models live; default ~/.cache/textclf
    max_length: int = 256  # prompt + label tokens; longer texts are cut and counted
    use_chat_template: bool = True  # used when the tokenizer has one
    instruction: str = DEFAULT_INSTRUCTION


@dataclass
class LoraConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    # One worker with every core by default: on a 2-core machine two 1-thread gloo workers trained 0.90x as fast as
    # one 2-thread process (bench/pipeline_throughput.py). Clusters set num_workers (configs/llama3-8b-gpu.yaml).
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = None  # None: 1 with GPUs, else the cluster's CPUs / num_workers (capped per node)
    precision: str = "auto"  # auto: bf16 on GPUs that support it, fp32 on CPUs; or bf16 / fp16 / fp32
    num_epochs: float = 1.0
    # 140 steps x 16 examples (2,240 rows) on the bundled data: ~11 minutes on 2 CPU cores (120 steps gave 0.895).
    max_steps: int = 140  # overrides num_epochs when > 0; -1 trains num_epochs
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 10
    eval_steps: int = 70  # one eval of the 300 validation rows costs ~30 s on 2 CPU cores
    save_steps: int = 70
    logging_steps: int = 10
    checkpoints_to_keep: int = 2
    max_failures: int = 0  # Ray Train restarts the worker group from the latest checkpoint up to this many times
    placement_strategy: str = "PACK"  # SPREAD puts the workers on different nodes where it can
    gradient_checkpointing: bool = False
    share_prompt_prefix: bool = True  # the batch's common prompt prefix once, rows unpadded (same loss, ~3.7x faster on CPU)
    seed: int = 42


@dataclass
class EvalConfig:
    eval_batch_size: int = 256
    max_num_seqs: int = 256
    kv_cache_gib: float = 1.0  # vLLM KV cache on CPU (VLLM_CPU_KVCACHE_SPACE); ignored on GPU
    gpu_memory_utilization: float = 0.85
    eval_adapter: bool = False  # evaluate base + adapter instead of the merged model (slow on CPU)
    eval_num_cpus: float = 1.0
    eval_num_gpus: float = 0.0
    cpu_threads_bind: Optional[str] = "all"  # cores for the vLLM CPU engine: all, a list like 0-3, or none (vLLM's choice)
    abstain_target: str = "auto"  # threshold chosen on validation: auto, none, oos_recall:<share> or precision:<share>


@dataclass
class RunConfig:
    name: Optional[str] = None  # defaults to a timestamp
    runs_dir: str = "runs"  # or a URI (s3://bucket/runs, gs://..., file://...): mirrored after each step
    storage_path: Optional[str] = None  # Ray Train storage (a path every node sees, or a URI); default the run folder
    mlflow_uri: Optional[str] = None  # default: a local file store at <runs_dir>/mlruns
    experiment: str = "textclf"
    ray_address: Optional[str] = None  # default: RAY_ADDRESS, else an embedded local Ray


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Inverse of to_dict (how Ray workers receive the configuration)."""
        return cls(**{name: tp(**d.get(name, {})) for name, tp in _section_classes().items()})

    @property
    def run_dir(self) -> Path:
        """The local run folder: <runs_dir>/<name>, or the local cache of run_uri."""
        from .storage import cache_dir

        return cache_dir(self.run_uri, self.model.model_cache_dir) if self.run_uri else Path(self.run.runs_dir) / self._name

    @property
    def run_uri(self) -> Optional[str]:
        """<runs_dir>/<name> when runs_dir is a URI (s3://, gs://, file://): where the run folder is mirrored."""
        from .storage import is_uri, join

        return join(self.run.runs_dir, self._name) if is_uri(self.run.runs_dir) else None

    @property
    def _name(self) -> str:
        if not self.run.name:
            raise ValueError("run.name is not set")
        return self.run.name

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
# Optional fields where the string "none" (or "") means something other than unset: kept as given.
NONE_IS_A_VALUE = {"oos_label"}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _field_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """field name -> (section, field, resolved type)."""
    index: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f, hints[f.name])
    return index


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML or CLI value to the field's declared type, with an error naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(value, inner, key)
    if origin is list:
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {key}: expected a list, got {value!r}")
        return [_convert(v, args[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config {key}: expected true or false, got {value!r}")
    try:
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {key}: expected {tp.__name__}, got {value!r}") from None
    return value


def _apply(cfg: Config, key: str, value: Any, index) -> None:
    name = key.split(".")[-1].replace("-", "_")
    if name not in index:
        raise ValueError(f"unknown config key {key!r}")
    section, f, tp = index[name]
    if "." in key and key.split(".")[0] != section:
        raise ValueError(f"config key {key!r}: {name} belongs to section {section!r}")
    keep = name in NONE_IS_A_VALUE and isinstance(value, str)
    setattr(getattr(cfg, section), name, value if keep else _convert(value, tp, key))


def _flatten_yaml(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                flat[f"{key}.{k}"] = v
        else:
            flat[key] = value
    return flat


def load_config(config_path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> Config:
    cfg = Config()
    index = _field_index()
    given: dict[str, Any] = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text())
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{config_path}: expected a mapping of config keys")
        given.update(_flatten_yaml(data))
    given.update(overrides or {})
    for key, value in given.items():
        _apply(cfg, key, value, index)
    _apply_kind_defaults(cfg, {k.split(".")[-1].replace("-", "_") for k in given}, index)
    validate_config(cfg)
    return cfg


def _apply_kind_defaults(cfg: Config, given: set[str], index) -> None:
    for name, value in KIND_DEFAULTS.get(cfg.model.model_kind, {}).items():
        if name not in given:
            _apply(cfg, name, value, index)


def validate_config(cfg: Config) -> None:
    t = cfg.train
    if cfg.model.model_kind not in MODEL_KINDS:
        raise ValueError(f"model.model_kind must be one of {', '.join(MODEL_KINDS)}, not {cfg.model.model_kind!r}")
    if t.num_workers < 1:
        raise ValueError("train.num_workers must be >= 1")
    if t.cpus_per_worker is not None and t.cpus_per_worker <= 0:
        raise ValueError("train.cpus_per_worker must be > 0 (or null for automatic)")
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, not {t.precision!r}")
    if t.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(f"train.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, not {t.placement_strategy!r}")
    for name in ("test_size", "validation_size"):
        v = getattr(cfg.data, name)
        if not 0 < v < 1:
            raise ValueError(f"data.{name} must be between 0 and 1, not {v}")
    if cfg.lora.lora_r < 1:
        raise ValueError("lora.lora_r must be >= 1")
    if t.save_steps % t.eval_steps:
        # Ray Train ranks checkpoints by the eval loss logged before each save.
        raise ValueError("train.save_steps must be a multiple of train.eval_steps")
    if "{labels}" not in cfg.model.instruction:
        raise ValueError("model.instruction must contain the placeholder {labels}")
    from .abstain import parse_target

    parse_target(cfg.eval.abstain_target)  # its ValueError names the key and the accepted forms


def config_overrides(parser: argparse.ArgumentParser, rest: list[str]) -> dict[str, str]:
    """Config overrides from the arguments a script's own parser left: `--key value`, `--key=value`, or a bare
    `--flag` (true)."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            parser.error(f"unexpected argument {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value = rest[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag switches a boolean on
            i += 1
        overrides[key] = value
    return overrides


def parse_args(argv: Optional[list[str]] = None, description: str = "") -> Config:
    """`--config run.yaml` plus any number of `--key value` (or `--section.key value`) overrides."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with config keys (flat or by section)")
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(parser, rest)
    try:
        return load_config(args.config, overrides)
    except ValueError as e:
        parser.error(str(e))


def resolve_path(path: str) -> str:
    """Relative data paths: the working directory first, then the project root."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return str(p)
    alt = PROJECT_ROOT / p
    return str(alt) if alt.exists() else str(p)
