"""Where a load's CPU went: the CPU seconds every process on the machine used over a window, grouped by role, and
how long their threads waited for a core.

On a 2-core machine the serving stack, the engine and the load client share the cores, so req/s alone cannot say
what limits a server; the CPU milliseconds per answered request of each role can (a role near a whole core, or
all roles together near every core, is the limit). The wait (Linux's run-queue delay: ready to run, not running)
says who the others kept waiting: an answer cannot leave a replica faster than the replica gets a core. Processes
are grouped by the title Ray and vLLM give them; a process that started or ended within the window counts for the
part it was seen in.

    python -m bench.cpu_share --start-at EPOCH --duration S [--client PID]

prints the shares over that window as one JSON object (bench/chaos.py runs it through each overload).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
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
SERVERS = (
    ("vllm.entrypoints", "vLLM API server"),  # bench-serve's (a)
    ("bench.naive_wrapper", "naive wrapper"),  # bench-serve's (b)
    ("bench.chaos_probe", "chaos probe"),
)
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


def waited_s(pid: int) -> float:
    """Seconds the threads of `pid` alive now have waited for a core so far (0 where /proc has no schedstat)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):  # a thread that just ended
                pass
    except OSError:
        return 0.0
    return total / 1e9


def snapshot(client: Optional[int] = None) -> dict[int, tuple[str, float, float]]:
    """pid -> (role, CPU seconds so far (user + system, all threads), seconds its threads waited for a core so far).
    `client`: the load client's pid (default: this process)."""
    me = os.getpid() if client is None else client
    out: dict[int, tuple[str, float, float]] = {}
    for p in psutil.process_iter():
        try:
            t = p.cpu_times()
            out[p.pid] = (role(p, me), t.user + t.system, waited_s(p.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def shares(
    before: dict[int, tuple[str, float, float]],
    after: dict[int, tuple[str, float, float]],
    wall_s: float,
    requests: int,
) -> dict[str, dict[str, Optional[float]]]:
    """Per role: CPU seconds in the window, cores busy on average, CPU ms per answered request, and its threads
    waiting for a core on average (run-queue delay seconds per second); busiest first."""
    by_role: dict[str, list[float]] = {}
    for pid, (name, cpu, wait) in after.items():
        start = before[pid][1:] if pid in before and before[pid][0] == name else (0.0, 0.0)
        tot = by_role.setdefault(name, [0.0, 0.0])
        tot[0] += max(0.0, cpu - start[0])
        tot[1] += max(0.0, wait - start[1])
    everything = [sum(v[0] for v in by_role.values()), sum(v[1] for v in by_role.values())]
    rows = sorted(by_role.items(), key=lambda kv: -kv[1][0]) + [("all", everything)]
    per_s = (lambda x: round(x / wall_s, 2)) if wall_s > 0 else (lambda x: None)
    by_role_s = {
        name: {"cpu_s": round(s, 2), "cores": per_s(s), "waiting": per_s(w)}
        for name, (s, w) in rows
        if s > 0.005 or w > 0.005 or name == "all"
    }
    return per_request(by_role_s, requests)


def per_request(by_role: dict[str, dict], requests: int) -> dict[str, dict[str, Optional[float]]]:
    """`by_role` with each role's CPU ms per answered request (None without requests)."""
    return {
        name: {**r, "ms_per_request": round(1000 * r["cpu_s"] / requests, 2) if requests else None}
        for name, r in by_role.items()
    }


def table(by_role: dict[str, dict[str, Optional[float]]], cores: int = 0) -> str:
    cores = cores or os.cpu_count() or 1
    lines = [
        f"| process | cores busy (of {cores}) | CPU ms per request | threads waiting for a core |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {r['cores']} | {r['ms_per_request']} | {r.get('waiting')} |" for name, r in by_role.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start-at", type=float, default=0.0, help="time.time() the window opens (default: now)")
    ap.add_argument("--duration", type=float, required=True, help="seconds the window lasts")
    ap.add_argument("--client", type=int, default=None, help="the load client's pid (named 'load client')")
    a = ap.parse_args(argv)
    time.sleep(max(0.0, a.start_at - time.time()))
    client = a.client or -1  # not this process
    t0, before = time.perf_counter(), snapshot(client)
    time.sleep(max(0.0, a.duration - (time.perf_counter() - t0)))
    after = snapshot(client)
    print(json.dumps(shares(before, after, time.perf_counter() - t0, 0)))


if __name__ == "__main__":
    main()
