"""A replica's EngineCore process, forked from a server that imports vLLM while the replica does (CPU engines).

vLLM starts an AsyncLLM's EngineCore with multiprocessing's spawn on CPU: a fresh interpreter that imports torch and
vLLM again, seconds after the replica has imported them. Here a forkserver (multiprocessing's own, preloading vLLM's
engine modules) starts before the replica imports anything heavy, so the two imports run side by side, and vLLM's
EngineCore is forked from it, already imported (bench/results/engine-start.md, "The engine's process, preloaded").

Light imports only: the server must start before the replica imports torch.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
from contextlib import contextmanager
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import TYPE_CHECKING, Iterator, Sequence

from textclf.inference import no_compile_env, on_gpu

if TYPE_CHECKING:  # the server imports this module, so its imports stay light: textclf.serving is not needed there
    from textclf.serving import ServeConfig

# What an EngineCore process imports before it builds the engine (its target, executor and CPU worker); this module
# too, for the process class below. serve_app/engine_server.py imports them in the server.
ENGINE_MODULES = [
    "serve_app.engine_preload",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.cpu_worker",
]


class EnvironProcess(ForkServerProcess):
    """A forkserver child with the environment its parent had when it started it, as spawn gives: a forkserver's
    children otherwise inherit the server's, and vLLM sets variables for its engine just before it starts it. Its
    niceness is raised by `nice` (set by EnvironContext) before it runs anything: the threads it starts inherit it."""

    nice = 0

    def start(self) -> None:
        self._environ = dict(os.environ)
        super().start()

    def run(self) -> None:
        try:  # setproctitle (vLLM names its processes) finds the title's room only in an environment as exec left it
            import setproctitle

            setproctitle.getproctitle()
        except ImportError:
            pass
        os.environ.clear()
        os.environ.update(self._environ)
        if self.nice:
            os.nice(self.nice)
        super().run()


class EnvironContext(ForkServerContext):
    """The context vLLM starts its engine's processes from (engine_from_server): EnvironProcesses, niced by `nice`."""

    def __init__(self, nice: int = 0):
        self.nice = nice

    def Process(self, *args, **kwargs) -> EnvironProcess:  # noqa: N802 (multiprocessing's name)
        process = EnvironProcess(*args, **kwargs)
        process.nice = self.nice
        return process


def preloads(cfg: ServeConfig) -> bool:
    return cfg.engine.process == "separate" and cfg.engine.preload and not on_gpu()


def start_server(modules: Sequence[str] = ("serve_app.engine_server",)) -> None:
    """Start the forkserver, which imports `modules` (by default ENGINE_MODULES, with the collector paused) in the
    background with this process's environment and CPU affinity (both then the engine's); returns at once."""
    no_compile_env()  # read by torch as the server imports it
    multiprocessing.forkserver.set_forkserver_preload(list(modules))
    multiprocessing.forkserver.ensure_running()


@contextmanager
def engine_from_server(nice: int = 0) -> Iterator[None]:
    """vLLM starts its engine processes from the forkserver while inside (start_server first), niced by `nice`."""
    import vllm.v1.engine.utils as engine_utils

    spawning = engine_utils.get_mp_context
    engine_utils.get_mp_context = lambda: EnvironContext(nice)
    try:
        yield
    finally:
        engine_utils.get_mp_context = spawning
