"""The Ray Serve application: one deployment that owns a vLLM `AsyncLLM` engine and carries the FastAPI ingress.

    serve run serve_app/config.yaml          # locally (make serve), stop with `serve shutdown -y`
    serve deploy serve_app/config.yaml       # on a running cluster

`build_app(args)` is the application builder named in the YAML; `args` is a `textclf.serving.ServeConfig`.
Autoscaling, max_ongoing_requests and replica resources live in the YAML's `deployments:` section.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from textclf.inference import engine_output
from textclf.serving import (
    BatchRequest,
    ClassifierSpec,
    Classifiers,
    ClassifyRequest,
    ErrorBody,
    Prediction,
    ServeConfig,
    ServingError,
    ServingPlan,
    pin_model,
    resolve_plan,
)

log = logging.getLogger("ray.serve")
DEPLOYMENT = "Classifier"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"

# ---------------------------------------------------------------------------------------------------------------
# the engine


class VllmEngine:
    """`textclf.serving.Engine` over a vLLM AsyncLLM; one LoRARequest per configured adapter."""

    def __init__(self, plan: ServingPlan, cfg: ServeConfig):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        from textclf.inference import engine_kwargs

        e = cfg.engine
        kw = engine_kwargs(plan.engine_model, plan.max_model_len, max_num_seqs=e.max_num_seqs, kv_cache_gib=e.kv_cache_gib,
                           gpu_memory_utilization=e.gpu_memory_utilization, enable_lora=plan.enable_lora,
                           max_loras=plan.max_loras, max_lora_rank=plan.max_lora_rank, runner=plan.runner)
        self.runner = plan.runner  # pooling: a classification head's class probabilities from AsyncLLM.encode
        kw["disable_log_stats"] = True
        self.loras = {s.name: LoRARequest(s.name, s.lora_id, s.adapter_dir)
                      for s in plan.classifiers.values() if s.adapter_dir}
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))

    async def complete(self, prompt_token_ids: list[int], params: Any, request_id: str, spec: ClassifierSpec) -> Any:
        final = None
        run = self.llm.encode if self.runner == "pooling" else self.llm.generate
        async for out in run({"prompt_token_ids": prompt_token_ids}, params, request_id=request_id,
                             lora_request=self.loras.get(spec.name)):
            final = out
        if final is None or not final.outputs:
            raise RuntimeError("the engine returned no output")
        return engine_output(self.runner, final)

    async def check_health(self) -> None:
        await self.llm.check_health()

    @property
    def errored(self) -> bool:
        return self.llm.errored

    def shutdown(self) -> None:
        self.llm.shutdown()


_core_locks: list[int] = []  # file descriptors held for the life of this replica process


def bind_cores(cfg: ServeConfig) -> Optional[str]:
    """Set VLLM_CPU_OMP_THREADS_BIND before the engine starts, so that replicas on one node do not all bind to the
    same cores. "slot": take `cores_per_replica` cores nobody else on the node holds (a lock file per core, held by
    this process and its engine, released when they exit)."""
    from textclf.inference import on_gpu

    if on_gpu():
        return None
    if cfg.cpu_binding != "slot":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_binding
        return cfg.cpu_binding
    cores = sorted(os.sched_getaffinity(0))
    want = cfg.cores_per_replica
    if want is None:
        try:
            import ray

            want = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        except Exception:
            want = 1
    want = max(1, min(want, len(cores)))
    lock_dir = Path(tempfile.gettempdir()) / f"textclf-cores-{os.getuid()}"
    lock_dir.mkdir(exist_ok=True)
    got: list[int] = []
    for core in cores:
        fd = os.open(lock_dir / f"core-{core}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _core_locks.append(fd)
        got.append(core)
        if len(got) == want:
            break
    if len(got) < want:  # more replicas than cores on this node: share, but say so
        log.warning("only %d free cores of %d wanted on this node; sharing cores %s", len(got), want, cores[:want])
        got = sorted(set(got) | set(cores[: want - len(got)]))[:want] if got else cores[:want]
    mask = ",".join(map(str, got))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = mask
    return mask


def cores_of(mask: Optional[str]) -> set[int]:
    """The cores a VLLM_CPU_OMP_THREADS_BIND list names ("0", "0,2", "0-3", "0-1|2-3"); empty for auto/nobind/all."""
    cores: set[int] = set()
    for part in (mask or "").replace("|", ",").split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return set()
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


@contextmanager
def engine_on_its_cores(mask: Optional[str]):
    """Start the engine's processes on its own cores, then move this replica's threads off them.

    vLLM's CPU engine is two processes: EngineCore and a worker whose threads compute on the bound cores. While
    the worker computes, EngineCore busy-polls for its answer (sched_yield for up to a second after each read). Left
    free, that poll took 0.7 of a core on 2 cores, from the worker, the replica and the load alike; on the worker's
    own core it yields to the worker and took 0.05 (serve_app/README.md, "Serving performance").
    The affinity is the spawning thread's, inherited by the processes it starts."""
    before = os.sched_getaffinity(0)
    engine = cores_of(mask) & before
    if not engine:
        yield
        return
    os.sched_setaffinity(0, engine)
    try:
        yield
    finally:
        rest = before - engine or before  # a replica on a node whose cores all went to engines shares them
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), rest)
            except OSError:  # a thread that just ended
                pass


# ---------------------------------------------------------------------------------------------------------------
# metrics (Prometheus text at GET /metrics, per replica): serve_app/state.py

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: E402

from serve_app import state  # noqa: E402

ENDPOINTS = {"/classify", "/classify/batch", "/health", "/ready", "/labels", "/metrics", "/docs", "/openapi.json"}

# ---------------------------------------------------------------------------------------------------------------
# the HTTP API

api = FastAPI(
    title="textclf",
    version="0.1.0",
    description="Text classification with a fine-tuned LLM (vLLM engine): the answer is always one of the "
                "classifier's labels (or null below the abstain threshold), with its probability.",
)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


class HttpEdge:
    """Request counts and latency for /metrics, and the body limit: bodies over max_body_bytes get 413, by
    Content-Length up front or while a chunked body is read. Plain ASGI on purpose: an `@app.middleware("http")`
    (Starlette's BaseHTTPMiddleware) runs each request through an extra task and stream, a cost that showed at
    hundreds of requests per second on 2 cores."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def send_status(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            limit = state.LIMITS["max_body_bytes"]
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                resp = JSONResponse({"error": f"request body over the limit of {limit} bytes"}, status_code=413)
                return await resp(scope, receive, send_status)
            seen = 0

            async def limited():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > limit:
                        raise BodyTooLarge(limit)
                return msg

            return await self.app(scope, limited, send_status)
        finally:
            state.REQUESTS.labels(endpoint, str(status)).inc()
            state.LATENCY.labels(endpoint).observe(time.perf_counter() - t0)


api.add_middleware(HttpEdge)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    # loc/msg/type only: the offending input can be a megabyte of text, not worth echoing
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
    return JSONResponse({"error": "invalid request", "detail": errors}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException):
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(ServingError)
async def _serving(request: Request, exc: ServingError):
    body = {"error": exc.message}
    if exc.detail is not None:
        body["detail"] = exc.detail
    return JSONResponse(body, status_code=exc.status)


ERRORS = {s: {"model": ErrorBody} for s in (404, 413, 422, 503)}


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, graceful_shutdown_timeout_s=30)
@serve.ingress(api)
class ClassifierServer:
    def __init__(self, config: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(config)
        state.LIMITS["max_body_bytes"] = self.cfg.max_body_bytes
        self.plan = resolve_plan(self.cfg)
        mask = bind_cores(self.cfg)
        t0 = time.time()
        with engine_on_its_cores(mask):
            self.engine = VllmEngine(self.plan, self.cfg)
        self.classifiers = Classifiers(self.cfg, self.plan, self.engine)
        log.info("textclf: engine %s ready in %.1fs (classifiers %s, cores %s)", self.plan.engine_model,
                 time.time() - t0, self.classifiers.names, mask)

    def _record(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            state.PREDICTIONS.labels(r["model"], r["label"] or "").inc()
            if r["truncated"]:
                state.TRUNCATED.labels(r["model"]).inc()

    @api.post("/classify", response_model=Prediction, responses=ERRORS,
              summary="Classify one text with a named classifier (default: the server's default)")
    async def classify(self, req: ClassifyRequest) -> dict[str, Any]:
        (r,) = await self.classifiers.classify([req.text], req.model, req.abstain_threshold)
        self._record([r])
        return r

    @api.post("/classify/batch", response_model=list[Prediction], responses=ERRORS,
              summary="Classify several texts (at most max_batch) with one classifier")
    async def classify_batch(self, req: BatchRequest) -> list[dict[str, Any]]:
        results = await self.classifiers.classify(req.texts, req.model, req.abstain_threshold)
        self._record(results)
        return results

    @api.get("/health", summary="Liveness: the replica process answers")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready", summary="Readiness: the engine is loaded and classifies a probe text",
             responses={503: {"model": ErrorBody}})
    async def ready(self):
        ok, reason = await self.classifiers.ready()
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    @api.get("/labels", summary="Each classifier's labels, and the default classifier")
    async def labels(self) -> dict[str, Any]:
        return {"default": self.plan.default, "classifiers": self.classifiers.labels(),
                "abstain_threshold": self.cfg.abstain_threshold, "abstain_thresholds": self.classifiers.thresholds(),
                "max_batch": self.cfg.max_batch,
                "max_text_chars": self.cfg.max_text_chars}

    @api.get("/metrics", summary="Prometheus metrics of this replica", response_class=PlainTextResponse)
    async def metrics(self):
        return PlainTextResponse(generate_latest(state.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def check_health(self) -> None:
        """Ray Serve's periodic check: a dead engine fails it and Serve replaces the replica."""
        if self.engine.errored:
            raise RuntimeError("vLLM engine is dead")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# builders


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder of serve_app/config.yaml. The config is checked here, so a bad one fails
    `serve run` at once; the run folder (args.run, else $TEXTCLF_RUN, else the latest run) is fixed here too."""
    cfg = ServeConfig.model_validate(args or {})
    cfg = pin_model(cfg, resolve_plan(cfg))  # raises on missing folders, mismatched base models
    return ClassifierServer.bind(cfg.model_dump())


def app_from_config(path: str | os.PathLike = DEFAULT_CONFIG, deployment_overrides: Optional[dict] = None,
                    **arg_overrides) -> serve.Application:
    """The application as the YAML defines it (args and deployment options), for `serve.run` from Python."""
    import yaml

    conf = yaml.safe_load(Path(path).read_text())
    app = conf["applications"][0]
    args = {**(app.get("args") or {}), **arg_overrides}
    cfg = ServeConfig.model_validate(args)
    cfg = pin_model(cfg, resolve_plan(cfg))
    opts = next((dict(d) for d in app.get("deployments", []) if d.get("name") == DEPLOYMENT), {})
    opts.pop("name", None)
    opts.update(deployment_overrides or {})
    return ClassifierServer.options(**opts).bind(cfg.model_dump())
