"""What every step shares: Ray start-up, the run folder, logging."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from textclf.config import PROJECT_ROOT, Config

log = logging.getLogger("ray_jobs")

# Environment for Ray workers. The print patch makes each training worker log thousands of lines of bytecode from
# `datasets` fingerprinting; tokenizer threads would oversubscribe the cores Ray hands out.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
    "PYTHONPATH": str(PROJECT_ROOT),
}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray(cfg: Config) -> None:
    """Join RAY_ADDRESS (set by `ray job submit`) or start an embedded single-node Ray."""
    import ray

    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)  # the local raylet's workers inherit this
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": dict(WORKER_ENV)}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # Ray starts workers at nice 15; on a workstation the job is the foreground work, so it gets a fair share
        # of the cores against whatever else runs (read when the raylet starts).
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(include_dashboard=False, runtime_env=env, log_to_driver=True)
    log.info("ray resources: %s", ray.cluster_resources())


def start_run(cfg: Config) -> Path:
    """Name the run (a timestamp unless given), create its folder and record the resolved configuration."""
    if not cfg.run.name:
        cfg.run.name = time.strftime("%Y%m%d-%H%M%S")
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    return run_dir
