"""The overload refusal at a replica's door (serve_app/replica_gate.py): unit tests of the ASGI gate without Ray, and
a real Serve replica's own port (direct ingress) under a burst, in a process of its own (tests/direct_ingress_burst.py:
the serving environment must be set before ray.serve is imported, which this test session has done already)."""

import asyncio
import json
import subprocess
import sys

import pytest
from serving_fakes import recorded_metrics
from support import ROOT

from serve_app import replica_gate
from serve_app.replica_gate import AdmissionGate, Door
from serve_app.serve_errors import JsonServeErrors, middlewares
from textclf.serving.admission import AdaptiveLimit


class Held:
    """The app behind the gate: each request waits until released; records the paths it saw."""

    def __init__(self):
        self.release, self.seen = asyncio.Event(), []

    async def __call__(self, scope, receive, send):
        self.seen.append(scope["path"])
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def call(app, path="/classify", method="POST"):
    """One request through the ASGI app: (status, headers, body)."""
    scope = {"type": "http", "method": method, "path": path, "headers": []}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b'{"text": "hi"}', "more_body": False}

    async def send(msg):
        sent.append(msg)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def door(monkeypatch):
    metrics = recorded_metrics()
    d = Door(AdaptiveLimit(ceiling=64, target_s=None), lambda: 2, 3, metrics.refused)
    d.metrics = metrics
    monkeypatch.setattr(replica_gate, "_door", d)
    monkeypatch.setattr(replica_gate, "FLUSH_S", 0.01)
    return d


def test_the_gate_refuses_beyond_serves_limit_without_calling_the_app(door):
    async def go():
        app = Held()
        gate = AdmissionGate(app)
        first = [asyncio.ensure_future(call(gate)) for _ in range(2)]
        await asyncio.sleep(0.01)
        status, headers, body = await call(gate, "/tickets/classify/batch")  # under a route prefix too
        app.release.set()
        done = await asyncio.gather(*first)
        after = await call(gate)
        await asyncio.sleep(0.05)  # the refusal reaches the metrics
        return app, status, headers, body, done, after

    app, status, headers, body, done, after = asyncio.run(go())
    assert [s for s, _, _ in done] == [200, 200] and after[0] == 200
    assert app.seen == ["/classify"] * 3  # the refused request never reached the app
    assert status == 429 and headers[b"retry-after"] == b"3" and headers[b"content-type"] == b"application/json"
    err = json.loads(body)["error"]
    assert err["code"] == 429 and err["message"] == "server busy: 2 requests in progress, limit 2; retry later", err
    assert err["detail"] == {"inflight_requests": 2, "limit": 64, "max_ongoing_requests": 2}
    assert int(headers[b"content-length"]) == len(body)
    assert door.metrics.requests.totals("endpoint", "status") == {("/classify/batch", "429"): 1}


def test_a_request_stops_counting_when_its_answer_ends(door):
    """HAProxy gives a replica its next request as soon as an answer ends; Serve's wrappers return later. A request
    still counted then would be refused at HAProxy's own limit (max_ongoing_requests, TEXTCLF_REPLICA_MAXCONN)."""
    door.max_ongoing = lambda: 1
    after_answer = asyncio.Event()

    async def slow_to_return(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        await after_answer.wait()  # Serve's bookkeeping after the answer

    async def go():
        gate = AdmissionGate(slow_to_return)
        first = asyncio.ensure_future(call(gate))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(call(gate))
        await asyncio.sleep(0.01)
        after_answer.set()
        return [s for s, _, _ in await asyncio.gather(first, second)], gate.held

    statuses, held = asyncio.run(go())
    assert statuses == [200, 200] and held == 0


def test_the_admission_limit_binds_below_serves(door):
    door.admission = AdaptiveLimit(ceiling=1, target_s=None)
    door.max_ongoing = lambda: None  # outside a replica: no cap of Serve's

    async def go():
        app = Held()
        gate = AdmissionGate(app)
        first = asyncio.ensure_future(call(gate))
        await asyncio.sleep(0.01)
        second = await call(gate)
        app.release.set()
        return (await first)[0], second

    first, (status, _, body) = asyncio.run(go())
    assert first == 200 and status == 429
    assert json.loads(body)["error"]["message"] == "server busy: 1 requests in progress, limit 1; retry later"


@pytest.mark.parametrize("method,path", [("GET", "/classify"), ("POST", "/health"), ("GET", "/ready")])
def test_other_requests_pass_a_full_gate(door, method, path):
    door.max_ongoing = lambda: 0  # full: every classify request would be refused

    async def go():
        app = Held()
        app.release.set()
        return app, await call(AdmissionGate(app), path, method)

    app, (status, _, _) = asyncio.run(go())
    assert status == 200 and app.seen == [path]


def test_without_a_door_every_request_passes(monkeypatch):
    monkeypatch.setattr(replica_gate, "_door", None)  # Serve's Python proxy runs the same middlewares

    async def go():
        app = Held()
        app.release.set()
        gate = AdmissionGate(app)
        return await asyncio.gather(*(call(gate) for _ in range(5)))

    assert [s for s, _, _ in asyncio.run(go())] == [200] * 5


def test_the_gate_is_the_outermost_middleware():
    """Serve wraps the server's app in the list's order, so the last one sees each request first
    (ray.serve._private.http_util._apply_middlewares)."""
    assert [m.cls for m in middlewares()] == [JsonServeErrors, AdmissionGate]


@pytest.mark.e2e
def test_a_replicas_own_port_refuses_a_burst_at_its_door(tiny_run):
    """One replica taking 4 requests at once (max_ongoing_requests), Serve's queue of 128 behind them: 60 requests
    at once on the replica's own port. Without the gate Serve would queue all 60 and refuse none."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "direct_ingress_burst.py"), str(tiny_run), "60", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[gate] {r['statuses']}; refused by {r['reasons']}")
    assert set(r["statuses"]) <= {"200", "429"} and r["statuses"].get("429"), r  # every request answered
    assert set(r["reasons"]) == {"server busy"}, r
    assert r["refusals_in_json_with_retry_after"] == r["statuses"]["429"], r
    assert max(r["limits"]) <= 4, r  # the gate's bound is Serve's limit (or the admission's, below it)
    assert r["after"] == 200, r  # the replica answers again once the burst is over
