"""Benchmark, not a test: faults injected into a live local service under load, and what the clients saw.

    python -m bench.chaos [--model tiny-random-llama | --model runs/<name>] [--scenarios engine_killed,overload]
    make chaos ARGS="--scenarios overload --duration 30"

Each scenario gets a fresh application (serve_app/config.yaml, `--replicas` fixed replicas, default 2) in one local
Ray + Serve with the serving environment (serve_app.local: direct ingress), so no row inherits another's damage;
the app is deleted after each, and the vLLM processes still running then are counted and removed. The load is an
open loop at `--rate` requests/s (bench.chaos_client: each request retried once; it reports its own event loop's
delay beside the overload's latencies, and which part refused by each error answer's message). Through an overload
bench.chaos_probe, a process of its own, sends `--probe-rate` requests/s more and times each answer: the service's
latency without the load client's own delay, which the refusal goal is read from. Scenarios:

  engine_killed          SIGKILL the process that runs one replica's engine (through the Serve proxy): its EngineCore,
                         or the replica itself with engine.process inline
  engine_stopped         SIGSTOP it: the engine hangs, only a health check notices (proxy)
  replica_killed_proxy   SIGKILL one ServeReplica actor process (proxy)
  replica_killed_direct  the same, the client spreading over the replicas' own ports (direct ingress)
  overload               `--overload`x the sustainable rate (a closed-loop measure first) for `--duration` s (proxy)
  overload_direct        the same, the client spreading over the replicas' own ports (direct ingress)

"Seconds until full service again": from the fault (the end of the overload) until both the replica count is back
at its target with the faulted replica gone and no first attempt fails any more (the last failed first attempt's
answer); the load runs on `--settle` s beyond that. Prints a markdown table; writes bench/results/chaos-<model>.md
and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from bench import cpu_share
from bench.chaos_client import LoopLag, RetryingClient, last_failure, latencies, open_loop, percentiles_ms, tally
from bench.lean_http import LeanSession
from bench.loadtest import RESULTS, measure, test_texts, textclf_target
from bench.serve_compare import SERVE_ARG_HELP, classifier_folder, serve_args_from

APP = "textclf"


# ---------------------------------------------------------------------------------------------------------------
# processes


def engine_pids(replica_pid: int) -> list[int]:
    """The vLLM engine processes a replica started (its descendants among this run's vLLM processes)."""
    import psutil

    from serve_app.local import our_vllm_processes

    try:
        below = {p.pid for p in psutil.Process(replica_pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return []
    return [p for p in our_vllm_processes() if p in below]


def engine_processes(replica_pid: int) -> list[int]:
    """The processes that run a replica's engine: its vLLM children, or the replica itself when the engine is
    inline (engine.process)."""
    return engine_pids(replica_pid) or [replica_pid]


def raise_priority(nice: int = -10) -> int:
    """The load's thread (and those it starts) at `nice`, where allowed: on the service's own 2 cores a client at the
    replicas' priority measures its own CPU starvation under overload (a late send, a late read) as the service's
    latency. Returns the niceness it runs at."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # Linux: this thread only; threads started later inherit it
    except OSError:
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def event_loop_runner(name: str) -> Callable[[Any], Any]:
    """asyncio.run on the named event loop: "uvloop" (libuv's: the client costs less CPU) or "asyncio"."""
    if name == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie has exited)."""
    import psutil

    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def kill_engine(replica: dict) -> dict:
    pids = engine_processes(replica["pid"])
    for p in pids:
        os.kill(p, signal.SIGKILL)
    return {"signal": "SIGKILL", "pids": pids, "engines": pids}


def stop_engine(replica: dict) -> dict:
    pids = engine_processes(replica["pid"])
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    return {"signal": "SIGSTOP", "pids": pids, "engines": pids}


def kill_replica(replica: dict) -> dict:
    engines = engine_pids(replica["pid"])
    os.kill(replica["pid"], signal.SIGKILL)
    return {"signal": "SIGKILL", "pids": [replica["pid"]], "engines": engines}


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    ingress: str  # "proxy" or "direct"
    fault: Optional[Callable[[dict], dict]] = None  # None: the overload


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("engine_killed", "engine process killed", "proxy", kill_engine),
        Scenario("engine_stopped", "engine stopped (SIGSTOP)", "proxy", stop_engine),
        Scenario("replica_killed_proxy", "replica killed", "proxy", kill_replica),
        Scenario("replica_killed_direct", "replica killed", "direct", kill_replica),
        Scenario("overload", "overload", "proxy"),
        Scenario("overload_direct", "overload", "direct"),
    )
}


# ---------------------------------------------------------------------------------------------------------------
# the replicas, watched from the Serve controller


class ReplicaWatch(threading.Thread):
    """Samples the deployment's replicas (and the direct-ingress URLs) every `every` seconds."""

    def __init__(self, deployment: str, t0: float, every: float = 0.5):
        super().__init__(daemon=True)
        self.deployment, self.t0, self.every = deployment, t0, every
        self.samples: list[tuple[float, list[dict]]] = []
        self.urls: list[str] = []
        self.halt = threading.Event()

    def poll(self) -> None:
        from serve_app.local import ingress_urls, replicas, serve_details

        details = serve_details()
        reps = [
            {"id": r["replica_id"], "state": str(getattr(r["state"], "value", r["state"])), "pid": r.get("pid")}
            for r in replicas(APP, self.deployment, details)
        ]
        self.samples.append((time.perf_counter() - self.t0, reps))
        self.urls = ingress_urls(APP, details) or self.urls

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.poll()
            except Exception as exc:  # the controller is busy while it replaces replicas: keep polling
                print(f"    (replica poll: {type(exc).__name__})", flush=True)
            self.halt.wait(self.every)

    def running(self) -> list[dict]:
        return [r for r in (self.samples[-1][1] if self.samples else []) if r["state"] == "RUNNING"]

    def back_at(self, since: float, target: int, gone: Optional[str]) -> Optional[float]:
        """When, after `since`, the running replicas were `target` again without `gone`, and stayed so."""
        t_back = None
        for t, reps in self.samples:
            if t < since:
                continue
            running = {r["id"] for r in reps if r["state"] == "RUNNING"}
            ok = len(running) == target and gone not in running
            t_back = (t_back if t_back is not None else t) if ok else None
        return t_back

    def lifetimes(self) -> dict[str, dict[str, float]]:
        """Per replica: first seen, first RUNNING, last seen (seconds since t0)."""
        out: dict[str, dict[str, float]] = {}
        for t, reps in self.samples:
            for r in reps:
                d = out.setdefault(r["id"], {"seen": t})
                d["last"] = t
                if r["state"] == "RUNNING":
                    d.setdefault("running", t)
        return out


# ---------------------------------------------------------------------------------------------------------------
# one scenario


@dataclass
class Plan:
    rate: float  # the steady load, requests/s
    fault_at: float  # seconds after the load starts
    settle: float  # seconds of full service the load runs on after recovery
    max_recovery: float  # seconds after the fault to give up waiting
    overload_rate: float = 0.0
    overload_s: float = 0.0

    def rate_at(self, t: float) -> float:
        in_overload = self.overload_s and self.fault_at <= t < self.fault_at + self.overload_s
        return self.overload_rate if in_overload else self.rate

    @property
    def fault_end(self) -> float:
        return self.fault_at + self.overload_s


async def beside(cmd: list[str]) -> asyncio.subprocess.Process:
    """`cmd` from the project root, its output read by `printed`."""
    return await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])


async def printed(proc: Optional[asyncio.subprocess.Process]) -> Any:
    """The JSON a process started by `beside` printed once it ends (None: no process, or nothing printed)."""
    return json.loads((await proc.communicate())[0] or b"null") if proc is not None else None


class Run:
    """One scenario's load, fault and recovery on a freshly deployed app."""

    def __init__(self, sc: Scenario, plan: Plan, cluster: Any, target: int, bodies: list[bytes], a: Any):
        self.sc, self.plan, self.cluster, self.target, self.bodies, self.a = sc, plan, cluster, target, bodies, a
        self.fault: dict[str, Any] = {}
        self.victim: Optional[dict] = None
        self.gave_up = False
        self._checked = (float("-inf"), False)  # (t, verdict): the stop test runs per request, the check twice a second
        self.lag = LoopLag()
        self.probed: Optional[dict] = None  # what bench.chaos_probe saw through the overload
        self.cpu: Optional[dict] = None  # bench.cpu_share over the overload

    def urls(self, watch: ReplicaWatch) -> Callable[[], list[str]]:
        proxy = [self.cluster.proxy_url]
        return (lambda: watch.urls or proxy) if self.sc.ingress == "direct" else (lambda: proxy)

    async def inject(self, watch: ReplicaWatch, t0: float) -> None:
        await asyncio.sleep(max(0.0, self.plan.fault_at - (time.perf_counter() - t0)))
        if self.sc.fault is None:
            print(
                f"    {self.plan.fault_at:.0f} s: {self.plan.overload_rate:.0f} req/s for {self.plan.overload_s:.0f} s",
                flush=True,
            )
            return
        self.victim = sorted(watch.running(), key=lambda r: r["id"])[0]
        self.fault = {"t": round(time.perf_counter() - t0, 2), "replica": self.victim, **self.sc.fault(self.victim)}
        print(
            f"    {self.fault['t']:.0f} s: {self.fault['signal']} {self.fault['pids']} ({self.victim['id']})",
            flush=True,
        )

    def done(self, watch: ReplicaWatch, client: RetryingClient, t: float) -> bool:
        """Whether to stop the load: full service for `settle` s, or no recovery within `max_recovery` s."""
        if t - self._checked[0] < 0.5:
            return self._checked[1]
        self._checked = (t, self._recovered(watch, client, t))
        return self._checked[1]

    def _recovered(self, watch: ReplicaWatch, client: RetryingClient, t: float) -> bool:
        if t < self.plan.fault_end + self.plan.settle:
            return False
        if t > self.plan.fault_end + self.plan.max_recovery:
            self.gave_up = True
            return True
        back = watch.back_at(self.plan.fault_end, self.target, (self.victim or {}).get("id"))
        if back is None:
            return False
        return t - max(back, last_failure(client.done, 0.0) or 0.0) >= self.plan.settle

    async def progress(self, watch: ReplicaWatch, client: RetryingClient, every: float = 10.0) -> None:
        while True:
            await asyncio.sleep(every)
            failed = sum(r.first.kind != "ok" for r in client.done)
            print(
                f"    {time.perf_counter() - client.t0:5.0f} s: {len(client.done)} answered, {failed} first attempts "
                f"failed, {len(watch.running())} replicas running",
                flush=True,
            )

    async def drive(self, watch: ReplicaWatch) -> tuple[list, float]:
        async with LeanSession(self.a.timeout) as session:
            client = RetryingClient(session, self.urls(watch), "/classify", self.bodies, self.a.retry_cap)
            injector = asyncio.ensure_future(self.inject(watch, client.t0))
            shower = asyncio.ensure_future(self.progress(watch, client))
            lagger = asyncio.ensure_future(self.lag.run(client.t0))
            prober = await self.start_probe(watch, client.t0) if self.sc.fault is None and self.a.probe_rate else None
            sharer = await self.start_cpu_share(client.t0) if self.sc.fault is None else None
            requests = await open_loop(client, self.plan.rate_at, lambda t: self.done(watch, client, t))
            shower.cancel()
            lagger.cancel()
            await injector
            wall = time.perf_counter() - client.t0
            self.probed, self.cpu = await printed(prober), await printed(sharer)
            return requests, wall

    def overload_window(self, t0: float) -> list[str]:
        """--start-at and --duration of the overload, for a process of its own (the client's started at `t0`)."""
        start_at = time.time() + self.plan.fault_at - (time.perf_counter() - t0)
        return ["--start-at", str(start_at), "--duration", str(self.plan.overload_s)]

    async def start_probe(self, watch: ReplicaWatch, t0: float) -> asyncio.subprocess.Process:
        """bench.chaos_probe in its own process (it inherits the client's priority), probing through the overload."""
        cmd = [sys.executable, "-m", "bench.chaos_probe", *self.overload_window(t0), "--rate", str(self.a.probe_rate)]
        cmd += ["--timeout", str(self.a.timeout), "--text", json.loads(self.bodies[0])["text"]]
        for url in self.urls(watch)():
            cmd += ["--url", url]
        return await beside(cmd)

    async def start_cpu_share(self, t0: float) -> asyncio.subprocess.Process:
        """bench.cpu_share in its own process (its two reads of /proc would stall the client's loop): where the
        CPU went through the overload, and who waited for a core."""
        cmd = [sys.executable, "-m", "bench.cpu_share", *self.overload_window(t0), "--client", str(os.getpid())]
        return await beside(cmd)

    def execute(self) -> dict[str, Any]:
        from serve_app.app import DEPLOYMENT

        watch = ReplicaWatch(DEPLOYMENT, time.perf_counter())
        watch.start()
        try:
            while not watch.samples:
                time.sleep(0.2)
            requests, wall = event_loop_runner(self.a.loop)(self.drive(watch))
        finally:
            watch.halt.set()
            watch.join()
        return self.summary(requests, wall, watch)

    def summary(self, requests: list, wall: float, watch: ReplicaWatch) -> dict[str, Any]:
        p = self.plan
        back = watch.back_at(p.fault_end, self.target, (self.victim or {}).get("id"))
        last = last_failure(requests, 0.0)
        full = max(back, last or 0.0) if back is not None else None
        recovered = full is not None and not self.gave_up
        lives = watch.lifetimes()
        new = [v for k, v in lives.items() if v["seen"] > p.fault_at and "running" in v]
        out = {
            "scenario": self.sc.name,
            "title": self.sc.title,
            "ingress": self.sc.ingress,
            "rate": p.rate,
            "load_s": round(wall, 1),
            **tally(requests),
            "recovery_s": round(max(0.0, full - p.fault_end), 1) if recovered else None,
            "replicas_back_s": round(back - p.fault_end, 1) if back is not None else None,
            "last_failure_s": round(last - p.fault_end, 1) if last is not None else None,
            "replacement_start_s": round(new[0]["running"] - new[0]["seen"], 1) if new else None,
            "fault": self.fault,
            "replicas": lives,
        }
        if self.sc.fault is None:
            seen = latencies(requests, p.fault_at, p.fault_end)
            out["overload"] = {
                "rate": p.overload_rate,
                "seconds": p.overload_s,
                **seen,
                "client_loop_lag": self.lag.summary(p.fault_at, p.fault_end),
                "probe": self.probed,
                "cpu_by_process": self.cpu and cpu_share.per_request(self.cpu, seen["accepted"]["n"]),
            }
        if self.fault:  # the faulted replica's engines still running once service is back (before the app's deletion)
            out["victim_engines_alive_at_end"] = alive(self.fault["engines"])
        return out


# ---------------------------------------------------------------------------------------------------------------
# the app around each scenario


def deploy(cluster: Any, folder: str, args: dict, replicas: int) -> float:
    from serve_app.app import app_from_config  # imports ray.serve: only once the cluster's environment is set

    t0 = time.time()
    fixed = {"min_replicas": replicas, "max_replicas": replicas, "target_ongoing_requests": 16}
    cluster.run(app_from_config(deployment_overrides={"autoscaling_config": fixed}, **{**args, "model_dir": folder}))
    return time.time() - t0


def teardown(timeout: float = 30.0) -> dict[str, Any]:
    """Delete the app; the processes running an engine (vLLM's, and replicas, where an inline engine runs) still
    running `timeout` s later are reported, then killed."""
    import psutil
    from ray import serve

    from serve_app.local import our_replica_processes, our_vllm_processes, wait_gone

    serve.delete(APP)
    left = wait_gone(lambda: set(our_vllm_processes()) | set(our_replica_processes()), timeout)
    states = {}
    for p in left:
        try:
            states[p] = psutil.Process(p).status()
            os.kill(p, signal.SIGKILL)  # this run's own leftovers: the next scenario needs the cores
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return {"vllm_left": len(left), "vllm_left_states": states}


def sustainable_rate(url: str, texts: list[str], seconds: float) -> float:
    """Requests/s the app sustains, closed loop through `url` (the overload's 1x)."""
    r = measure(textclf_target(url, texts), "calibrate", None, concurrency=32, duration=seconds, warmup=2, progress=0)
    return r["rps"]


def overload_rate(one_x: float, times: float, ceiling: float) -> float:
    """The overload's req/s: `times` the sustainable `one_x`, but no more than the load client's `ceiling` (0: none)."""
    return min(times * one_x, ceiling) if ceiling > 0 else times * one_x


def run_scenario(sc: Scenario, cluster: Any, folder: str, args: dict, texts: list[str], a) -> dict[str, Any]:
    print(f"--- {sc.name}: {sc.title} ({sc.ingress})", flush=True)
    up = deploy(cluster, folder, args, a.replicas)
    print(f"    app up in {up:.0f} s", flush=True)
    plan = Plan(a.rate, a.fault_at, a.settle, a.max_recovery)
    if sc.fault is None:
        one_x = a.sustainable or sustainable_rate(cluster.proxy_url, texts, a.calibrate)
        wanted = a.overload * one_x
        plan.overload_rate, plan.overload_s = overload_rate(one_x, a.overload, a.client_ceiling), a.duration
        print(f"    sustainable {one_x:.0f} req/s{' (given)' if a.sustainable else ''}", flush=True)
        if plan.overload_rate < wanted:
            print(f"    {a.overload:g}x is past the load client's ceiling: {plan.overload_rate:.0f} req/s", flush=True)
    bodies = [json.dumps({"text": t}).encode() for t in texts]
    try:
        row = Run(sc, plan, cluster, a.replicas, bodies, a).execute()
    finally:
        left = teardown()
    row.update(left, app_up_s=round(up, 1))
    if sc.fault is None:
        row["overload"].update(sustainable_rate=one_x, wanted_rate=wanted)
    print("    " + json.dumps({k: row[k] for k in TABLE_KEYS if k in row}), flush=True)
    return row


def guarded(sc: Scenario, *args) -> dict[str, Any]:
    """run_scenario; a scenario that breaks becomes a row saying so, and the others still run."""
    try:
        return run_scenario(sc, *args)
    except Exception as exc:
        traceback.print_exc()
        return {"scenario": sc.name, "title": sc.title, "ingress": sc.ingress, "error": repr(exc)[:300]}


# ---------------------------------------------------------------------------------------------------------------
# results

TABLE_KEYS = ("sent", "ok", "refused", "lost", "first_failed", "recovery_s", "vllm_left")


def fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def table(rows: list[dict]) -> str:
    lines = [
        "| scenario | ingress | sent | 2xx | refused | lost | first attempts failed | s to full service "
        "| engine processes left |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['title']} | {r['ingress']} | failed: {r['error']} |" + " - |" * 6)
            continue
        recovery = fmt(r["recovery_s"]) if r["recovery_s"] is not None else "not within the wait"
        cells = [r["title"], r["ingress"], r["sent"], r["ok"], r["refused"], r["lost"], r["first_failed"], recovery]
        lines.append("| " + " | ".join(map(str, cells + [r["vllm_left"]])) + " |")
    return "\n".join(lines)


def overload_table(row: dict) -> str:
    o = row["overload"]
    lines = [
        f"Overload ({row['ingress']}): {o['rate']:.0f} req/s offered for {o['seconds']:.0f} s "
        f"({o['rate'] / o['sustainable_rate']:.1f}x the sustainable {o['sustainable_rate']:.0f} req/s"
        + (
            f"; {o['wanted_rate']:.0f} req/s is past what the load client sends on these cores, --client-ceiling"
            if o["rate"] < o.get("wanted_rate", 0) - 0.5
            else ""
        )
        + "); "
        "latency of each attempt sent meanwhile:",
        "",
        "| answers | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    rows = [("refused (429/503)", o["refused"])]
    by = (o.get("refused_by") or {}).items()
    rows += [(f'refused, saying "{reason}"'.replace("|", "/"), s) for reason, s in by]
    rows += [("accepted (2xx)", o["accepted"])]
    lag = o.get("client_loop_lag") or percentiles_ms([])
    rows += [("the client's own delay: its event loop waking a 10 ms sleep late", lag)]
    if o.get("probe"):
        pr = o["probe"]
        rows += [
            (f"refused (429/503), timed by the probe ({pr['rate']:.0f} req/s, a process of its own)", pr["refused"]),
            ("accepted (2xx), timed by the probe", pr["accepted"]),
            ("the probe's own delay", pr["own_loop_lag"]),
        ]
    for name, s in rows:
        lines.append(f"| {name} | {s['n']} | {fmt(s['p50_ms'])} | {fmt(s['p99_ms'])} | {fmt(s['max_ms'])} |")
    if o.get("cpu_by_process"):
        lines += [
            "",
            "Where the CPU went meanwhile (bench.cpu_share; CPU ms per answer accepted in the window; waiting: the "
            "process's threads ready to run with no core free, on average):",
            "",
            cpu_share.table(o["cpu_by_process"]),
        ]
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, each with the figure behind it."""
    out = []
    for r in filter(lambda r: "error" not in r, rows):
        out.append(
            f"{r['scenario']}: lost {r['lost']} (goal 0), engine processes left {r['vllm_left']} (goal 0)"
            + (
                f"; the faulted replica's engine still running after recovery: {r['victim_engines_alive_at_end']}"
                if r.get("victim_engines_alive_at_end")
                else ""
            )
        )
        if r["scenario"] == "engine_stopped":
            start = r.get("replacement_start_s")
            bound = 60 + (start or 0)
            out.append(
                f"engine_stopped: full service after {fmt(r['recovery_s'])} s (goal <= 60 s + the new replica's "
                f"start-up {fmt(start)} s = {bound:.0f} s)"
            )
        if "overload" in r:
            o = r["overload"]
            probed = (o.get("probe") or {}).get("refused", {}).get("p99_ms")
            out.append(
                f"{r['scenario']}: refusals p99 {fmt(probed)} ms as the probe timed them (goal <= 100 ms; the load "
                f"client, its own delay included: {fmt(o['refused']['p99_ms'])} ms), error answers not in the API's "
                f"JSON {r.get('not_json', 0)} (goal 0)"
            )
    return out


def front_end_name(env: dict[str, str]) -> str:
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return "Serve's Python proxy"
    shed = "RAY_SERVE_HAPROXY_BINARY_PATH" in env
    return f"HAProxy {'with' if shed else 'without'} overload shedding (serve_app/haproxy_shed.py)"


def report(rows: list[dict], a, folder: str, wall: float) -> str:
    head = (
        f"# Chaos: {a.model}\n\n{a.replicas} replicas, steady load {a.rate:.0f} req/s (open loop, one retry per "
        f"request; the client at nice {a.client_nice}, on {a.loop}'s event loop), fault at {a.fault_at:.0f} s; "
        f"a fresh app per scenario. Whole run {wall / 60:.1f} min. Front end: {a.front_end}."
        + (f" serve_app/config.yaml args overridden: {' '.join(a.serve_arg)}." if a.serve_arg else "")
        + "\n"
    )
    parts = [head, table(rows)]
    parts += [overload_table(r) for r in rows if "overload" in r]
    parts.append("Goals:\n\n" + "\n".join(f"- {g}" for g in goals(rows)))
    return "\n\n".join(parts) + "\n"


def result_path(model: str, tag: str, suffix: str) -> Path:
    """bench/results/chaos-<model folder name>[-<tag>]<suffix>"""
    return RESULTS / f"chaos-{Path(model.rstrip('/')).name.lower()}{f'-{tag}' if tag else ''}{suffix}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random-llama", help="alias, model path, or a run folder")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    ap.add_argument("--replicas", type=int, default=2, help="fixed replica count of each scenario's app")
    ap.add_argument("--rate", type=float, default=20.0, help="the steady load, requests/s")
    ap.add_argument("--fault-at", type=float, default=10.0, help="seconds of load before the fault")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of full service that end a scenario")
    ap.add_argument("--max-recovery", type=float, default=240.0, help="seconds after the fault to give up waiting")
    ap.add_argument("--overload", type=float, default=3.0, help="the overload, times the sustainable rate")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of overload")
    ap.add_argument(
        "--client-ceiling",
        type=float,
        default=2500.0,
        help="the most req/s the overload offers, whatever --overload asks: the load client shares the service's 2 "
        "cores, and past what it was measured to keep up with (~2,300 req/s, bench/results/chaos-lean-client.md) its "
        "own delay and timeouts would read as the service's; 0: no ceiling",
    )
    ap.add_argument("--calibrate", type=float, default=10.0, help="seconds measuring the sustainable rate")
    ap.add_argument(
        "--sustainable",
        type=float,
        default=None,
        help="req/s taken as the sustainable rate, not measured: settings compared at the same offered load",
    )
    ap.add_argument(
        "--probe-rate",
        type=float,
        default=20.0,
        help="req/s of the overload's probe (bench.chaos_probe: a quiet client of its own that times the service's "
        "answers without the load client's delay); 0: none",
    )
    ap.add_argument("--timeout", type=float, default=30.0, help="the client's per-attempt timeout, seconds")
    ap.add_argument("--retry-cap", type=float, default=2.0, help="longest Retry-After the client honours, seconds")
    ap.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the client's event loop: on the service's own cores a slow client delays every answer it measures",
    )
    ap.add_argument("--tag", default="", help="suffix of the result names")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="KEY=JSON", help=SERVE_ARG_HELP)
    a = ap.parse_args(argv)
    unknown = set(a.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from serve_app.local import LocalServe, free_port

    folder, args, texts = classifier_folder(a.model), {**serve_args_from(a.serve_arg), "run": None}, test_texts()
    t0, rows = time.time(), []
    di = free_port()
    with LocalServe(di_ports=(di, di + 40)) as cluster:
        a.client_nice = raise_priority()  # after Ray's start: its processes keep their own priority
        a.front_end = front_end_name(cluster.env)
        for name in a.scenarios.split(","):
            rows.append(guarded(SCENARIOS[name], cluster, folder, args, texts, a))
    md = report(rows, a, folder, time.time() - t0)
    md_path, json_path = result_path(a.model, a.tag, ".md"), result_path(a.model, a.tag, ".json")
    md_path.write_text(md)
    json_path.write_text(
        json.dumps({"model": a.model, "classifier_dir": folder, "args": vars(a), "rows": rows}, indent=1)
    )
    print("\n" + md + f"\nwrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
