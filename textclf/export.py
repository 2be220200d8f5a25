"""What a trained classifier is on disk, and the merge step.

A run folder holds `adapter/` (LoRA weights + tokenizer + classifier.json) and, after export, `merged/`
(a full checkpoint + tokenizer + classifier.json). classifier.json carries the base model, the label set and the
prompt settings, so evaluation and serving need nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from .prompts import PromptFormat

META_FILE = "classifier.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.txt",
)


def write_meta(out_dir: Path, base_model: str, fmt: PromptFormat, kind: str, extra: Optional[dict] = None) -> None:
    meta = {
        "kind": kind,
        "base_model": base_model,
        "labels": list(fmt.labels),
        "prompt": fmt.to_dict(),
        **(extra or {}),
    }
    (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=2))


def read_meta(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an exported classifier (no {META_FILE})")
    return json.loads(path.read_text())


def update_meta(model_dir: Path, **fields: Any) -> dict[str, Any]:
    """Add or replace fields of an exported classifier's classifier.json (e.g. the evaluation's abstain threshold).
    Written to a temporary file and renamed, so a reader (a starting server) never sees half a file."""
    path = Path(model_dir) / META_FILE
    meta = {**read_meta(model_dir), **fields}
    tmp = path.with_name(f"{META_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    st = path.stat()
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # latest_run orders runs by this file's time: keep the export's
    os.replace(tmp, path)
    return meta


def latest_run(runs_dir: Path) -> Path:
    """The most recently exported run under runs_dir (one with merged/ or adapter/ classifier.json)."""
    metas = [p for p in Path(runs_dir).glob(f"*/*/{META_FILE}") if p.parent.name in ("merged", "adapter")]
    if not metas:
        raise FileNotFoundError(f"no exported run under {runs_dir}/ (train one first: make run)")
    return max(metas, key=lambda p: p.stat().st_mtime).parent.parent


def prompt_format(meta: dict[str, Any]) -> PromptFormat:
    return PromptFormat.from_dict(meta["prompt"])


def save_adapter(
    checkpoint_dir: Path, out_dir: Path, base_model: str, fmt: PromptFormat, extra: Optional[dict] = None
) -> Path:
    """Copy the adapter and tokenizer out of a trainer checkpoint (leaving optimizer state behind)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in checkpoint_dir.iterdir():
        if f.name.startswith("adapter_") or f.name in TOKENIZER_FILES:
            shutil.copy2(f, tmp / f.name)
    if not (tmp / "adapter_config.json").exists():
        raise FileNotFoundError(f"{checkpoint_dir}: no adapter_config.json in the checkpoint")
    write_meta(tmp, base_model, fmt, kind="adapter", extra=extra)
    _replace_dir(tmp, out_dir)
    return out_dir


def merge_adapter(adapter_dir: Path, out_dir: Path, base_model_path: Optional[str] = None) -> Path:
    """Fold the LoRA weights into the base model: a plain checkpoint that any runtime (vLLM included) loads, and
    that serves faster than base + adapter on CPUs. A classification head's config.json gets id2label/label2id."""
    from transformers import AutoTokenizer

    from .kinds import kind_of

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    meta = read_meta(adapter_dir)
    merged = kind_of(meta).merge(str(adapter_dir), base_model_path or meta["base_model"], meta["labels"])
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    meta = {**meta, "kind": "merged", "adapter": str(adapter_dir)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    _replace_dir(tmp, out_dir)
    return out_dir


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished folder into place so a failed export never leaves a half-written model behind."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def base_classifier(model: str, fmt: PromptFormat, cache_dir: Optional[str] = None) -> Path:
    """An untrained model as a servable classifier folder (kind "base"): links to the checkpoint's files plus a
    classifier.json, so the Serve app and the serving benchmarks can serve a base model without a training run.
    Rewritten on each call (cheap), so it always carries the given label set and prompt settings."""
    from .models import cache_root, resolve_model

    src = Path(resolve_model(model, cache_dir))
    out = cache_root(cache_dir) / "classifiers" / Path(model).name.lower()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != META_FILE:
            (tmp / f.name).symlink_to(f.resolve())
    write_meta(tmp, model, fmt, kind="base")
    _replace_dir(tmp, out)
    return out
