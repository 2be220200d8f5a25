"""A light second client for bench/chaos.py's overload, in a process of its own.

    python -m bench.chaos_probe --url URL [--url URL2] --start-at EPOCH --duration S [--rate 20]

The load client sends hundreds of requests a second and reads each answer only when its busy event loop gets to it,
so the latencies it times include its own delay (bench/results/chaos-overload-tail.md). This probe sends a few
requests a second through the same front door, no retries, from a quiet event loop, and times each answer: what a
new client sees while the service is overloaded. It prints one JSON object: the probe's latencies (refusals and 2xx
apart, as bench.chaos_client.latencies), its counts (as bench.chaos_client.tally) and its own event loop's delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, Sequence

from bench.chaos_client import LoopLag, RetryingClient, latencies, open_loop, tally
from bench.lean_http import LeanSession


async def probe(
    urls: Sequence[str], path: str, body: bytes, start_at: float, duration: float, rate: float, timeout: float
) -> dict[str, Any]:
    """One attempt every 1/rate s from `start_at` (time.time()) for `duration` s, whatever the answers."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    lag = LoopLag()
    async with LeanSession(timeout) as session:
        client = RetryingClient(session, lambda: urls, path, [body], retry=False)
        lagger = asyncio.ensure_future(lag.run(client.t0))
        requests = await open_loop(client, lambda t: rate, lambda t: t >= duration)
        lagger.cancel()
    return {"rate": rate, "counts": tally(requests), **latencies(requests), "own_loop_lag": lag.summary()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="append", required=True, help="front door(s), taken in turn")
    ap.add_argument("--path", default="/classify")
    ap.add_argument("--text", default="where is my package", help="the text every probe classifies")
    ap.add_argument("--start-at", type=float, default=0.0, help="time.time() of the first probe (default: now)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of probing")
    ap.add_argument("--rate", type=float, default=20.0, help="probes per second")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-probe timeout, seconds")
    a = ap.parse_args(argv)
    import uvloop

    body = json.dumps({"text": a.text}).encode()
    print(json.dumps(uvloop.run(probe(a.url, a.path, body, a.start_at, a.duration, a.rate, a.timeout))))


if __name__ == "__main__":
    main()
