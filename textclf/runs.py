"""One run folder, one training run: the run's fingerprint (the config keys that shape the model, the label set, a
content hash of each split) is recorded when a step starts it, and a rerun under the same name must match it unless
`on_existing` says otherwise. Pure Python: no Ray, no filesystem but the local run folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from .data import DataValidationError, Example, Splits, read_jsonl

FINGERPRINT = "fingerprint.json"
SPLITS = ("train", "validation", "test")
# Not part of the fingerprint: evaluation and run control (where the run lives, how it is tracked and scheduled)
# cannot change the trained model.
SKIP_SECTIONS = ("eval", "run")
# Where the data is and how its fields are named (the split hashes and the label set cover its content), and how the
# training is placed or paced (same weights). Any other key counts, so a key added later errs on the side of refusing;
# num_workers (the global batch) and use_gpu (what precision auto picks) count too.
SKIP_KEYS = frozenset(
    {
        "train_file",
        "validation_file",
        "test_file",
        "hf_dataset",
        "hf_config",
        "text_field",
        "label_field",
        "labels",
        "model_cache_dir",
        "cpus_per_worker",
        "placement_strategy",
        "max_failures",
        "checkpoints_to_keep",
        "logging_steps",
        "gradient_checkpointing",
        "share_prompt_prefix",
    }
)
# What prepare, train, export, evaluate and the pipeline write again: left over from an earlier attempt, they would
# pass for this one's. Ray Train's checkpoints (ray_train/) are not among them: a rerun resumes from them.
OUTPUTS = (
    "data",
    "data_report.json",
    "train_output.json",
    "train_metrics.json",
    "adapter",
    "merged",
    "metrics.json",
    "report.md",
    "confusion_matrix.png",
    "predictions.jsonl",
    "summary.json",
)


class RunConflictError(ValueError):
    """A rerun under a used name that would mix two runs' checkpoints or outputs."""


def split_hash(examples: Iterable[Example]) -> str:
    """sha256 of a split's rows: text and label in order (the order is part of what a seeded run trains on)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.text, ex.label], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def model_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys that shape the trained model, flat (key names are unique across sections)."""
    return {
        key: value
        for section, fields in config.items()
        if section not in SKIP_SECTIONS
        for key, value in (fields or {}).items()
        if key not in SKIP_KEYS
    }


def fingerprint(config: dict[str, Any], splits: Splits) -> dict[str, Any]:
    return {
        "config": model_keys(config),
        "labels": list(splits.labels),
        "data": {
            name: {"rows": len(rows), "sha256": split_hash(rows)}
            for name in SPLITS
            if (rows := getattr(splits, name)) is not None
        },
    }


def recorded(run_dir: Path) -> Optional[dict[str, Any]]:
    """The fingerprint of the run in run_dir, None when there is none yet. A run prepared before fingerprints existed
    has one rebuilt from its config.yaml, data_report.json and data/."""
    run_dir = Path(run_dir)
    if (run_dir / FINGERPRINT).exists():
        return json.loads((run_dir / FINGERPRINT).read_text())
    report, config = run_dir / "data_report.json", run_dir / "config.yaml"
    if not (report.exists() and config.exists()):
        return None  # nothing was prepared, so nothing was trained
    import yaml

    data = {}
    for name in SPLITS:
        try:
            rows = read_jsonl(str(run_dir / "data" / f"{name}.jsonl"))
        except DataValidationError:
            continue  # a split that is not there cannot be compared
        data[name] = {"rows": len(rows), "sha256": split_hash(rows)}
    return {
        "config": model_keys(yaml.safe_load(config.read_text()) or {}),
        "labels": json.loads(report.read_text())["labels"],
        "data": data,
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[str]]:
    """What differs, by part (config, labels, data), as short phrases; all lists empty for the same run. Keys or
    splits only one side has (another version of textclf, a split missing from an old run) are not compared."""
    a, b = old.get("config", {}), new.get("config", {})
    config = [f"{k} {a[k]!r} -> {b[k]!r}" for k in b if k in a and a[k] != b[k]]
    labels = []
    la, lb = list(old.get("labels", [])), list(new.get("labels", []))
    if la != lb:
        added, removed = [x for x in lb if x not in la], [x for x in la if x not in lb]
        labels += [f"added {', '.join(map(repr, added))}"] if added else []
        labels += [f"removed {', '.join(map(repr, removed))}"] if removed else []
        labels = labels or [f"same labels in another order ({', '.join(map(repr, lb))})"]  # label ids change
    da, db = old.get("data", {}), new.get("data", {})
    data = [
        f"{s} ({da[s]['rows']} -> {db[s]['rows']} rows)"
        if da[s]["rows"] != db[s]["rows"]
        else f"{s} (other rows, {db[s]['rows']} as before)"
        for s in SPLITS
        if s in da and s in db and da[s]["sha256"] != db[s]["sha256"]
    ]
    return {"config": config, "labels": labels, "data": data}


def check(old: Optional[dict[str, Any]], new: dict[str, Any], on_existing: str, name: str) -> str:
    """What a step may do with the run already under `name` (fingerprint `old`): 'new' (there is none, or it is to be
    overwritten), 'same' (an identical rerun: resume it), 'resume' (a different one, continued as asked). Raises
    RunConflictError for a different run unless on_existing is resume, and for other labels even then."""
    if old is None or on_existing == "overwrite":
        return "new"
    diff = differences(old, new)
    if not any(diff.values()):
        return "same"
    what = "; ".join(f"{part}: {', '.join(items)}" for part, items in diff.items() if items)
    if diff["labels"]:
        raise RunConflictError(
            f"run {name!r} already exists with another label set ({what}); its checkpoints cannot continue with "
            "other labels: pass --on-existing overwrite to replace the run, or choose another --name"
        )
    if on_existing == "resume":
        return "resume"
    raise RunConflictError(
        f"run {name!r} already exists and this rerun differs from it ({what}); resuming would continue its "
        "checkpoints on another setup: pass --on-existing resume to continue it anyway, --on-existing overwrite to "
        "replace it, or choose another --name"
    )


def record(run_dir: Path, new: dict[str, Any], old: Optional[dict[str, Any]] = None) -> None:
    """Write the run's fingerprint; a run resumed on another setup keeps the fingerprints it was trained under."""
    earlier = []
    if old is not None:
        earlier = list(old.get("earlier", []))
        prev = {k: v for k, v in old.items() if k != "earlier"}
        if any(differences(prev, new).values()):
            earlier.append(prev)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / FINGERPRINT).write_text(
        json.dumps({**new, **({"earlier": earlier} if earlier else {})}, indent=2, ensure_ascii=False)
    )
