"""Where a load's CPU went: the CPU seconds every process on the machine used over a window, grouped by role.

On a 2-core machine the serving stack, the engine and the load client share the cores, so req/s alone cannot say
what limits a server; the CPU milliseconds per answered request of each role can (a role near a whole core, or
all roles together near every core, is the limit). Processes are grouped by the title Ray and vLLM give them; a
process that started or ended within the window counts for the part it was seen in.
"""

from __future__ import annotations

import os
from typing import Optional

import psutil

# (title prefix, role), first match wins; the title is the process's command line as `ps` shows it.
ROLES = (
    ("ray::ServeReplica", "Serve replica"),
    ("ray::ProxyActor", "Serve proxy"),
    ("ray::HAProxyManager", "Serve HAProxy manager"),
    ("ray::ServeController", "Serve controller"),
    ("VLLM::EngineCore", "vLLM EngineCore"),
    ("VLLM::", "vLLM worker"),
    ("ray::", "Ray workers (other)"),
)
SERVERS = (("vllm.entrypoints", "vLLM API server"), ("bench.naive_wrapper", "naive wrapper"))  # bench-serve's (a), (b)
RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray_client_server")


def role(p: psutil.Process, me: int) -> str:
    if p.pid == me:
        return "load client"
    try:
        title = " ".join(p.cmdline()) or p.name()
        if p.name() == "haproxy":  # Serve's HAProxy ingress (its binary may live anywhere)
            return "HAProxy"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "other"
    for prefix, name in ROLES:
        if title.startswith(prefix):
            return name
    for part, name in SERVERS:
        if part in title:
            return name
    if any(d in title for d in RAY_DAEMONS):
        return "Ray daemons"
    return "other"


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far, user + system, all threads)."""
    me = os.getpid()
    out: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter():
        try:
            t = p.cpu_times()
            out[p.pid] = (role(p, me), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def shares(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall_s: float, requests: int
) -> dict[str, dict[str, Optional[float]]]:
    """Per role: CPU seconds in the window, cores busy on average, CPU ms per answered request; busiest first."""
    by_role: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        start = before[pid][1] if pid in before and before[pid][0] == name else 0.0
        by_role[name] = by_role.get(name, 0.0) + max(0.0, cpu - start)
    total = sum(by_role.values())
    rows = sorted(by_role.items(), key=lambda kv: -kv[1]) + [("all", total)]
    return {
        name: {
            "cpu_s": round(s, 2),
            "cores": round(s / wall_s, 2) if wall_s > 0 else None,
            "ms_per_request": round(1000 * s / requests, 2) if requests else None,
        }
        for name, s in rows
        if s > 0.005 or name == "all"
    }


def table(by_role: dict[str, dict[str, Optional[float]]], cores: int = 0) -> str:
    cores = cores or os.cpu_count() or 1
    lines = [f"| process | cores busy (of {cores}) | CPU ms per request |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['cores']} | {r['ms_per_request']} |" for name, r in by_role.items()]
    return "\n".join(lines)
