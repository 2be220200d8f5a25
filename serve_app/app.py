"""The Ray Serve application: one deployment that owns a vLLM engine (inside the replica, or in a process of its
own: engine.process) and serves the FastAPI app of serve_app/api.py.

    serve run serve_app/config.yaml          # locally (make serve), stop with `serve shutdown -y`
    serve deploy serve_app/config.yaml       # on a running cluster

`build_app(args)` is the application builder named in the YAML; `args` is a `textclf.serving.ServeConfig`.
Autoscaling, max_ongoing_requests and replica resources live in the YAML's `deployments:` section.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import RayServeException

from serve_app.api import create_api
from serve_app.autoscaling import UNSERVED
from serve_app.cpu_placement import bind_cores, engine_on_its_cores
from serve_app.engine import VllmEngine
from serve_app.engine_preload import engine_from_server, preloads, start_server
from serve_app.inline_engine import InlineEngine
from serve_app.metrics import serve_metrics
from serve_app.replica_gate import Door, open_door
from serve_app.replica_logs import log_buffers_kept
from textclf.collector import collector_paused
from textclf.serving import (
    Classifiers,
    ServeConfig,
    engine_needs_tokenizer,
    load_classifiers,
    pin_model,
    resolve_plan,
)

log = logging.getLogger("ray.serve")
DEPLOYMENT = "Classifier"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


@serve.deployment(
    name=DEPLOYMENT,
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()  # the FastAPI app is built per replica, over its engine (__serve_build_asgi_app__)
class ClassifierServer:
    def __init__(self, config: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(config)
        self.plan = resolve_plan(self.cfg)
        mask = bind_cores(self.cfg)
        t0 = time.time()
        with log_buffers_kept(), collector_paused():
            if preloads(self.cfg):  # before this process imports anything heavy (serve_app/engine_preload.py)
                with engine_on_its_cores(mask):
                    start_server()  # on the engine's cores, which the engine's process inherits from it
            loaded = load_classifiers(self.plan)  # first: their requests say whether vLLM loads a tokenizer too
            self.engine = self.start_engine(mask, engine_needs_tokenizer(loaded))
            self.classifiers = Classifiers(self.cfg, self.plan, self.engine, loaded=loaded)
            self.metrics = serve_metrics()  # in the replica: Serve's metric classes tag it with the replica's name
            self.metrics.limit(self.classifiers.admission.limit)
            self.classifiers.admission.on_change = self.metrics.limit
            door = Door(self.classifiers.admission, max_ongoing_requests, self.cfg.retry_after_s, self.metrics.refused)
            open_door(door)  # the refusal on the replica's own port (serve_app/replica_gate.py)
            log.info(
                "textclf: engine %s ready in %.1fs (%s, classifiers %s, cores %s)",
                self.plan.engine_model,
                time.time() - t0,
                "inline" if self.cfg.engine.process == "inline" else "separate process",
                self.classifiers.names,
                mask,
            )

    def start_engine(self, mask: Optional[str], tokenizer: bool):
        if self.cfg.engine.process == "inline":
            return InlineEngine(self.plan, self.cfg, tokenizer)  # its thread binds its own cores as it builds it
        if preloads(self.cfg):
            with engine_from_server(self.cfg.engine.nice):  # forked from the server above, on the engine's cores
                return VllmEngine(self.plan, self.cfg, tokenizer)
        with engine_on_its_cores(mask):  # spawned: the engine's process inherits the cores of the call
            return VllmEngine(self.plan, self.cfg, tokenizer)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.classifiers, self.metrics)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's autoscaling reads besides its own count (serve_app/autoscaling.py): the requests this replica
        turned away, as those they would have kept in progress."""
        return {UNSERVED: self.classifiers.admission.unserved()}

    async def check_health(self) -> None:
        """Ray Serve's periodic check: a dead engine, or one that answers no probe text in time, fails it and Serve
        replaces the replica (health_probe_timeout_s, under the deployment's health_check_timeout_s)."""
        await self.classifiers.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def max_ongoing_requests() -> Optional[int]:
    """Serve's max_ongoing_requests of this replica, as last (re)configured; None outside a replica. Ray 2.60's
    ReplicaContext keeps the deployment config private."""
    try:
        return serve.get_replica_context()._deployment_config.max_ongoing_requests
    except (RayServeException, AttributeError):  # not in a replica, or a Ray that moved it: no cap
        return None


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder of serve_app/config.yaml. The config is checked here, so a bad one fails
    `serve run` at once; the run folder (args.run, else $TEXTCLF_RUN, else the latest run) is fixed here too."""
    cfg = ServeConfig.model_validate(args or {})
    cfg = pin_model(cfg, resolve_plan(cfg))  # raises on missing folders, mismatched base models
    return ClassifierServer.bind(cfg.model_dump())


def app_from_config(
    path: str | os.PathLike = DEFAULT_CONFIG, deployment_overrides: Optional[dict] = None, **arg_overrides
) -> serve.Application:
    """The application as the YAML defines it (args and deployment options), for `serve.run` from Python."""
    conf = yaml.safe_load(Path(path).read_text())
    app = conf["applications"][0]
    args = {**(app.get("args") or {}), **arg_overrides}
    cfg = ServeConfig.model_validate(args)
    cfg = pin_model(cfg, resolve_plan(cfg))
    opts = next((dict(d) for d in app.get("deployments", []) if d.get("name") == DEPLOYMENT), {})
    opts.pop("name", None)
    opts.update(deployment_overrides or {})
    return ClassifierServer.options(**opts).bind(cfg.model_dump())
