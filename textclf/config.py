"""Typed run configuration: dataclass defaults, overridden by a YAML file, then by CLI flags.

Every field name is unique across sections, so `--learning-rate 1e-3` and `--train.learning_rate 1e-3`
both work; YAML may be flat or nested by section. Each field's help is in its metadata, which `--help` lists;
HF/TRL names (ALIASES, SWITCHES) are accepted for this project's keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .inference import EngineSettings
from .prompts import DEFAULT_INSTRUCTION

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "smollm2-135m-instruct"
ON_EXISTING = ("refuse", "resume", "overwrite")  # what a step does with a run already under its name (textclf.runs)

# HF TrainingArguments / TRL names for this project's keys, accepted on the command line and in YAML (flat or in the
# key's section), so that a TRL config's settings carry over; --help prints this table.
ALIASES: dict[str, str] = {
    "model_name_or_path": "model",
    "max_seq_length": "max_length",
    "dataset_name": "hf_dataset",
    "dataset_config_name": "hf_config",
    "dataset_config": "hf_config",
    "dataset_text_field": "text_field",
    "lora_target_modules": "target_modules",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "per_device_batch_size",
    "lr_scheduler_type": "lr_scheduler",
    "save_total_limit": "checkpoints_to_keep",
}
# HF/TRL switches with a meaning here: bf16 / fp16 true set precision (given, and neither true: fp32); LoRA is always
# on, so use_peft true is accepted as it is and false refused.
SWITCHES: dict[str, Optional[str]] = {"bf16": "precision", "fp16": "precision", "use_peft": None}
# HF/TRL names left out on purpose; the unknown-key error says why and what to set instead.
NO_EQUIVALENT: dict[str, str] = {
    "output_dir": "set runs_dir and name (the run folder is <runs_dir>/<name>; a rerun of a name resumes)",
    "run_name": "set name (it is also the run folder; a rerun of a name resumes)",
    "per_device_eval_batch_size": "nothing to set (evaluation in training takes max(32, 2 x per_device_batch_size))",
}


@dataclass
class DataConfig:
    """Where the examples come from and how they are split."""

    train_file: Optional[str] = field(
        default="data/clinc150/train.jsonl",
        metadata={
            "help": "JSONL training rows, by default the bundled 10-domain CLINC150 subset; relative paths "
            "resolve against the working directory, then the project root, so `ray job submit "
            "--working-dir .` finds them too"
        },
    )
    validation_file: Optional[str] = field(
        default="data/clinc150/validation.jsonl",
        metadata={"help": "JSONL validation rows; none: validation_size of the training rows, split off stratified"},
    )
    test_file: Optional[str] = field(
        default="data/clinc150/test.jsonl",
        metadata={"help": "JSONL test rows; none: test_size of the training rows, split off stratified"},
    )
    hf_dataset: Optional[str] = field(
        default=None, metadata={"help": "a Hugging Face Hub dataset id or a `save_to_disk` folder; replaces the files"}
    )
    hf_config: Optional[str] = field(default=None, metadata={"help": "the Hub dataset's configuration (subset) name"})
    text_field: str = field(default="text", metadata={"help": "the field that holds the text"})
    label_field: str = field(default="label", metadata={"help": "the field that holds the label"})
    labels: Optional[list[str]] = field(
        default=None, metadata={"help": "the allowed label set; inferred from the training data when unset"}
    )
    test_size: float = field(default=0.2, metadata={"help": "test fraction; used only when no test file is given"})
    validation_size: float = field(
        default=0.1, metadata={"help": "validation fraction; used only when no validation file is given"}
    )
    split_seed: int = field(default=42, metadata={"help": "seed of the stratified splits and subsamples"})
    max_train_examples: Optional[int] = field(
        default=None, metadata={"help": "a stratified subsample of the training rows, for quick runs"}
    )
    max_eval_examples: Optional[int] = field(
        default=None, metadata={"help": "a stratified subsample of the validation and of the test rows, for quick runs"}
    )
    oos_label: Optional[str] = field(
        default=None,
        metadata={
            "help": 'the "none of these" label; unset: a label named oos, out_of_scope or out-of-scope if '
            "any; none: there is none"
        },
    )


@dataclass
class ModelConfig:
    """The base model and the prompt."""

    model_kind: str = field(
        default="generative",
        metadata={
            "help": "a name in textclf.kinds.KINDS: generative (a causal LM that answers with the label, TRL "
            "SFT), encoder (a classification head on an encoder), decoder-head (a classification head "
            "on a causal LM)"
        },
    )
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "a Hub id, a local path, or a bundled alias"})
    model_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "where converted bundled models live; none: ~/.cache/textclf"}
    )
    max_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "prompt + answer tokens; none: from the data (the prompt, the longest training text up to "
            "max_text_tokens, the longest answer); longer texts are cut, and counted in the data report"
        },
    )
    max_text_tokens: int = field(
        default=256,
        metadata={"help": "with max_length from the data: the most tokens a text keeps (longer ones are cut)"},
    )
    label_list_tokens: int = field(
        default=128,
        metadata={
            "help": "generative kind: the prompt lists the label answers while the list takes at most this many "
            "tokens; longer label sets are learned from the training data alone"
        },
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "wrap the prompt in the tokenizer's chat template when it has one"}
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "the system instruction; must contain the placeholder {labels}"}
    )


@dataclass
class LoraConfig:
    """The LoRA adapter (always on)."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling: the update is multiplied by alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA layers' input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "names of the modules that get LoRA adapters"},
    )


@dataclass
class TrainConfig:
    """Ray Train and the trainer's hyperparameters."""

    num_workers: int = field(
        default=1,
        metadata={
            "help": "Ray Train workers (DDP); one with every core by default, since on few CPU cores one "
            "multi-threaded process trains faster than several gloo workers; clusters set more"
        },
    )
    use_gpu: bool = field(default=False, metadata={"help": "train on GPUs, one per worker (NCCL)"})
    cpus_per_worker: Optional[float] = field(
        default=None,
        metadata={"help": "CPUs per worker; none: 1 beside a GPU, else cluster CPUs / num_workers, capped per node"},
    )
    precision: str = field(
        default="auto", metadata={"help": "auto: bf16 on GPUs that support it, fp32 on CPUs; or bf16 / fp16 / fp32"}
    )
    num_epochs: float = field(
        default=0.75,
        metadata={"help": "passes over the training rows when max_steps is -1 (steps follow the data size)"},
    )
    max_steps: int = field(
        default=-1, metadata={"help": "optimizer steps; overrides num_epochs when > 0; -1: from num_epochs"}
    )
    time_budget: Optional[str] = field(
        default=None,
        metadata={
            "help": "a cap on training time such as 20m, 1h or 90s: the steps are planned from a step time "
            "measured on this data before training (and never exceed num_epochs / max_steps)"
        },
    )
    evaluations: int = field(
        default=2,
        metadata={
            "help": "evaluations of the validation split over the run when eval_steps is none; the last one at "
            "the final step, so the kept checkpoint (the best eval loss) is chosen among them"
        },
    )
    per_device_batch_size: int = field(
        default=16,
        metadata={"help": "training rows per worker and step (evaluation in training takes max(32, twice this))"},
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "batches whose gradients are summed into one optimizer step"}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_scheduler: str = field(
        default="cosine",
        metadata={"help": "the learning-rate schedule (a transformers SchedulerType): cosine, linear, constant, ..."},
    )
    warmup_steps: Optional[int] = field(
        default=None, metadata={"help": "steps of linear learning-rate warm-up; none: 5% of the steps (at least 1)"}
    )
    eval_steps: Optional[int] = field(
        default=None,
        metadata={"help": "steps between evaluations of the validation split; none: the steps / evaluations"},
    )
    save_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "steps between checkpoints, a multiple of eval_steps (ranked by the eval loss before them); "
            "none: eval_steps"
        },
    )
    logging_steps: Optional[int] = field(
        default=None,
        metadata={"help": "steps between logged training metrics and progress lines; none: 1/20 of the run"},
    )
    checkpoints_to_keep: int = field(
        default=2, metadata={"help": "checkpoints kept: Ray Train's, ranked by eval loss, and each worker's local ones"}
    )
    max_failures: int = field(
        default=0, metadata={"help": "times Ray Train restarts the worker group from the latest checkpoint"}
    )
    placement_strategy: str = field(
        default="PACK",
        metadata={
            "help": "Ray placement of the workers: PACK, SPREAD (different nodes where it can), STRICT_PACK or "
            "STRICT_SPREAD"
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass: less memory, slower (no shared prefix)"},
    )
    share_prompt_prefix: bool = field(
        default=True,
        metadata={
            "help": "compute the batch's common prompt prefix once and the rows unpadded: the same loss, faster on CPU"
        },
    )
    seed: int = field(
        default=42, metadata={"help": "training seed: the adapter's (and encoder head's) init and the data order"}
    )


@dataclass
class EvalConfig:
    """The test-set evaluation: Ray Data batches through a vLLM engine."""

    eval_batch_size: int = field(default=256, metadata={"help": "test rows per Ray Data batch sent to the engine"})
    max_num_seqs: int = field(default=256, metadata={"help": "vLLM's most sequences in one engine step"})
    kv_cache_gib: float = field(
        default=1.0,
        metadata={
            "help": "the most vLLM's KV cache takes on CPU, in GiB; it takes what max_num_seqs prompts of the "
            "longest length can fill, if less (textclf.inference.kv_cache_bytes); ignored on GPU"
        },
    )
    gpu_memory_utilization: float = field(default=0.85, metadata={"help": "the fraction of GPU memory vLLM may take"})
    eval_adapter: bool = field(
        default=False, metadata={"help": "evaluate base + adapter instead of the merged model (slow on CPU)"}
    )
    eval_num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved for the evaluation actor"})
    eval_num_gpus: float = field(default=0.0, metadata={"help": "GPUs reserved for the evaluation actor"})
    cpu_threads_bind: Optional[str] = field(
        default="all",
        metadata={"help": "cores for the vLLM CPU engine: all, a list like 0-3, or none (vLLM's choice)"},
    )
    abstain_target: str = field(
        default="auto",
        metadata={
            "help": "the abstain threshold chosen on validation: auto (with an oos label in_scope_drop:0.01, "
            "else precision:0.95), none, balanced, oos_recall:<share>, precision:<share> or in_scope_drop:<share> "
            "(textclf/abstain.py)"
        },
    )
    model_uri: Optional[str] = field(
        default=None,
        metadata={
            "help": "evaluate a registered model (models:/<name>/<version>, /latest or @<alias>) on the run's "
            "splits instead of the run's own; its report goes to <run>/evaluations/<name>-<version>/"
        },
    )

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(self.max_num_seqs, self.kv_cache_gib, self.gpu_memory_utilization)


@dataclass
class RunConfig:
    """Where the run goes: folders, Ray Train storage, MLflow, the Ray cluster."""

    name: Optional[str] = field(
        default=None,
        metadata={
            "help": "the run folder's name under runs_dir (a rerun with the same name resumes, see "
            "on_existing); none: a timestamp"
        },
    )
    runs_dir: str = field(
        default="runs",
        metadata={
            "help": "the folder of the runs, or a URI (s3://bucket/runs, gs://..., file://...) mirrored after each step"
        },
    )
    storage_path: Optional[str] = field(
        default=None,
        metadata={"help": "Ray Train storage (a path every node sees, or a URI); none: the run folder"},
    )
    mlflow_uri: Optional[str] = field(
        default=None, metadata={"help": "MLflow tracking URI; none: a local file store at <runs_dir>/mlruns"}
    )
    experiment: str = field(default="textclf", metadata={"help": "the MLflow experiment"})
    registered_model_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "the MLflow registered model that each pipeline run's exported model becomes a new version "
            "of (models:/<name>/<version>); none: the experiment's name"
        },
    )
    ray_address: Optional[str] = field(
        default=None, metadata={"help": "the Ray cluster's address; none: RAY_ADDRESS, else an embedded local Ray"}
    )
    on_existing: str = field(
        default="refuse",
        metadata={
            "help": "a --name already used: refuse a rerun that differs (an identical one resumes), resume "
            "anyway (same labels only), or overwrite (delete the old run first)"
        },
    )
    verbose: bool = field(
        default=False,
        metadata={
            "help": "show every library's and Ray's output on the console too; otherwise it shows the plan, "
            "progress, results and warnings, and the rest goes to <run>/logs/<step>.log"
        },
    )


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

        return (
            cache_dir(self.run_uri, self.model.model_cache_dir)
            if self.run_uri
            else Path(self.run.runs_dir) / self._name
        )

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
            assert f.name not in {**ALIASES, **SWITCHES, **NO_EQUIVALENT}, f"config field {f.name} is an HF/TRL alias"
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
    setattr(getattr(cfg, section), name, _field_value(name, value, tp, key))


def _field_value(name: str, value: Any, tp: Any, key: str) -> Any:
    """A given value as the field's type; a string stays itself where "none" is a value of its own."""
    return value if name in NONE_IS_A_VALUE and isinstance(value, str) else _convert(value, tp, key)


def _flatten_yaml(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                flat[f"{key}.{k}"] = v
        else:
            flat[key] = value
    return flat


def _unknown_keys_error(keys: list[str]) -> ValueError:
    names = [k.split(".")[-1].replace("-", "_") for k in keys]
    why = "".join(f"; {n}: {NO_EQUIVALENT[n]}" for n in dict.fromkeys(names) if n in NO_EQUIVALENT)
    listed = ", ".join(repr(k) for k in keys)
    return ValueError(f"unknown config key{'s' if len(keys) > 1 else ''} {listed}{why} (--help lists the keys)")


def _resolve(given: dict[str, Any], index) -> dict[str, tuple[str, Any]]:
    """One source's keys (a YAML file, or the command line's) as field -> (the key as given, its value converted):
    HF/TRL names become this project's keys; two names for one field with different values are refused."""
    out: dict[str, tuple[str, Any, bool]] = {}

    def put(name: str, key: str, value: Any, aliased: bool) -> None:
        if name in out and (aliased or out[name][2]) and out[name][1] != value:
            raise ValueError(
                f"config keys {out[name][0]!r} and {key!r} both set {name}, to different values "
                f"({out[name][1]!r}, {value!r})"
            )
        out[name] = (key, value, aliased or (name in out and out[name][2]))

    names = {key: key.split(".")[-1].replace("-", "_") for key in given}
    unknown = [key for key, name in names.items() if name not in SWITCHES and ALIASES.get(name, name) not in index]
    if unknown:
        raise _unknown_keys_error(unknown)
    switches: dict[str, tuple[str, bool]] = {}
    for key, value in given.items():
        name = names[key]
        field_name = SWITCHES[name] if name in SWITCHES else ALIASES.get(name, name)
        section = index[field_name][0] if field_name else None  # use_peft may stand in any section
        if section and "." in key and key.split(".")[0] != section:
            shown = name if name == field_name else f"{name} ({field_name})"
            raise ValueError(f"config key {key!r}: {shown} belongs to section {section!r}")
        if name in SWITCHES:
            switches[name] = (key, _convert(value, bool, key))
        else:
            put(field_name, key, _field_value(field_name, value, index[field_name][2], key), aliased=name != field_name)
    if "use_peft" in switches and not switches.pop("use_peft")[1]:
        raise ValueError("config use_peft false: this project always trains a LoRA adapter (no full fine-tuning)")
    if switches:
        on = [name for name, (_, v) in switches.items() if v]
        if len(on) > 1:
            raise ValueError("config bf16 and fp16 are both true: set one (or precision)")
        put("precision", " / ".join(k for k, _ in switches.values()), on[0] if on else "fp32", aliased=True)
    return {name: (key, value) for name, (key, value, _) in out.items()}


def load_config(config_path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> Config:
    cfg = Config()
    index = _field_index()
    given: dict[str, tuple[str, Any]] = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text())
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{config_path}: expected a mapping of config keys")
        try:
            given.update(_resolve(_flatten_yaml(data), index))
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
    given.update(_resolve(overrides or {}, index))  # the command line beats the YAML, whatever names either used
    for name, (_, value) in given.items():
        setattr(getattr(cfg, index[name][0]), name, value)
    _apply_kind_defaults(cfg, set(given), index)
    validate_config(cfg)
    return cfg


def _apply_kind_defaults(cfg: Config, given: set[str], index) -> None:
    from .kinds import get_kind

    for name, value in get_kind(cfg.model.model_kind).defaults.items():
        if name not in given:
            _apply(cfg, name, value, index)


def validate_config(cfg: Config) -> None:
    from .kinds import get_kind

    t = cfg.train
    get_kind(cfg.model.model_kind)  # an unknown kind: the error lists the known ones
    name = cfg.run.name
    if name is not None and (name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/"))):
        # the run folder is <runs_dir>/<name>, and --on-existing overwrite deletes it
        raise ValueError(f"run.name must name a folder inside runs_dir, not {name!r}")
    if cfg.run.on_existing not in ON_EXISTING:
        raise ValueError(f"run.on_existing must be one of {', '.join(ON_EXISTING)}, not {cfg.run.on_existing!r}")
    if t.num_workers < 1:
        raise ValueError("train.num_workers must be >= 1")
    if t.cpus_per_worker is not None and t.cpus_per_worker <= 0:
        raise ValueError("train.cpus_per_worker must be > 0 (or null for automatic)")
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, not {t.precision!r}")
    if t.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(
            f"train.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, not {t.placement_strategy!r}"
        )
    for name in ("test_size", "validation_size"):
        v = getattr(cfg.data, name)
        if not 0 < v < 1:
            raise ValueError(f"data.{name} must be between 0 and 1, not {v}")
    if cfg.lora.lora_r < 1:
        raise ValueError("lora.lora_r must be >= 1")
    if t.time_budget is not None:
        from .plan import parse_duration

        parse_duration(t.time_budget)
    if t.evaluations < 1:
        raise ValueError("train.evaluations must be >= 1")
    if t.save_steps and t.eval_steps and t.save_steps % t.eval_steps:
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


USAGE = "%(prog)s [-h] [--config YAML] [--KEY VALUE ...]"
SPELLINGS = (
    "Every key also works as --key_name and --section.key, and as --key=value; a boolean alone (--use-gpu) "
    "is true; lists take a,b,c or JSON; none unsets an optional key."
)


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _metavar(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return "LIST" if typing.get_origin(tp) is list else "[BOOL]" if tp is bool else tp.__name__.upper()


def _aliases_text() -> str:
    """The alias table for --help's epilog."""
    rows = list(ALIASES.items())
    rows += [
        ("bf16, fp16", "true: precision bf16 / fp16; given, and neither true: fp32"),
        ("use_peft", "true is accepted (LoRA is always on); false is refused"),
    ]
    lines = ["HF/TRL names, accepted on the command line and in YAML:"] + [f"  {a:<28} {k}" for a, k in rows]
    lines += ["Left out (an unknown-key error, saying what to set instead):"]
    lines += [f"  {a:<28} {why}" for a, why in NO_EQUIVALENT.items()]
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' docstrings and the epilog as written; help lines wrapped at spaces only (paths, model ids)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)


def config_parser(description: str = "") -> argparse.ArgumentParser:
    """The entry points' --help: --config, then every config key by section with its type, default and help, from the
    dataclass fields. Only for showing: the keys themselves are read by config_overrides, which takes every spelling."""
    epilog = f"{textwrap.fill(SPELLINGS, 100, break_on_hyphens=False)}\n\n{_aliases_text()}"
    parser = argparse.ArgumentParser(
        description=description, usage=USAGE, formatter_class=_HelpFormatter, allow_abbrev=False, epilog=epilog
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="a YAML file of config keys, flat or by section; the keys given below override it",
    )
    index = _field_index()
    from .kinds import get_kind, names

    kind_defaults = {kind: get_kind(kind).defaults for kind in names()}
    for section, cls in _section_classes().items():
        group = parser.add_argument_group(f"{section} keys", cls.__doc__)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            by_kind = "".join(
                f"; {kind}: {_shown(d[f.name])}"
                for kind, d in kind_defaults.items()
                if f.name in d and d[f.name] != default
            )
            text = f"(default {_shown(default)}{by_kind}) {f.metadata.get('help', '')}"
            group.add_argument(
                f"--{f.name.replace('_', '-')}", metavar=_metavar(index[f.name][2]), help=text.replace("%", "%%")
            )
    return parser


def parse_args(argv: Optional[list[str]] = None, description: str = "") -> Config:
    """`--config run.yaml` plus any number of `--key value` (or `--section.key value`) overrides; --help lists every
    key."""
    parser = config_parser(description)
    # The keys are read by config_overrides (every spelling, in order), so only --config and --help are parsed here.
    known = argparse.ArgumentParser(prog=parser.prog, usage=USAGE, add_help=False, allow_abbrev=False)
    known.add_argument("-h", "--help", action="store_true")
    known.add_argument("--config")
    args, rest = known.parse_known_args(argv)
    if args.help:
        parser.print_help()
        parser.exit()
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
