"""Benchmark, not a test: the whole pipeline of one or more model kinds on given data files, one row each appended to
bench/results/datasets.md (data set, kind, labels, rows, training time, macro-F1, accuracy, in-scope accuracy, oos
recall, abstain rate, ECE).

    python -m bench.datasets --train-file train.jsonl --test-file test.jsonl [--validation-file none]
        [--kinds encoder,generative] [--dataset NAME] [--key value ...]   # make bench-data ARGS="..."

Each kind runs on its own defaults (plus any `--key value` given, e.g. `--time-budget 45m`); runs land under the
runs dir as `data-<dataset>-<kind>-<time>`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ray_jobs.common import setup_logging
from ray_jobs.pipeline import run_pipeline
from textclf.config import PROJECT_ROOT, config_overrides, load_config

RESULTS = PROJECT_ROOT / "bench" / "results" / "datasets.md"
HEADER = (
    "| date | data set | kind | model | labels | train rows | test rows | training (min) | plan estimate (min) | "
    "macro-F1 | accuracy | in-scope accuracy | oos recall | abstain rate | ECE |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
)


def row(dataset: str, cfg, run_dir: Path, summary: dict[str, Any]) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = json.loads((run_dir / "data_report.json").read_text())
    train = json.loads((run_dir / "train_metrics.json").read_text())
    estimate = (train.get("plan") or {}).get("estimate_s")

    def num(key: str) -> str:
        v = metrics.get(key)
        return "" if v is None else f"{v:.4f}"

    rows = {name: sum(counts.values()) for name, counts in report["counts"].items()}
    return (
        f"| {time.strftime('%Y-%m-%d')} | {dataset} | {cfg.model.model_kind} | `{cfg.model.model}` | "
        f"{len(report['labels'])} | {rows['train']} | {rows['test']} | {summary['timings']['train_s'] / 60:.1f} | "
        f"{'' if estimate is None else f'{estimate / 60:.1f}'} | {num('macro_f1')} | {num('accuracy')} | "
        f"{num('in_scope_accuracy')} | {num('oos_recall')} | {num('abstain_rate')} | {num('ece')} |\n"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="encoder", help="model kinds, comma-separated")
    ap.add_argument(
        "--dataset", default=None, help="the data set's name in the table (default: the train file's folder)"
    )
    ap.add_argument("--out", default=str(RESULTS))
    args, rest = ap.parse_known_args(argv)
    setup_logging()
    overrides = config_overrides(ap, rest)
    train_file = overrides.get("train-file") or overrides.get("train_file") or "bundled"
    dataset = args.dataset or Path(train_file).resolve().parent.name
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.kinds.split(","):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = load_config(None, {**overrides, "model_kind": kind, "name": f"data-{dataset}-{kind}-{stamp}"})
        run_dir, summary = run_pipeline(cfg)
        line = row(dataset, cfg, run_dir, summary)
        if not out.exists():
            out.write_text(
                "# Data sets: each kind's defaults on a data set, one pipeline run per row "
                "(`make bench-data`)\n\n" + HEADER
            )
        with out.open("a") as f:
            f.write(line)
        print(HEADER + line, flush=True)
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
