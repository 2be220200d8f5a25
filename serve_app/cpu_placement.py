"""Where a replica's vLLM CPU engine computes: its own cores on the node (VLLM_CPU_OMP_THREADS_BIND), with the
engine's processes started on them and the replica's own threads moved off them."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import ray

from textclf.inference import bind_engine_cores, cores_of, on_gpu
from textclf.serving import ServeConfig

log = logging.getLogger("ray.serve")

_core_locks: list[int] = []  # file descriptors held for the life of this replica process


def replica_cpus() -> int:
    """The CPUs Ray assigned to this replica (1 outside a Ray actor)."""
    try:
        return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    except Exception:
        return 1


def bind_cores(cfg: ServeConfig) -> Optional[str]:
    """Bind the engine (bind_engine_cores) before it starts, so that replicas on one node do not all bind to the
    same cores. "slot": take `cores_per_replica` cores nobody else on the node holds (a lock file per core, held by
    this process and its engine, released when they exit)."""
    if on_gpu():
        return None
    if cfg.cpu_binding != "slot":
        bind_engine_cores(cfg.cpu_binding)
        return cfg.cpu_binding
    cores = sorted(os.sched_getaffinity(0))
    want = cfg.cores_per_replica if cfg.cores_per_replica is not None else replica_cpus()
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
    bind_engine_cores(mask)
    return mask


@contextmanager
def engine_on_its_cores(mask: Optional[str]) -> Iterator[None]:
    """Start the engine's processes on its own cores, then move this replica's threads off them (an engine in a
    process of its own, engine.process separate; an inline engine's thread binds its cores itself).

    The engine's processes (EngineCore, with the model worker inside it on CPU, or beside it in a process of its own
    with VLLM_ENABLE_V1_MULTIPROCESSING=1) then compute and poll on those cores instead of taking CPU from the replica
    and the load (serve_app/README.md, "Serving performance"). The affinity is the spawning thread's, inherited by the
    processes it starts."""
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
