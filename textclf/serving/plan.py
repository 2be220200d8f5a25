"""The classifier registry: which model the engine loads and which classifiers (model folders, LoRA adapters) it
answers for, from the configuration alone. Requests name classifiers, never paths."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import PROJECT_ROOT
from ..export import META_FILE, latest_run, prompt_format, read_meta
from ..kinds import kind_of
from ..models import resolve_model
from ..storage import download, is_uri, join
from ..tracking import is_model_uri, resolve_model_uri
from .config import NAME_RE, ServeConfig

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def project_path(p: str | os.PathLike) -> Path:
    """A local path (relative ones from the project root), a registered model (models:/<name>/<version>, shaped as a
    run folder and a model folder), or a URI's folder fetched into its local cache."""
    if is_model_uri(p):
        return resolve_model_uri(str(p))
    if is_uri(p):
        return download(str(p))
    path = Path(p).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


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
    pooling: Optional[str] = None  # the head's sequence pooling (classifier.json); None: the architecture's own


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
    specs: dict[str, ClassifierSpec] = {}
    if cfg.adapters:
        bases = set()
        for i, (name, path) in enumerate(cfg.adapters.items(), start=1):
            folder = _adapter_folder(project_path(path))
            meta = read_meta(folder)
            if not kind_of(meta).serves_adapters:
                raise ValueError(
                    f"adapters: {name} is a {kind_of(meta).name} classifier; serve it merged, on its own (run: ...)"
                )
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
    return ServingPlan(
        engine_model,
        specs,
        default,
        max_len + kind.label_room,
        enable_lora=bool(ranks),
        max_loras=max(1, len(ranks)),
        max_lora_rank=rank,
        runner=kind.runner,
        pooling=specs[default].meta.get("pooling"),
    )


def pin_model(cfg: ServeConfig, plan: ServingPlan) -> ServeConfig:
    """Fix the single classifier chosen now (args.run, $TEXTCLF_RUN or the latest run) into cfg.model_dir, so that
    every replica serves the same one whatever its environment. A run behind a URI stays a URI: each replica's node
    fetches its own copy."""
    if cfg.adapters or cfg.model_dir:
        return cfg
    spec = next(iter(plan.classifiers.values()))
    run = cfg.run or os.environ.get("TEXTCLF_RUN")
    folder = join(run, Path(spec.tokenizer_dir).name) if run and is_uri(run) else spec.tokenizer_dir
    return cfg.model_copy(update={"model_dir": folder, "name": spec.name})
