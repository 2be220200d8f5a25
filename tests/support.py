"""What the tests share besides fixtures: the label set, the small pipeline run's arguments, a pipeline step in a
subprocess, and apps deployed on a test module's local Ray + Serve (serve_app/local.py's LocalServe)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx

from serve_app.local import LocalServe, our_replica_processes, our_vllm_processes, wait_gone, wait_no_vllm

ROOT = Path(__file__).resolve().parent.parent

DOMAINS = [
    "auto_and_commute",
    "banking",
    "credit_cards",
    "home",
    "kitchen_and_dining",
    "meta",
    "small_talk",
    "travel",
    "utility",
    "work",
]

# The small run of the real pipeline (2 Ray Train workers, 4 steps, vLLM evaluation) behind conftest's tiny_pipeline.
SMALL = [
    "--max-train-examples",
    "40",
    "--max-eval-examples",
    "30",
    "--num-workers",
    "2",
    "--per-device-batch-size",
    "2",
    "--max-steps",
    "4",
    "--eval-steps",
    "2",
    "--save-steps",
    "2",
    "--logging-steps",
    "1",
    "--warmup-steps",
    "1",
    "--kv-cache-gib",
    "0.25",
    "--max-num-seqs",
    "32",
]


def run_step(step: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"ray_jobs.{step}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# abstain_threshold 0: the tests check labels; the tiny run's own threshold (classifier.json) would withhold some.
TEST_ARGS = {
    "request_timeout_s": 300,
    "max_text_chars": 5000,
    "max_batch": 40,
    "max_body_bytes": 65536,
    "abstain_threshold": 0.0,
    "engine": {"kv_cache_gib": 0.25, "max_num_seqs": 32},
}
# One replica of one CPU: the test cluster's 2 CPUs hold a module's app and one test's own app at a time.
ONE_REPLICA = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
}


INLINE_ENGINE = {"engine": {**TEST_ARGS["engine"], "process": "inline"}}  # the engine inside the replica process


def run_app(run: Path, deployment: dict = ONE_REPLICA, **args: Any) -> Any:
    """The app of serve_app/config.yaml serving `run`, with the tests' arguments (and `args` over them) and these
    deployment options."""
    from serve_app.app import app_from_config

    return app_from_config(run=str(run), **{**TEST_ARGS, **args}, deployment_overrides=deployment)


@dataclass
class Deployed:
    name: str
    client: httpx.Client
    engines: list[int]  # the app's vLLM processes when it came up (none with an inline engine)
    others: set[int]  # the vLLM processes already running before it (other apps' engines)
    replicas: list[int]  # its Serve replica processes (an inline engine runs in each)
    deleted: bool = False

    def delete(self, timeout: float = 60) -> None:
        """Delete the app and wait until the vLLM processes started since its deployment and its replica processes
        have exited (raises)."""
        from ray import serve

        self.deleted = True
        serve.delete(self.name)
        wait_no_vllm(timeout=timeout, besides=self.others)
        left = wait_gone(lambda: set(self.replicas) & set(our_replica_processes()), timeout)
        if left:
            raise RuntimeError(f"replica processes still running after {timeout}s: {left}")


@contextmanager
def deployed(cluster: LocalServe, app: Any, name: str, timeout: float = 120) -> Iterator[Deployed]:
    """Deploy `app` as application `name` (route /, or /<name> for any other name, so apps can share the cluster);
    delete it on exit. Apps on one cluster are deployed one at a time, so new vLLM processes are this app's."""
    prefix = "/" if name == "textclf" else f"/{name}"
    others, other_replicas = set(our_vllm_processes()), set(our_replica_processes())
    t0 = time.time()
    cluster.run(app, name=name, route_prefix=prefix)
    print(f"\n[serve] app {name} up in {time.time() - t0:.1f}s")
    engines = sorted(set(our_vllm_processes()) - others)
    replicas = sorted(set(our_replica_processes()) - other_replicas)
    with httpx.Client(base_url=cluster.proxy_url + prefix, timeout=timeout) as client:
        served = Deployed(name, client, engines, others, replicas)
        try:
            yield served
        finally:
            if not served.deleted:
                served.delete()


async def classify_stub(classify) -> tuple[Any, str]:
    """An aiohttp server on a free loopback port whose POST /classify is `classify` (a request handler), for the
    load clients' unit tests: (runner, url); `await runner.cleanup()` stops it."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/classify", classify)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
