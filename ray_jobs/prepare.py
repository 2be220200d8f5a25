"""Step 1: read and validate the data, split it, and tokenize it with Ray Data.

    python -m ray_jobs.prepare [--config run.yaml] [--key value ...]

Writes <run>/data/{train,validation,test}.jsonl (the exact splits later steps use) and <run>/data_report.json
(counts, warnings, token lengths, rows cut at max_length). Bad data exits with status 2 before anything trains.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from textclf.config import Config, parse_args
from textclf.data import DataValidationError, Example, Splits, read_jsonl
from textclf.kinds import DEFAULT_KIND, get_kind
from textclf.models import resolve_model
from textclf.plan import plan_training
from textclf.prompts import PromptFormat, format_from_config
from textclf.runs import RunConflictError
from textclf.sources import load_splits

from .common import init_ray, setup_logging, start_run
from .console import say

log = logging.getLogger("ray_jobs.prepare")
SPLITS = ("train", "validation", "test")


class Tokenize:
    """Ray Data stage: each row's training tokens as the model kind makes them (textclf.kinds), through the shared
    PromptFormat: input_ids, n_tokens, truncated, and the kind's own columns (completion_mask, label_id)."""

    def __init__(self, model: str, cache_dir: str | None, fmt: dict[str, Any], kind: str = DEFAULT_KIND):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model, cache_dir))
        self.fmt = PromptFormat.from_dict(fmt)
        self.kind = get_kind(kind)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = [
            self.kind.training_row(self.tokenizer, self.fmt, t, lab) for t, lab in zip(batch["text"], batch["label"])
        ]
        out: dict[str, Any] = {
            "label": batch["label"],
            "input_ids": [np.asarray(e.input_ids, dtype=np.int32) for e, _ in rows],
            "n_tokens": np.asarray([len(e.input_ids) for e, _ in rows]),
            "truncated": np.asarray([e.truncated for e, _ in rows]),
        }
        for key in rows[0][1] if rows else {}:
            values = [extra[key] for _, extra in rows]
            # per-token columns (a mask) stay one array per row; per-row values (a label id) make one column
            out[key] = (
                [np.asarray(v, dtype=np.int8) for v in values]
                if isinstance(values[0], list)
                else np.asarray(values, dtype=np.int64)
            )
        return out


@dataclass
class Prepared:
    splits: Splits
    fmt: PromptFormat
    datasets: dict[str, Any]  # tokenized, materialized Ray datasets: train and validation
    report: dict[str, Any]


def tokenize(examples: list[Example], cfg: Config, fmt: PromptFormat):
    import ray

    # Rows in the split's order, so that a seeded run sees the same data order (and trains the same model) each time.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items([{"text": e.text, "label": e.label} for e in examples])
    # Fractional CPUs and materialize(): on a 2-CPU node a lazy stage that needs a whole CPU while the training
    # workers hold both would wait forever.
    return ds.map_batches(
        Tokenize,
        fn_constructor_kwargs={
            "model": cfg.model.model,
            "cache_dir": cfg.model.model_cache_dir,
            "fmt": fmt.to_dict(),
            "kind": cfg.model.model_kind,
        },
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1),  # Ray 2.51 deprecated concurrency=
        num_cpus=0.5,
    ).materialize()


def length_stats(ds) -> dict[str, Any]:
    cols = ds.select_columns(["n_tokens", "truncated"]).to_pandas()
    n = cols["n_tokens"].to_numpy()
    return {
        "rows": int(len(n)),
        "tokens_min": int(n.min()),
        "tokens_mean": round(float(n.mean()), 1),
        "tokens_p95": int(np.percentile(n, 95)),
        "tokens_max": int(n.max()),
        "truncated_rows": int(cols["truncated"].sum()),
    }


def write_splits(splits: Splits, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        with (data_dir / f"{name}.jsonl").open("w") as f:
            for ex in getattr(splits, name):
                f.write(json.dumps({"text": ex.text, "label": ex.label, "source": ex.source}) + "\n")


def read_split(run_dir: Path, name: str) -> list[Example]:
    return read_jsonl(str(run_dir / "data" / f"{name}.jsonl"))


def prepare(cfg: Config, run_dir: Path, splits: Optional[Splits] = None) -> Prepared:
    """Tokenize the splits (loaded here unless the caller has them: start_run needs them first) and write them."""
    if splits is None:
        splits = load_splits(cfg.data)  # raises DataValidationError before Ray does anything
    for w in splits.warnings:
        log.warning("data: %s", w)
    fmt, fitted = fit_format(cfg, splits)
    write_splits(splits, run_dir / "data")
    init_ray(cfg)
    datasets = {name: tokenize(getattr(splits, name), cfg, fmt) for name in ("train", "validation")}
    report = {
        "labels": splits.labels,
        "counts": {
            name: {label: sum(ex.label == label for ex in getattr(splits, name)) for label in splits.labels}
            for name in SPLITS
        },
        "warnings": splits.warnings,
        "tokens": {name: length_stats(ds) for name, ds in datasets.items()},
        "max_length": cfg.model.max_length,
        "format": fitted,
    }
    for name, st in report["tokens"].items():
        log.info(
            "%s: %d rows, tokens mean %.1f, p95 %d, max %d; %d cut at max_length %d",
            name,
            st["rows"],
            st["tokens_mean"],
            st["tokens_p95"],
            st["tokens_max"],
            st["truncated_rows"],
            cfg.model.max_length,
        )
    print_plan(cfg, splits, fmt, fitted, report)
    (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    return Prepared(splits=splits, fmt=fmt, datasets=datasets, report=report)


def fit_format(cfg: Config, splits: Splits) -> tuple[PromptFormat, dict[str, Any]]:
    """The prompt format fitted to the training texts by the model kind (answers, max_length); the resolved
    max_length goes into the configuration the trainer and the saved config.yaml read."""
    from transformers import AutoTokenizer

    path = resolve_model(cfg.model.model, cfg.model.model_cache_dir)  # converts a bundled model once, up front
    kind = get_kind(cfg.model.model_kind)
    fmt, fitted = kind.fit_format(
        format_from_config(cfg.model, splits.labels),
        AutoTokenizer.from_pretrained(path),
        [ex.text for ex in splits.train],
        cfg.model,
    )
    cfg.model.max_length = fmt.max_length
    return fmt, fitted


def print_plan(cfg: Config, splits: Splits, fmt: PromptFormat, fitted: dict[str, Any], report: dict[str, Any]) -> None:
    """The run's plan as far as the data decides it; the training worker adds the measured step time."""
    cut = sum(st["truncated_rows"] for st in report["tokens"].values())
    source = (
        "given"
        if fitted.get("given")
        else (
            f"from the data: {fitted['overhead_tokens']} tokens around the text + the longest text "
            f"{fitted['text_tokens_max']} (p99 {fitted['text_tokens_p99']}) up to {cfg.model.max_text_tokens}"
        )
    )
    say(
        f"[plan] data: {len(splits.train)} train / {len(splits.validation)} validation / {len(splits.test)} test "
        f"rows, {len(splits.labels)} labels; {cfg.model.model_kind} {cfg.model.model}",
        flush=True,
    )
    say(
        f"[plan] max_length {fmt.max_length} ({source}); {cut} train/validation rows cut"
        + (
            f"; answers: {fitted['answers']}, {'listed' if fmt.list_labels else 'not listed'} in the prompt"
            if "answers" in fitted
            else ""
        ),
        flush=True,
    )
    t = cfg.train
    draft = plan_training(t, len(splits.train), len(splits.validation), t.num_workers)
    say(
        f"[plan] training: {draft.describe()}"
        + (
            f"; time budget {t.time_budget}: the steps are fitted to a step time measured before training"
            if t.time_budget
            else ""
        ),
        flush=True,
    )


def exit_on_data_error(fn):
    """Bad data, or a rerun that would mix two runs: every problem on stderr, exit status 2, nothing trained."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DataValidationError, RunConflictError) as e:
            say(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@exit_on_data_error
def main(argv=None) -> None:
    setup_logging()
    cfg = parse_args(argv, description=__doc__)
    splits = load_splits(cfg.data)
    run_dir = start_run(cfg, splits)
    prepared = prepare(cfg, run_dir, splits)
    say(f"prepared {run_dir}: " + ", ".join(f"{k} {len(getattr(prepared.splits, k))}" for k in SPLITS))


if __name__ == "__main__":
    main()
