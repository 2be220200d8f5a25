"""What every step shares: Ray start-up, the run folder, logging."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from textclf import runs, storage
from textclf.config import PROJECT_ROOT, Config
from textclf.data import Splits
from textclf.export import latest_run

from . import console

log = logging.getLogger("ray_jobs")

# Environment for Ray workers. The print patch makes each training worker log thousands of lines of bytecode from
# `datasets` fingerprinting; tokenizer threads would oversubscribe the cores Ray hands out.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
    "PYTHONPATH": str(PROJECT_ROOT),
}
WORKER_SETUP_HOOK = "ray_jobs.console.quiet_ray_workers"  # run by every worker of the job


def setup_logging() -> None:
    """Log records to the run's log file and, the user-facing ones, to the console (ray_jobs/console.py); the step's
    stdout and stderr follow once its run folder is known (log_to_run)."""
    console.setup()


def log_to_run(cfg: Config, run_dir: Path) -> None:
    """<run>/logs/<step>.log from now on (mirrored with the run folder); --verbose: the console shows it all too."""
    step = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    console.attach(run_dir / "logs" / f"{step or 'textclf'}.log", cfg.run.verbose)


def init_ray(cfg: Config) -> None:
    """Join the configured cluster (--ray-address, else RAY_ADDRESS, which `ray job submit` sets) or start an embedded
    single-node Ray."""
    import ray

    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)  # the local raylet's workers inherit this
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=cluster_runtime_env(), log_to_driver=True)
    else:
        # Ray starts workers at nice 15; on a workstation the job is the foreground work, so it gets a fair share
        # of the cores against whatever else runs (read when the raylet starts).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # No runtime env: Ray prepares one before each worker starts, which kept the evaluation actor from its
        # constructor 0.4 s longer (bench/results/eval-actor-cost.md). The new raylet's workers inherit this
        # environment, the setup hook included; "local" never joins a cluster that `ray start` left running.
        paths = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if p]
        if str(PROJECT_ROOT) not in paths:  # the user's own path kept, the project's added (bench/ is not installed)
            os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *paths])
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR  # what a runtime env's hook sets

        os.environ.setdefault(WORKER_PROCESS_SETUP_HOOK_ENV_VAR, WORKER_SETUP_HOOK)
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    if not cfg.run.verbose:  # Ray Data's progress every few seconds says nothing the step's own lines do not
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("ray resources: %s", ray.cluster_resources())


def cluster_runtime_env() -> dict:
    """The job's runtime env on a cluster, whose workers do not inherit the driver's environment. Under `ray job
    submit` Ray refuses env var keys, and a second hook, that the job's runtime env already sets: those are left to
    it."""
    job_runtime_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    job_env = job_runtime_env.get("env_vars") or {}
    env: dict = {"env_vars": {k: v for k, v in WORKER_ENV.items() if k not in job_env}}
    if "worker_process_setup_hook" not in job_runtime_env:
        env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    return env


def start_run(cfg: Config, splits: Splits, trains: bool = False) -> Path:
    """Name the run (a timestamp unless given), claim its folder and record the resolved configuration.

    A run already under that name is resumed only when this one is the same (textclf.runs: the model's config keys,
    the label set, the splits) or on_existing is resume; overwrite removes it first (folder, URI mirror, Ray Train's
    checkpoints). A step that trains (trains=True), or resumes another setup, also removes what later steps write, so
    that an earlier attempt's model or metrics can never pass for this one's.
    """
    if not cfg.run.name:
        cfg.run.name = time.strftime("%Y%m%d-%H%M%S")
    new = runs.fingerprint(cfg.to_dict(), splits)
    if cfg.run.on_existing == "overwrite":
        gone = _remove(cfg, None)
        if gone:
            log.info("run %s overwritten: removed %s", cfg.run.name, ", ".join(gone))
    run_dir = open_run(cfg) if cfg.run_uri else cfg.run_dir.resolve()
    old = runs.recorded(run_dir)
    how = runs.check(old, new, cfg.run.on_existing, cfg.run.name)
    if how == "resume":
        log.warning(
            "run %s resumed on another setup (on_existing=resume): %s",
            cfg.run.name,
            "; ".join(f"{k}: {', '.join(v)}" for k, v in runs.differences(old, new).items() if v),
        )
    if trains or how == "resume":  # outputs of another setup describe neither run
        gone = _remove(cfg, runs.OUTPUTS)
        if gone:
            log.info("removed the outputs of an earlier attempt: %s", ", ".join(gone))
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.record(run_dir, new, old)
    saved = Config.from_dict(cfg.to_dict())
    saved.run.on_existing = "refuse"  # a rerun from this file must not overwrite or stretch the run by itself
    saved.save(run_dir / "config.yaml")
    log_to_run(cfg, run_dir)
    sync_run(cfg, run_dir)
    return run_dir


def _remove(cfg: Config, names: Optional[tuple[str, ...]]) -> list[str]:
    """Delete the run (names None: all of it, Ray Train's checkpoints included) or the named entries of it, in its
    local folder and in its URI mirror."""
    places = [str(cfg.run_dir.resolve()), *([cfg.run_uri] if cfg.run_uri else [])]
    if names is None and cfg.run.storage_path:  # checkpoints kept apart from the run folder
        places.append(storage.join(storage_path(cfg, cfg.run_dir), storage.CHECKPOINTS))
    return [p for place in places for p in storage.remove(place, names)]


def open_run(cfg: Config) -> Path:
    """The local folder of an existing run: --name, else the latest exported run under runs_dir. A run behind a URI
    is fetched into its local cache first (without Ray Train's checkpoints)."""
    if cfg.run_uri:
        run_dir = storage.download(cfg.run_uri, cfg.run_dir).resolve()
    elif storage.is_uri(cfg.run.runs_dir):
        raise ValueError(f"runs_dir {cfg.run.runs_dir} is a URI: name the run with --name")
    else:
        run_dir = (cfg.run_dir if cfg.run.name else latest_run(Path(cfg.run.runs_dir))).resolve()
    log_to_run(cfg, run_dir)
    return run_dir


def storage_path(cfg: Config, run_dir: Path) -> str:
    """Ray Train storage: <storage_path>/<run name> (a path every node sees, or an s3:// / gs:// URI), else the run's
    URI when runs_dir is one, else the local run folder (enough on one machine)."""
    if cfg.run.storage_path:
        return storage.join(cfg.run.storage_path, cfg.run.name)
    return cfg.run_uri or str(run_dir)


def sync_run(cfg: Config, run_dir: Path) -> None:
    """Mirror the run folder to its URI after a step (nothing to do for a local runs_dir)."""
    if cfg.run_uri:
        storage.upload(run_dir, cfg.run_uri)
