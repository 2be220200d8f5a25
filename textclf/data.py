"""Reading, validating and splitting labelled text. Pure Python: no Ray, no torch.

Every problem is collected first and raised together, each naming its file, line and field, so a user fixes
a bad file in one pass and no training starts on bad data.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

MAX_REPORTED_ERRORS = 50


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str = ""  # "file.jsonl:12" or "dataset[split]:12"; for error messages


class DataValidationError(ValueError):
    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        shown = self.errors[:MAX_REPORTED_ERRORS]
        more = len(self.errors) - len(shown)
        msg = f"{len(self.errors)} data error(s):\n  " + "\n  ".join(shown)
        if more:
            msg += f"\n  ... and {more} more"
        super().__init__(msg)


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]
    warnings: list[str] = field(default_factory=list)


def _check_row(row: object, where: str, text_field: str, label_field: str, errors: list[str]) -> Optional[Example]:
    if not isinstance(row, dict):
        errors.append(f"{where}: expected a JSON object, got {type(row).__name__}")
        return None
    ok = True
    text = row.get(text_field)
    if text_field not in row or text is None:
        errors.append(f"{where}: field '{text_field}': missing")
        ok = False
    elif not isinstance(text, str):
        errors.append(f"{where}: field '{text_field}': expected a string, got {type(text).__name__}")
        ok = False
    elif not text.strip():
        errors.append(f"{where}: field '{text_field}': empty text")
        ok = False
    label = row.get(label_field)
    if label_field not in row or label is None:
        errors.append(f"{where}: field '{label_field}': missing label")
        ok = False
    elif isinstance(label, bool) or not isinstance(label, (str, int)):
        errors.append(f"{where}: field '{label_field}': expected a string label, got {type(label).__name__}")
        ok = False
    elif not str(label).strip():
        errors.append(f"{where}: field '{label_field}': empty label")
        ok = False
    if not ok:
        return None
    return Example(text=text, label=str(label).strip(), source=where)


def read_jsonl(path: str, text_field: str = "text", label_field: str = "label") -> list[Example]:
    """Read a JSONL file; raise DataValidationError listing every bad line."""
    p = Path(path)
    if not p.is_file():
        raise DataValidationError([f"{path}: file not found"])
    examples: list[Example] = []
    errors: list[str] = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: unreadable JSON ({e.msg} at column {e.colno})")
                continue
            ex = _check_row(row, where, text_field, label_field, errors)
            if ex is not None:
                examples.append(ex)
    if errors:
        raise DataValidationError(errors)
    if not examples:
        raise DataValidationError([f"{path}: no rows"])
    return examples


def read_rows(
    rows: Iterable[dict],
    name: str,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Optional[Sequence[str]] = None,
) -> list[Example]:
    """Validate in-memory rows (a Hugging Face dataset split, say); rows are numbered from 1. With label_names (a
    ClassLabel's), integer labels stand for those names."""
    examples, errors = [], []
    unlabelled = 0
    for i, row in enumerate(rows, start=1):
        where = f"{name}:{i}"
        if label_names is not None and isinstance(row, dict):
            label = row.get(label_field)
            if isinstance(label, int) and not isinstance(label, bool):
                if not 0 <= label < len(label_names):  # a negative index would silently pick a class from the end
                    if label == -1:
                        unlabelled += 1
                    errors.append(
                        f"{where}: field '{label_field}': label {label} is not one of the ClassLabel's "
                        f"{len(label_names)} classes" + (" (-1: an unlabelled row)" if label == -1 else "")
                    )
                    continue
                row = {**row, label_field: label_names[label]}
        ex = _check_row(row, where, text_field, label_field, errors)
        if ex is not None:
            examples.append(ex)
    if unlabelled:
        # Said first, so that it shows however many rows are listed after it.
        errors.insert(
            0,
            f"{name}: {unlabelled} unlabelled row(s) (label -1, as in many Hub test splits): a split "
            "to train or score on needs a label on every row; drop them (e.g. "
            f"ds.filter(lambda r: r['{label_field}'] != -1), then save_to_disk and point hf_dataset "
            "at that folder)",
        )
    if errors:
        raise DataValidationError(errors)
    if not examples:
        raise DataValidationError([f"{name}: no rows"])
    return examples


def check_label_set(examples: Iterable[Example], labels: Sequence[str], label_field: str = "label") -> None:
    allowed = set(labels)
    errors = [
        f"{ex.source}: field '{label_field}': label {ex.label!r} is not in the label set ({', '.join(labels)})"
        for ex in examples
        if ex.label not in allowed
    ]
    if errors:
        raise DataValidationError(errors)


def stratified_split(
    examples: Sequence[Example], fraction: float, seed: int, what: str = "test"
) -> tuple[list[Example], list[Example]]:
    """Seeded per-class split: each class keeps at least one example on each side.

    Returns (rest, held_out). Classes with fewer than 2 examples cannot be split and raise an error that names
    the class, its count and where its rows are.
    """
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex.label].append(ex)
    errors = [
        f"label {label!r}: {len(rows)} example(s) ({', '.join(r.source for r in rows[:3])}); a stratified "
        f"{what} split needs at least 2 per class: add examples or give a {what} file"
        for label, rows in sorted(by_label.items())
        if len(rows) < 2
    ]
    if errors:
        raise DataValidationError(errors)
    rng = random.Random(seed)
    rest, held = [], []
    for label in sorted(by_label):
        rows = list(by_label[label])
        rng.shuffle(rows)
        k = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
        held.extend(rows[:k])
        rest.extend(rows[k:])
    rng.shuffle(rest)
    rng.shuffle(held)
    return rest, held


def subsample(examples: Sequence[Example], n: Optional[int], seed: int) -> list[Example]:
    """A stratified subsample of about n examples (every class kept), for quick runs."""
    if n is None or n >= len(examples):
        return list(examples)
    _, kept = stratified_split(examples, n / len(examples), seed, what="subsample")
    return kept


def overlap_warnings(a: Sequence[Example], b: Sequence[Example], a_name: str, b_name: str) -> list[str]:
    """Texts found in both splits inflate scores; they are reported, not dropped."""
    seen = {ex.text.strip().lower(): ex for ex in a}
    dup = [(seen[k], ex) for ex in b if (k := ex.text.strip().lower()) in seen]
    if not dup:
        return []
    examples = "; ".join(f"{x.source} = {y.source}" for x, y in dup[:5])
    return [f"{len(dup)} text(s) appear in both {a_name} and {b_name} (e.g. {examples})"]


def build_splits(
    train: list[Example],
    validation: Optional[list[Example]],
    test: Optional[list[Example]],
    labels: Optional[Sequence[str]],
    *,
    label_field: str = "label",
    test_size: float = 0.2,
    validation_size: float = 0.1,
    seed: int = 42,
) -> Splits:
    """Check labels against the label set, split what is missing, report overlaps."""
    if labels:
        label_list = list(dict.fromkeys(str(lab) for lab in labels))
    else:
        label_list = sorted({ex.label for ex in train})
    errors: list[str] = []
    for part in (train, validation or [], test or []):
        try:
            check_label_set(part, label_list, label_field)
        except DataValidationError as e:
            errors.extend(e.errors)
    if errors:
        raise DataValidationError(errors)
    if test is None:
        train, test = stratified_split(train, test_size, seed, what="test")
    if validation is None:
        train, validation = stratified_split(train, validation_size, seed + 1, what="validation")
    missing = sorted(set(label_list) - {ex.label for ex in train})
    warnings = []
    if missing:
        warnings.append(f"label(s) with no training example: {', '.join(missing)}")
    warnings += overlap_warnings(train, test, "train", "test")
    warnings += overlap_warnings(train, validation, "train", "validation")
    return Splits(train=train, validation=validation, test=test, labels=label_list, warnings=warnings)
