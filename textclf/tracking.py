"""Experiment tracking with MLflow: one MLflow run per pipeline run, a local file store unless a server is given.

The driver opens the run and logs the configuration; the rank-0 training worker logs training curves into it
(transformers' MLflowCallback, pointed at it by MLFLOW_RUN_ID); evaluation adds the test metrics.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

RUN_ID_FILE = "mlflow_run_id"


def _allow_file_store(uri: str) -> dict[str, str]:
    """MLflow 3 refuses its file store unless told otherwise; a local folder is the zero-setup default here."""
    env = {"MLFLOW_ALLOW_FILE_STORE": "true"} if uri.startswith("file:") else {}
    os.environ.update(env)
    return env


def tracking_uri(mlflow_uri: Optional[str], runs_dir: str) -> str:
    if mlflow_uri:
        return mlflow_uri
    from .storage import cache_dir, is_uri

    # A runs_dir URI holds no file store: keep it in that URI's local cache (a cluster wants --mlflow-uri anyway).
    return ((cache_dir(runs_dir) if is_uri(runs_dir) else Path(runs_dir).resolve()) / "mlruns").as_uri()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], run_dir: Path) -> str:
    """Open (or, for a resumed run, reopen) the MLflow run of this run folder; returns its id."""
    import mlflow

    _allow_file_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    id_file = Path(run_dir) / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        if not run_id:
            mlflow.log_params(_flatten(params))
        id_file.write_text(run.info.run_id)
        return run.info.run_id


def log_metrics(uri: str, run_dir: Path, metrics: dict[str, float]) -> None:
    id_file = Path(run_dir) / RUN_ID_FILE
    if not id_file.exists():
        return
    import mlflow

    _allow_file_store(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=id_file.read_text().strip()):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def worker_env(uri: str, experiment: str, run_id: str) -> dict[str, str]:
    """Environment for transformers' MLflowCallback to log into the driver's run."""
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment, "MLFLOW_RUN_ID": run_id,
            **_allow_file_store(uri)}
