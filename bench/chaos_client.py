"""The client side of bench/chaos.py: an open-loop load whose requests retry once, as a careful client would, and
the counting of what came of them. No Ray here: it only speaks HTTP.

A request is retried once, on another URL when there are several (direct ingress), when its first attempt got
429/502/503/504 (after the answer's Retry-After, capped) or no answer at all (refused or reset connection,
timeout: a classification is idempotent). Each request ends as "ok" (2xx), "refused" (an HTTP error answer after
the retry) or "lost" (no answer after the retry).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

RETRY_STATUSES = frozenset({429, 502, 503, 504})
REFUSALS = frozenset({429, 503})  # the overload answers whose latency the overload goal bounds


@dataclass
class Attempt:
    sent: float  # seconds since the load began
    latency: float  # seconds from sending to the answer (or to the failure)
    status: Optional[int]  # HTTP status; None: no answer
    error: str = ""  # the exception's name when there was no answer
    retry_after: Optional[float] = None  # the answer's Retry-After, seconds
    url: str = ""
    json_body: bool = True  # an error answer in the API's JSON (False: e.g. Serve's or HAProxy's plain text)
    reason: str = ""  # an error answer's message (its start): which part refused

    @property
    def kind(self) -> str:
        return outcome(self.status)

    @property
    def answered_at(self) -> float:
        return self.sent + self.latency


@dataclass
class Request:
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def first(self) -> Attempt:
        return self.attempts[0]

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]


def outcome(status: Optional[int]) -> str:
    """ok: a 2xx answer; refused: any other answer; lost: none."""
    if status is None:
        return "lost"
    return "ok" if 200 <= status < 300 else "refused"


def should_retry(a: Attempt) -> bool:
    return a.status is None or a.status in RETRY_STATUSES


def retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (the delta form; an HTTP date or garbage counts as absent)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def retry_delay(a: Attempt, cap: float) -> float:
    """How long to wait before the retry: the answer's Retry-After up to `cap`; at once after no answer (the retry
    goes to another URL where there is one)."""
    return min(a.retry_after or 0.0, cap) if a.status is not None else 0.0


def error_reason(answer: bytes, length: int = 48) -> str:
    """The start of an error answer's message ({"error": {"message"}}, else its text): the refusals of HAProxy, Serve
    and the app say different things."""
    try:
        text = str(json.loads(answer)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = answer.decode(errors="replace")
    return " ".join(text.split())[:length]


class RetryingClient:
    """POSTs bodies to `path` on the URLs `urls()` gives at the time (round robin) through `session`
    (bench.lean_http.LeanSession), one retry per request (none with retry=False: a probe that times each answer as it
    comes)."""

    def __init__(
        self,
        session: Any,
        urls: Callable[[], Sequence[str]],
        path: str,
        bodies: Sequence[bytes],
        retry_cap_s: float = 2.0,
        t0: Optional[float] = None,
        retry: bool = True,
    ):
        self.session, self.urls, self.path, self.bodies = session, urls, path, bodies
        self.retry_cap_s, self.retry = retry_cap_s, retry
        self.t0 = time.perf_counter() if t0 is None else t0
        self._next = itertools.count()
        self.done: list[Request] = []  # finished requests, in finishing order (watched while the load runs)

    def pick(self, avoid: str = "") -> str:
        """The next URL in turn; for a retry, the one after `avoid` (the failed attempt's) in the list."""
        urls = [u.rstrip("/") + self.path for u in self.urls()]
        if avoid in urls:
            return urls[(urls.index(avoid) + 1) % len(urls)]
        return urls[next(self._next) % len(urls)]

    async def attempt(self, body: bytes, avoid: str = "") -> Attempt:
        url = self.pick(avoid)
        sent = time.perf_counter()
        status, error, after, as_json, reason = None, "", None, True, ""
        try:
            answer = await self.session.post(url, body)
            status, after = answer.status, retry_after(answer.headers.get("retry-after"))
            as_json = answer.headers.get("content-type", "").startswith("application/json")
            reason = error_reason(answer.body) if status >= 400 else ""
        except Exception as exc:  # refused, reset, timed out: no answer, whatever the kind
            error = type(exc).__name__
        return Attempt(sent - self.t0, time.perf_counter() - sent, status, error, after, url, as_json, reason)

    async def request(self, i: int) -> Request:
        body = self.bodies[i % len(self.bodies)]
        req = Request([await self.attempt(body)])
        if self.retry and should_retry(req.first):
            await asyncio.sleep(retry_delay(req.first, self.retry_cap_s))
            req.attempts.append(await self.attempt(body, avoid=req.first.url))
        self.done.append(req)
        return req


async def open_loop(client: RetryingClient, rate_at: Callable[[float], float], stop: Callable[[float], bool]) -> list:
    """Start requests at rate_at(t) per second (t: seconds since the client's t0) whatever the answers, until
    stop(t); then wait for those in flight (and their retries). Returns the Requests in start order."""
    tasks: list[asyncio.Task] = []
    t_next = time.perf_counter() - client.t0
    for i in itertools.count():
        if stop(t_next):
            break
        delay = t_next - (time.perf_counter() - client.t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(client.request(i)))
        t_next += 1.0 / rate_at(t_next)
    return list(await asyncio.gather(*tasks))


class LoopLag:
    """How late the client's event loop wakes a task that sleeps `every` s: a delay the client adds to every latency
    it measures (a busy loop reads an answer late), so an overload's latencies can be told from the client's own."""

    def __init__(self, every: float = 0.01):
        self.every = every
        self.samples: list[tuple[float, float]] = []  # (seconds since t0, lag in seconds)

    async def run(self, t0: float) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.every)
            self.samples.append((t - t0, time.perf_counter() - t - self.every))

    def summary(self, since: float = float("-inf"), until: float = float("inf")) -> dict[str, Optional[float]]:
        return percentiles_ms([lag for t, lag in self.samples if since <= t < until])


def tally(requests: Sequence[Request]) -> dict[str, Any]:
    """sent, ok/refused/lost (final outcome), first-attempt failures, and the statuses behind them."""
    finals = Counter(r.final.kind for r in requests)

    def name(a: Attempt) -> str:
        return str(a.status) if a.status is not None else a.error or "no answer"

    return {
        "sent": len(requests),
        "ok": finals["ok"],
        "refused": finals["refused"],
        "lost": finals["lost"],
        "first_failed": sum(r.first.kind != "ok" for r in requests),
        "retried": sum(len(r.attempts) > 1 for r in requests),
        "first_failures": dict(Counter(name(r.first) for r in requests if r.first.kind != "ok")),
        "final_failures": dict(Counter(name(r.final) for r in requests if r.final.kind != "ok")),
        "not_json": sum(
            a.status is not None and a.status >= 400 and not a.json_body for r in requests for a in r.attempts
        ),
    }


def latency_ms(attempts: Sequence[Attempt]) -> dict[str, Optional[float]]:
    return percentiles_ms([a.latency for a in attempts])


def percentiles_ms(seconds: Sequence[float]) -> dict[str, Optional[float]]:
    lat = np.array(seconds) * 1000
    if not len(lat):
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": int(len(lat)),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
    }


def latencies(requests: Sequence[Request], since: float = float("-inf"), until: float = float("inf")) -> dict:
    """Latency of every attempt sent in [since, until): refusals (429/503) and 2xx answers apart."""
    attempts = [a for r in requests for a in r.attempts if since <= a.sent < until]
    refused = [a for a in attempts if a.status in REFUSALS]
    return {
        "refused": latency_ms(refused),
        "accepted": latency_ms([a for a in attempts if a.kind == "ok"]),
        "refused_by": {
            reason: latency_ms([a for a in refused if a.reason == reason])
            for reason, _ in Counter(a.reason for a in refused).most_common()
        },
    }


def last_failure(requests: Sequence[Request], since: float) -> Optional[float]:
    """When the latest failed first attempt sent after `since` ended (None: none failed)."""
    ends = [r.first.answered_at for r in requests if r.first.sent >= since and r.first.kind != "ok"]
    return max(ends) if ends else None
