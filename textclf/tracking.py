"""Experiment tracking with MLflow: one MLflow run per pipeline run, a local file store unless a server is given.

The driver opens the run and logs the configuration; the rank-0 training worker logs training curves into it
(transformers' MLflowCallback, pointed at it by MLFLOW_RUN_ID); evaluation adds the test metrics; the pipeline
then logs the reports as artifacts and registers the exported model as a new version of a registered model, which
`models:/<name>/<version>` (or `/latest`, or `@<alias>`) names to the server and to evaluation (resolve_model_uri).
The registry lives with the tracking store: mlflow-skinny's file store has one (no database needed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

RUN_ID_FILE = "mlflow_run_id"
# What a run folder holds for a reader: logged as artifacts of the run's MLflow run when present.
REPORTS = (
    "report.md",
    "confusion_matrix.png",
    "reliability.png",
    "predictions.jsonl",
    "metrics.json",
    "data_report.json",
)
MODEL_ARTIFACT = "model"
FLAVOR = "textclf"  # the MLmodel flavor: metadata only, the project's own server and evaluation load the folder
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))/?$")


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
    return {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "MLFLOW_RUN_ID": run_id,
        **_allow_file_store(uri),
    }


def _client(uri: str):
    import mlflow

    _allow_file_store(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _run_id(run_dir: Path) -> Optional[str]:
    id_file = Path(run_dir) / RUN_ID_FILE
    return id_file.read_text().strip() if id_file.exists() else None


def exported_model(run_dir: Path) -> Path:
    """What a run registers: merged/ (servable alone, whatever the kind), else adapter/."""
    from .export import META_FILE

    for sub in ("merged", "adapter"):
        if (Path(run_dir) / sub / META_FILE).exists():
            return Path(run_dir) / sub
    raise FileNotFoundError(f"{run_dir}: no exported model (merged/ or adapter/)")


def log_reports(uri: str, run_dir: Path) -> list[str]:
    """The run folder's reports (REPORTS, those present) into its MLflow run; a rerun replaces them."""
    run_id = _run_id(run_dir)
    if not run_id:
        return []
    client = _client(uri)
    logged = [name for name in REPORTS if (Path(run_dir) / name).is_file()]
    for name in logged:
        client.log_artifact(run_id, str(Path(run_dir) / name))
    return logged


def register_model(uri: str, run_dir: Path, name: str) -> str:
    """Copy the run's exported model into its MLflow run (with an MLmodel file) and register it as a new version of
    `name`; returns models:/<name>/<version>. A resumed run's model gets a new artifact path: a version's files never
    change once registered."""
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from .export import META_FILE

    run_id = _run_id(run_dir)
    if not run_id:
        raise FileNotFoundError(f"{run_dir}: no MLflow run ({RUN_ID_FILE})")
    folder = exported_model(run_dir)
    meta = json.loads((folder / META_FILE).read_text())
    client = _client(uri)
    taken = {Path(a.path).name for a in client.list_artifacts(run_id)}
    path = next(p for p in (MODEL_ARTIFACT, *(f"{MODEL_ARTIFACT}-{i}" for i in range(2, 10_000))) if p not in taken)
    client.log_artifacts(run_id, str(folder), path)
    with tempfile.TemporaryDirectory() as d:
        model = Model(artifact_path=path, run_id=run_id)
        model.add_flavor(
            FLAVOR,
            classifier=META_FILE,
            kind=meta.get("kind"),
            model_kind=meta.get("model_kind"),
            base_model=meta.get("base_model"),
            labels=len(meta.get("labels", [])),
        )
        model.save(str(Path(d) / "MLmodel"))
        client.log_artifact(run_id, str(Path(d) / "MLmodel"), path)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
    version = client.create_model_version(name, source, run_id=run_id)
    return f"models:/{version.name}/{version.version}"


def is_model_uri(p: object) -> bool:
    return str(p).startswith("models:/")


def default_registry_uri() -> str:
    """MLFLOW_REGISTRY_URI, else MLFLOW_TRACKING_URI, else the pipeline's default store (<project>/runs/mlruns)."""
    from .config import PROJECT_ROOT

    env = os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    return env or tracking_uri(None, str(PROJECT_ROOT / "runs"))


def resolve_model_uri(uri: str, registry_uri: Optional[str] = None) -> Path:
    """A registered model version (models:/<name>/<version>, /latest or @<alias>) as a local folder, named after the
    model: its files at the top (a model folder: `model_dir`, evaluation) and the same files in merged/ or adapter/
    (a run folder: `run`, `adapters`, TEXTCLF_RUN). A local store's files are linked, a remote one's downloaded once
    into the cache (<cache>/registry/<name>/<version>/<name>)."""
    from .export import META_FILE
    from .models import cache_root

    m = MODEL_URI.match(uri)
    if not m:
        raise ValueError(f"{uri!r}: not models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>")
    reg = registry_uri or default_registry_uri()
    client, name = _client(reg), m["name"]
    if m["alias"]:
        version = client.get_model_version_by_alias(name, m["alias"]).version
    elif m["version"] == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise FileNotFoundError(f"{uri}: model {name!r} has no versions in {reg}")
        version = max(int(v.version) for v in versions)
    else:
        version = m["version"]
    source = client.get_model_version_download_uri(name, str(version))
    key = hashlib.sha256(reg.encode()).hexdigest()[:12]  # one cache per registry: two stores reuse names
    home = cache_root() / "registry" / key / re.sub(r"[^\w.-]", "_", name) / str(version)
    folder = home / home.parent.name
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f".{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # replicas on one node resolve together
        stamp = home / ".source"
        if (folder / META_FILE).exists() and stamp.exists() and stamp.read_text() == source:
            return folder
        tmp = home.parent / f".{version}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        files = _fetch(source, tmp / "files", reg)
        kind = json.loads((files / META_FILE).read_text()).get("kind")
        sub = tmp / folder.name / ("adapter" if kind == "adapter" else "merged")
        sub.parent.mkdir(parents=True)
        if files.parent == tmp / "files":  # downloaded: moved in
            files.rename(sub)
            shutil.rmtree(tmp / "files")
        else:
            sub.symlink_to(files, target_is_directory=True)
        for f in sub.iterdir():
            (sub.parent / f.name).symlink_to(Path(sub.name) / f.name)
        (tmp / ".source").write_text(source)
        shutil.rmtree(home, ignore_errors=True)
        tmp.rename(home)
    return folder


def _fetch(source: str, dst: Path, registry_uri: str) -> Path:
    """A model version's files: the folder itself for a local store, else a download under dst."""
    from urllib.parse import unquote, urlparse

    local = Path(unquote(urlparse(source).path)) if source.startswith("file:") else Path(source)
    if (source.startswith("file:") or "://" not in source) and local.is_dir():
        return local.resolve()
    import mlflow

    dst.mkdir(parents=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=registry_uri))
