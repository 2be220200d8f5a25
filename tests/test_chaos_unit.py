"""bench/chaos.py without Ray: the retrying client against small real HTTP servers (in-process aiohttp), the
counting of outcomes, the recovery bookkeeping and the report."""

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from aiohttp import web
from support import classify_stub

from bench import chaos, chaos_probe
from bench.chaos_client import (
    Attempt,
    LoopLag,
    Request,
    RetryingClient,
    error_reason,
    last_failure,
    latencies,
    open_loop,
    outcome,
    retry_after,
    retry_delay,
    should_retry,
    tally,
)
from bench.lean_http import LeanSession
from serve_app.local import free_port


async def _server(statuses):
    """A /classify that answers with the next of `statuses` (cycling), 503s with Retry-After: 1."""
    seen = {"n": 0}

    async def classify(request):
        status = statuses[seen["n"] % len(statuses)]
        seen["n"] += 1
        headers = {"Retry-After": "1"} if status == 503 else None
        return web.json_response({"label": "x"}, status=status, headers=headers)

    runner, url = await classify_stub(classify)
    return runner, url, seen


def _run(urls_of_servers, statuses_per_server, n=1, retry_cap=0.2, dead=0, timeout=5.0):
    """Send n requests with a RetryingClient over the servers' URLs plus `dead` URLs nobody listens on."""

    async def go():
        servers = [await _server(s) for s in statuses_per_server]
        urls = urls_of_servers([u for _, u, _ in servers], [f"http://127.0.0.1:{free_port()}" for _ in range(dead)])
        try:
            async with LeanSession(timeout) as session:
                client = RetryingClient(session, lambda: urls, "/classify", [b'{"text": "hi"}'], retry_cap)
                reqs = [await client.request(i) for i in range(n)]
        finally:
            for runner, _, _ in servers:
                await runner.cleanup()
        return reqs, [seen["n"] for _, _, seen in servers]

    return asyncio.run(go())


def test_outcomes_and_when_to_retry():
    assert [outcome(s) for s in (200, 204, 404, 503, None)] == ["ok", "ok", "refused", "refused", "lost"]
    assert should_retry(Attempt(0, 0, None, "ConnectionRefusedError")) and should_retry(Attempt(0, 0, 503))
    assert should_retry(Attempt(0, 0, 429)) and not should_retry(Attempt(0, 0, 500))
    assert not should_retry(Attempt(0, 0, 413)) and not should_retry(Attempt(0, 0, 200))
    assert retry_after("2") == 2.0 and retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after(None) is None and retry_after("-3") == 0.0
    assert retry_delay(Attempt(0, 0, 503, retry_after=30), cap=2) == 2  # honoured up to the cap
    assert retry_delay(Attempt(0, 0, 503, retry_after=0.5), cap=2) == 0.5
    assert retry_delay(Attempt(0, 0, None, "ServerDisconnectedError", retry_after=5), cap=2) == 0


def test_a_503_is_retried_after_retry_after_and_then_answered():
    t0 = time.perf_counter()
    (req,), seen = _run(lambda live, dead: live, [[503, 200]], retry_cap=0.3)
    assert [a.status for a in req.attempts] == [503, 200] and seen == [2]
    assert req.first.retry_after == 1.0 and time.perf_counter() - t0 >= 0.3  # waited the capped Retry-After
    assert req.final.kind == "ok" and req.attempts[1].sent >= req.first.answered_at + 0.3


def test_one_retry_only_then_refused():
    (req,), seen = _run(lambda live, dead: live, [[503]])
    assert [a.status for a in req.attempts] == [503, 503] and seen == [2] and req.final.kind == "refused"
    (req,), seen = _run(lambda live, dead: live, [[500, 200]])
    assert [a.status for a in req.attempts] == [500] and req.final.kind == "refused"  # 500 is not retried


def test_a_refused_connection_is_retried_on_another_url():
    reqs, seen = _run(lambda live, dead: dead + live, [[200]], n=6, dead=1)
    assert all(r.final.kind == "ok" for r in reqs) and seen == [6]
    failed_first = [r for r in reqs if r.first.kind == "lost"]
    assert len(failed_first) == 3  # round robin over one dead URL and one live one
    assert all(r.first.error == "ConnectionRefusedError" and r.final.url != r.first.url for r in failed_first)


def test_no_answer_twice_is_lost():
    reqs, _ = _run(lambda live, dead: dead, [], n=2, dead=2)
    assert [r.final.kind for r in reqs] == ["lost", "lost"] and all(len(r.attempts) == 2 for r in reqs)
    assert tally(reqs) | {"first_failures": None, "final_failures": None} == {
        "sent": 2,
        "ok": 0,
        "refused": 0,
        "lost": 2,
        "first_failed": 2,
        "retried": 2,
        "first_failures": None,
        "final_failures": None,
        "not_json": 0,
    }
    assert tally(reqs)["final_failures"] == {"ConnectionRefusedError": 2}


def test_an_error_answer_outside_the_apis_json_is_counted():
    async def go():
        async def plain(request):  # as Serve's own backpressure answer: text, not the API's JSON
            return web.Response(text="Request dropped due to backpressure", status=503, headers={"Retry-After": "0"})

        runner, url = await classify_stub(plain)
        try:
            async with LeanSession() as session:
                client = RetryingClient(session, lambda: [url], "/classify", [b"{}"])
                return await client.request(0)
        finally:
            await runner.cleanup()

    req = asyncio.run(go())
    assert [a.status for a in req.attempts] == [503, 503] and not any(a.json_body for a in req.attempts)
    assert tally([req])["not_json"] == 2
    assert req.first.reason == "Request dropped due to backpressure"
    (ok,), _ = _run(lambda live, dead: live, [[503, 200]], retry_cap=0.01)
    assert tally([ok])["not_json"] == 0  # the stub's 503 is JSON


def test_open_loop_paces_and_stops():
    async def go():
        runner, url, seen = await _server([200])
        try:
            async with LeanSession() as session:
                client = RetryingClient(session, lambda: [url], "/classify", [b"{}"])
                reqs = await open_loop(client, lambda t: 20.0 if t < 0.5 else 100.0, lambda t: t >= 1.0)
        finally:
            await runner.cleanup()
        return reqs, client

    reqs, client = asyncio.run(go())
    assert 55 <= len(reqs) <= 62  # 10 at 20/s, then 50 at 100/s
    assert len(client.done) == len(reqs) and all(r.final.kind == "ok" for r in reqs)
    starts = [r.first.sent for r in reqs]
    assert starts == sorted(starts) and starts[-1] < 1.2


def test_error_reason_says_who_refused():
    busy = b'{"error": {"message": "server busy: every replica is at its limit and the queue is full", "code": 503}}'
    assert error_reason(busy) == "server busy: every replica is at its limit and t"
    assert error_reason(b"Request dropped\n due to  backpressure") == "Request dropped due to backpressure"
    assert error_reason(b'{"detail": "x"}') == '{"detail": "x"}' and error_reason(b"\xff") == "\ufffd"


def test_loop_lag_sees_a_blocked_loop():
    async def go(lag):
        t0 = time.perf_counter()
        ticker = asyncio.ensure_future(lag.run(t0))
        await asyncio.sleep(0.1)
        time.sleep(0.15)  # the loop busy, as a client at its CPU limit
        await asyncio.sleep(0.1)
        ticker.cancel()
        return t0

    lag = LoopLag(every=0.01)
    asyncio.run(go(lag))
    whole = lag.summary()
    assert whole["n"] >= 10 and whole["max_ms"] >= 100 and whole["p50_ms"] < 20
    late = max(lag.samples, key=lambda s: s[1])
    assert lag.summary(until=late[0])["max_ms"] < 100  # the window picks samples by when the sleep began
    assert lag.summary(since=1e6) == {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}


def _req(*attempts):
    return Request([Attempt(*a) for a in attempts])


def test_tally_latencies_and_last_failure():
    reqs = [
        _req((0.0, 0.01, 200)),
        _req((1.0, 0.002, 503), (1.5, 0.02, 200)),
        _req((2.0, 0.004, 429), (3.0, 0.003, 503)),
        _req((4.0, 30.0, None, "TimeoutError"), (34.0, 0.05, 200)),
        _req((5.0, 0.1, 500)),
    ]
    t = tally(reqs)
    assert (t["sent"], t["ok"], t["refused"], t["lost"], t["first_failed"], t["retried"]) == (5, 3, 2, 0, 4, 3)
    assert t["first_failures"] == {"503": 1, "429": 1, "TimeoutError": 1, "500": 1}
    assert t["final_failures"] == {"503": 1, "500": 1}
    lat = latencies(reqs, since=0.5, until=10.0)
    assert lat["refused"]["n"] == 3 and lat["refused"]["max_ms"] == 4.0  # 503/429 only, not the 500
    assert lat["accepted"]["n"] == 1 and lat["accepted"]["max_ms"] == 20.0  # the 200s at 0.0 and 34.0 are outside
    assert last_failure(reqs, since=0.0) == 34.0 and last_failure(reqs, since=4.5) == pytest.approx(5.1)
    assert last_failure(reqs[:1], since=0.0) is None


def test_replica_watch_back_at_and_lifetimes():
    w = chaos.ReplicaWatch("Classifier", 0.0)

    def reps(*pairs):
        return [{"id": i, "state": s, "pid": 1} for i, s in pairs]

    w.samples = [
        (0.0, reps(("a", "RUNNING"), ("b", "RUNNING"))),
        (10.0, reps(("a", "RUNNING"), ("b", "RUNNING"))),  # the fault is at 5: not noticed yet
        (20.0, reps(("a", "RUNNING"), ("c", "STARTING"))),
        (30.0, reps(("a", "RUNNING"), ("c", "RUNNING"))),
        (35.0, reps(("a", "RUNNING"), ("c", "STOPPING"))),  # a flap: back only from 40
        (40.0, reps(("a", "RUNNING"), ("c", "RUNNING"))),
    ]
    assert w.back_at(5.0, 2, "b") == 40.0
    assert w.back_at(5.0, 3, "b") is None
    assert w.back_at(38.0, 2, None) == 40.0
    assert w.running() == reps(("a", "RUNNING"), ("c", "RUNNING"))
    life = w.lifetimes()
    assert life["c"] == {"seen": 20.0, "running": 30.0, "last": 40.0} and "running" in life["b"]


def test_plan_overload_window():
    p = chaos.Plan(rate=20, fault_at=10, settle=5, max_recovery=60, overload_rate=300, overload_s=30)
    assert [p.rate_at(t) for t in (0, 9.9, 10, 39.9, 40)] == [20, 20, 300, 300, 20] and p.fault_end == 40
    assert chaos.Plan(20, 10, 5, 60).rate_at(10) == 20 and chaos.Plan(20, 10, 5, 60).fault_end == 10


def test_alive_sees_a_running_and_an_ended_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert chaos.alive([p.pid]) == [p.pid]
    finally:
        p.kill()
        p.wait()
    assert chaos.alive([p.pid]) == []


def _row(name, **kw):
    sc = chaos.SCENARIOS[name]
    row = {"scenario": name, "title": sc.title, "ingress": sc.ingress, "sent": 100, "ok": 98, "refused": 2}
    return {**row, "lost": 0, "first_failed": 5, "recovery_s": 42.0, "vllm_left": 0, **kw}


def test_report_tables_and_goals():
    over = {
        "rate": 300.0,
        "seconds": 60,
        "sustainable_rate": 100.0,
        "refused": {"n": 50, "p50_ms": 3.0, "p99_ms": 120.0, "max_ms": 300.0},
        "accepted": {"n": 10, "p50_ms": 900.0, "p99_ms": 2000.0, "max_ms": 2500.0},
        "client_loop_lag": {"n": 6000, "p50_ms": 0.4, "p99_ms": 35.0, "max_ms": 80.0},
        "refused_by": {"server busy": {"n": 48, "p50_ms": 2.9, "p99_ms": 9.0, "max_ms": 10.0}},
        "probe": {
            "rate": 20.0,
            "refused": {"n": 800, "p50_ms": 1.1, "p99_ms": 40.0, "max_ms": 90.0},
            "accepted": {"n": 400, "p50_ms": 500.0, "p99_ms": 900.0, "max_ms": 950.0},
            "own_loop_lag": {"n": 5000, "p50_ms": 0.1, "p99_ms": 2.0, "max_ms": 5.0},
        },
        "cpu_by_process": {"Serve replica": {"cpu_s": 30.0, "cores": 0.5, "waiting": 0.7, "ms_per_request": 3000.0}},
    }
    rows = [
        _row("engine_stopped", replacement_start_s=30.0, victim_engines_alive_at_end=[123], vllm_left=1),
        _row("replica_killed_direct", recovery_s=None, lost=3),
        _row("overload", overload=over),
        {"scenario": "engine_killed", "title": "engine process killed", "ingress": "proxy", "error": "Boom()"},
    ]
    md = chaos.table(rows)
    lines = md.splitlines()
    assert len(lines) == 6 and lines[0].count("|") == lines[2].count("|") == lines[5].count("|") == 10
    assert lines[5].startswith("| engine process killed | proxy | failed: Boom() | - |")
    assert lines[2] == "| engine stopped (SIGSTOP) | proxy | 100 | 98 | 2 | 0 | 5 | 42.0 | 1 |"
    assert "| replica killed | direct | 100 | 98 | 2 | 3 | 5 | not within the wait | 0 |" in md
    o = chaos.overload_table(rows[2])
    assert "3.0x the sustainable 100 req/s" in o and "| refused (429/503) | 50 | 3.0 | 120.0 | 300.0 |" in o
    assert "10 ms sleep late | 6000 | 0.4 | 35.0 | 80.0 |" in o
    assert '| refused, saying "server busy" | 48 | 2.9 | 9.0 | 10.0 |' in o
    g = "\n".join(chaos.goals(rows))
    assert "engine_stopped: full service after 42.0 s (goal <= 60 s + the new replica's start-up 30.0 s = 90 s)" in g
    assert "engine still running after recovery: [123]" in g and "replica_killed_direct: lost 3 (goal 0)" in g
    assert "| refused (429/503), timed by the probe (20 req/s, a process of its own) | 800 | 1.1 | 40.0 |" in o
    assert "| accepted (2xx), timed by the probe | 400 | 500.0 | 900.0 | 950.0 |" in o
    assert "| the probe's own delay | 5000 | 0.1 | 2.0 | 5.0 |" in o
    assert (
        "overload: refusals p99 40.0 ms as the probe timed them (goal <= 100 ms; the load client, its own delay "
        "included: 120.0 ms), error answers not in the API's JSON 0 (goal 0)"
    ) in g
    assert "| Serve replica | 0.5 | 3000.0 | 0.7 |" in o
    del rows[2]["overload"]["probe"]  # a run with --probe-rate 0
    del rows[2]["overload"]["cpu_by_process"]  # bench.cpu_share printed nothing
    assert "Where the CPU went" not in chaos.overload_table(rows[2])
    assert "probe" not in chaos.overload_table(rows[2])
    assert "refusals p99 - ms as the probe" in "\n".join(chaos.goals(rows))
    assert "engine_killed" not in g


def test_the_overload_stays_under_the_load_clients_ceiling():
    assert chaos.overload_rate(330.0, 3.0, 1000.0) == 990.0
    assert chaos.overload_rate(748.0, 3.0, 1000.0) == 1000.0  # 3x would be 2,244
    assert chaos.overload_rate(748.0, 3.0, 0.0) == 2244.0  # no ceiling
    assert chaos.parse_args([]).client_ceiling == 2500.0
    row = {
        "ingress": "proxy",
        "overload": {
            "rate": 1000.0,
            "seconds": 60,
            "sustainable_rate": 748.0,
            "wanted_rate": 2244.0,
            "refused": {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None},
            "accepted": {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None},
        },
    }
    o = chaos.overload_table(row)
    assert "1000 req/s offered for 60 s (1.3x the sustainable 748 req/s; 2244 req/s is past what the load client" in o
    row["overload"]["rate"] = 2244.0
    assert "past what" not in chaos.overload_table(row)


def test_scenario_names_are_checked():
    assert chaos.parse_args(["--scenarios", "overload,engine_killed"]).scenarios == "overload,engine_killed"
    with pytest.raises(SystemExit):
        chaos.parse_args(["--scenarios", "engine_killed,meteor"])
    assert chaos.result_path("runs/Enc-1", "r2", ".md").name == "chaos-enc-1-r2.md"


def test_engine_pids_finds_a_replicas_engine_below_it():
    """A stand-in replica (a shell) whose child names itself as vLLM's engine core does, with this run's marker
    in its environment (inherited); an unrelated child is not taken for an engine."""
    engine = "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(30)"
    # SPT_NOENV: setproctitle would otherwise reuse the environment block, where our_vllm_processes reads the marker
    env = {**os.environ, "SPT_NOENV": "1"}
    replica = subprocess.Popen(["bash", "-c", f'{sys.executable} -c "{engine}" & sleep 30 & wait'], env=env)
    try:
        deadline = time.time() + 20
        while not chaos.engine_pids(replica.pid) and time.time() < deadline:
            time.sleep(0.2)
        (pid,) = chaos.engine_pids(replica.pid)
        assert open(f"/proc/{pid}/comm").read().startswith("VLLM::Engine")
        assert chaos.engine_pids(os.getpid()) == [pid]  # descendants, not only children
        assert chaos.engine_pids(pid) == []
    finally:
        import psutil

        for p in psutil.Process(replica.pid).children(recursive=True):
            p.kill()
        replica.kill()
        replica.wait()


def test_the_probe_times_each_answer_without_retrying():
    """bench.chaos_probe against a stub that refuses every other request: one attempt per probe, paced, counted."""

    async def go():
        runner, url, seen = await _server([503, 200])
        try:
            t0 = time.time()
            out = await chaos_probe.probe([url], "/classify", b"{}", t0 + 0.2, duration=1.0, rate=20, timeout=5)
        finally:
            await runner.cleanup()
        return out, seen, time.time() - t0

    out, seen, took = asyncio.run(go())
    c = out["counts"]
    assert seen["n"] == 20 and (c["sent"], c["ok"], c["refused"], c["retried"]) == (20, 10, 10, 0)
    assert out["refused"]["n"] == out["accepted"]["n"] == 10 and out["refused"]["max_ms"] < 1000
    assert out["own_loop_lag"]["n"] > 10 and 1.1 <= took < 3.0  # waited for its start, then one second of probes


def test_the_probe_command_prints_json_and_counts_no_answer_as_lost():
    dead = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "bench.chaos_probe", "--url", dead, "--duration", "0.3", "--rate", "10"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout)
    c = out["counts"]
    assert (c["sent"], c["lost"], out["rate"]) == (3, 3, 10.0) and c["first_failures"] == {"ConnectionRefusedError": 3}
