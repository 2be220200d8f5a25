"""`textclf.serving.Engine` with vLLM's engine inside the replica process (`engine.process: inline`): one thread
builds an LLMEngine and steps it while requests are in flight. There is no EngineCore process to spawn, which imports
vLLM and torch a second time, so a replica serves sooner; but the engine's Python shares the replica's GIL, so it
serves fewer requests/s than the default (serve_app/README.md, "Where the engine runs")."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from typing import Any, Optional

from serve_app.engine import engine_setup
from textclf.inference import engine_output
from textclf.serving import ClassifierSpec, ServeConfig, ServingPlan

log = logging.getLogger("ray.serve")
IDLE_WAIT_S = 0.2  # how often an idle engine thread looks at its stop flag


class InlineEngine:
    """Requests reach the engine thread through a queue; each answer settles an asyncio future on the caller's
    loop. A failure of the thread fails every request in flight and marks the engine errored."""

    def __init__(self, plan: ServingPlan, cfg: ServeConfig, tokenizer: bool = True):
        from vllm.engine.arg_utils import EngineArgs

        kw, self.loras, loggers = engine_setup(plan, cfg, tokenizer)
        kw["disable_log_stats"] = loggers is None  # LLMEngine keeps statistics only with log_stats
        self.runner = plan.runner
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}  # the engine thread's own
        self._failure: Optional[BaseException] = None
        self._stop = threading.Event()
        built = threading.Event()
        args = (EngineArgs(**kw), loggers, built)
        self._thread = threading.Thread(target=self._serve, args=args, name="textclf-engine", daemon=True)
        self._thread.start()
        built.wait()
        if self._failure is not None:
            raise self._failure

    def _serve(self, engine_args: Any, loggers: Optional[list], built: threading.Event) -> None:
        """The engine thread. vLLM's CPU worker binds the OpenMP threads of the thread that builds it
        (VLLM_CPU_OMP_THREADS_BIND), so this thread builds the engine and runs every step."""
        from vllm.v1.engine.llm_engine import LLMEngine

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, not a child
        logging.getLogger("vllm.v1.metrics.loggers").setLevel(logging.WARNING)  # no periodic stats lines
        try:
            self.engine = LLMEngine.from_engine_args(engine_args, stat_loggers=loggers)
        except BaseException as exc:
            self._failure = exc
            built.set()
            return
        built.set()
        try:
            while not self._stop.is_set():
                self._take(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            self._settle(out.request_id, out, None)
        except BaseException as exc:
            self._failure = exc
            log.error("textclf: the engine thread failed: %r", exc)
        finally:
            self._fail_all(self._failure or RuntimeError("the engine was shut down"))
            self.engine.engine_core.shutdown()

    def _take(self, block: bool) -> None:
        """Hand the queued requests and cancellations to the engine; waits a little for one when block."""
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            if item[0] == "abort":
                if self._waiting.pop(item[1], None) is not None:
                    self.engine.abort_request([item[1]])
            else:
                _, rid, prompt, params, lora, loop, fut = item
                self._waiting[rid] = (loop, fut)
                try:
                    self.engine.add_request(rid, prompt, params, lora_request=lora)
                except Exception as exc:  # this request's own fault (e.g. its params): only it fails
                    self._settle(rid, None, exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None

    def _settle(self, rid: str, out: Any, exc: Optional[BaseException]) -> None:
        waiter = self._waiting.pop(rid, None)
        if waiter is not None:
            _resolve_on(waiter[0], waiter[1], out, exc)

    def _fail_all(self, exc: BaseException) -> None:
        for rid in list(self._waiting):
            self._settle(rid, None, exc)
        while True:  # requests queued after the last step: nothing will take them now
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _resolve_on(item[5], item[6], None, exc)

    async def complete(self, prompt_token_ids: list[int], params: Any, request_id: str, spec: ClassifierSpec) -> Any:
        if self.errored:
            raise RuntimeError(f"the engine has stopped: {self._failure!r}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        prompt = {"prompt_token_ids": prompt_token_ids}
        self._inbox.put(("add", request_id, prompt, params, self.loras.get(spec.name), loop, fut))
        try:
            final = await fut
        except asyncio.CancelledError:  # the caller's deadline: the engine stops computing it
            self._inbox.put(("abort", request_id))
            raise
        if final is None or not final.outputs:
            raise RuntimeError("the engine returned no output")
        return engine_output(self.runner, final)

    async def check_health(self) -> None:
        if self.errored:
            raise RuntimeError(f"the engine has stopped: {self._failure!r}")

    @property
    def errored(self) -> bool:
        return self._failure is not None or not self._thread.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _resolve_on(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, out: Any, exc: Optional[BaseException]) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, fut, out, exc)
    except RuntimeError:  # the caller's loop has closed: nobody waits for this answer
        pass


def _resolve(fut: asyncio.Future, out: Any, exc: Optional[BaseException]) -> None:
    if fut.done():  # cancelled by its caller meanwhile
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(out)
