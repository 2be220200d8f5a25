"""Turn the data section of the config into validated splits (JSONL files or a Hugging Face dataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import DataConfig, resolve_path
from .data import DataValidationError, Example, Splits, build_splits, read_jsonl, read_rows, subsample


def _hf_split(ds, split: str, cfg: DataConfig, name: str) -> list[Example]:
    part = ds[split]
    names = getattr(part.features.get(cfg.label_field), "names", None)  # ClassLabel: integers stand for names
    return read_rows(part, f"{name}[{split}]", cfg.text_field, cfg.label_field, label_names=names)


def _load_hf(cfg: DataConfig) -> tuple[list[Example], Optional[list[Example]], Optional[list[Example]]]:
    import datasets  # only this path needs it

    name = cfg.hf_dataset
    path = Path(resolve_path(name))
    ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(name, cfg.hf_config)
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    if "train" not in ds:
        raise DataValidationError([f"{name}: no 'train' split (found {', '.join(ds)})"])
    val_name = next((s for s in ("validation", "valid", "dev") if s in ds), None)
    errors: list[str] = []
    parts: list[Optional[list[Example]]] = []
    for split in ("train", val_name, "test" if "test" in ds else None):
        try:
            parts.append(_hf_split(ds, split, cfg, name) if split else None)
        except DataValidationError as e:  # every split's problems in one report, as for files
            errors.extend(e.errors)
            parts.append(None)
    if errors:
        raise DataValidationError(errors)
    return parts[0], parts[1], parts[2]


def load_splits(cfg: DataConfig) -> Splits:
    """Read and validate every source, collecting all errors before raising."""
    if cfg.hf_dataset:
        train, validation, test = _load_hf(cfg)
    else:
        if not cfg.train_file:
            raise DataValidationError(["no training data: set train_file or hf_dataset"])
        errors: list[str] = []
        parts: list[Optional[list[Example]]] = []
        for path in (cfg.train_file, cfg.validation_file, cfg.test_file):
            if not path:
                parts.append(None)
                continue
            try:
                parts.append(read_jsonl(resolve_path(path), cfg.text_field, cfg.label_field))
            except DataValidationError as e:
                errors.extend(e.errors)
                parts.append(None)
        if errors:
            raise DataValidationError(errors)
        train, validation, test = parts
    splits = build_splits(
        train,
        validation,
        test,
        cfg.labels,
        label_field=cfg.label_field,
        test_size=cfg.test_size,
        validation_size=cfg.validation_size,
        seed=cfg.split_seed,
    )
    splits.train = subsample(splits.train, cfg.max_train_examples, cfg.split_seed)
    splits.validation = subsample(splits.validation, cfg.max_eval_examples, cfg.split_seed)
    splits.test = subsample(splits.test, cfg.max_eval_examples, cfg.split_seed)
    return splits
