"""All steps: prepare -> train -> export (merge) -> evaluate. The main job of `make run`.

python -m ray_jobs.pipeline [--config run.yaml] [--key value ...]
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from textclf import tracking
from textclf.config import Config, parse_args
from textclf.sources import load_splits

from .common import setup_logging, start_run, sync_run
from .console import say
from .evaluate import evaluate
from .export import export
from .prepare import exit_on_data_error, prepare
from .train import train

log = logging.getLogger("ray_jobs.pipeline")


def run_pipeline(cfg: Config) -> tuple[Path, dict[str, Any]]:
    """(run folder, summary: headline metrics and the time each step took)."""
    timings = {}
    t0 = time.time()
    splits = load_splits(cfg.data)  # bad data stops here, before the run folder is touched
    run_dir = start_run(cfg, splits, trains=True)
    prepared = prepare(cfg, run_dir, splits)
    timings["prepare_s"] = time.time() - t0
    sync_run(cfg, run_dir)  # each step's output reaches the run's URI (if any) as soon as it exists
    t = time.time()
    train(cfg, run_dir, prepared)
    timings["train_s"] = time.time() - t
    sync_run(cfg, run_dir)
    t = time.time()
    export(cfg, run_dir)
    timings["export_s"] = time.time() - t
    sync_run(cfg, run_dir)
    t = time.time()
    metrics = evaluate(cfg, run_dir)
    timings["evaluate_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    summary = {k: metrics[k] for k in ("macro_f1", "weighted_f1", "accuracy", "n", "prompts_per_second")}
    summary["timings"] = {k: round(v, 1) for k, v in timings.items()}
    summary["registered_model"] = publish(cfg, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    sync_run(cfg, run_dir)
    return run_dir, summary


def publish(cfg: Config, run_dir: Path) -> Optional[str]:
    """The run's reports as MLflow artifacts and its exported model as a new version of the registered model
    (run.registered_model_name, else the experiment's name); returns its models:/ URI. A failure is a warning: the
    run itself succeeded."""
    uri = tracking.tracking_uri(cfg.run.mlflow_uri, cfg.run.runs_dir)
    try:
        tracking.log_reports(uri, run_dir)
        model = tracking.register_model(uri, run_dir, cfg.run.registered_model_name or cfg.run.experiment)
    except Exception as e:
        log.warning("MLflow: the run's reports or model were not logged: %s", e)
        return None
    say(f"[run] model registered: {model}", flush=True)
    return model


@exit_on_data_error
def main(argv=None) -> None:
    setup_logging()
    cfg = parse_args(argv, description=__doc__)
    run_dir, summary = run_pipeline(cfg)
    say(f"\nrun {cfg.run.name}: {run_dir}")
    say(json.dumps(summary["timings"]))
    say(
        f"macro_f1={summary['macro_f1']:.4f} weighted_f1={summary['weighted_f1']:.4f} "
        f"accuracy={summary['accuracy']:.4f} n={summary['n']}"
    )


if __name__ == "__main__":
    main()
