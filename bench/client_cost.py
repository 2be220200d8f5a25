"""What a load client's HTTP costs in CPU per request: bench/chaos.py's RetryingClient over aiohttp and over
bench.lean_http, side by side, open loop against one small local server in a process of its own.

    python -m bench.client_cost [--rate 1000] [--seconds 10] [--rounds 3]

The server answers every POST at once with a 429 in JSON (an overload's refusal), so the client's work dominates.
Prints a markdown table: CPU ms per request of the client's process, and its own event loop's delay.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import uvloop

from bench.chaos_client import LoopLag, RetryingClient, open_loop, tally
from bench.lean_http import Answer, LeanSession

BODY = b'{"error": {"message": "server busy; retry later", "code": 429}}'
REFUSAL = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def serve(port_out) -> None:
    """Answers each request on a connection with REFUSAL (requests end at the body's Content-Length)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                writer.write(REFUSAL)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], file=port_out, flush=True)
    await server.serve_forever()


class AiohttpSession:
    """aiohttp behind LeanSession's post(url, body) -> Answer, as bench/chaos.py used it before bench.lean_http."""

    def __init__(self, timeout: float):
        self.timeout = timeout

    async def __aenter__(self) -> "AiohttpSession":
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def post(self, url: str, body: bytes) -> Answer:
        async with self.session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            body = await r.read()
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, body)


async def one(kind: str, url: str, rate: float, seconds: float) -> dict:
    session = AiohttpSession(30.0) if kind == "aiohttp" else LeanSession(30.0)
    async with session as s:
        client = RetryingClient(s, lambda: [url], "/classify", [b'{"text": "where is my package"}'], retry=False)
        lag = LoopLag()
        lagger = asyncio.ensure_future(lag.run(client.t0))
        cpu0 = time.process_time()
        requests = await open_loop(client, lambda t: rate, lambda t: t >= seconds)
        cpu = time.process_time() - cpu0
        lagger.cancel()
    counts = tally(requests)
    return {
        "client": kind,
        "sent": counts["sent"],
        "answered": counts["sent"] - counts["lost"],
        "cpu_ms_per_request": round(1000 * cpu / counts["sent"], 3),
        "cores": round(cpu / seconds, 2),
        "own_loop_lag_p99_ms": lag.summary()["p99_ms"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s, open loop")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of load per client and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, the two clients alternating")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server's own process
    a = ap.parse_args(argv)
    if a.serve:
        uvloop.run(serve(sys.stdout))
        return
    server = subprocess.Popen([sys.executable, "-m", "bench.client_cost", "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"
        rows = [
            uvloop.run(one(kind, url + "/classify", a.rate, a.seconds))
            for _ in range(a.rounds)
            for kind in ("aiohttp", "lean_http")
        ]
    finally:
        server.kill()
    print(f"{a.rate:.0f} req/s open loop for {a.seconds:.0f} s per row, against a local server answering 429 at once\n")
    print("| client | sent | answered | CPU ms per request | cores | own loop delay p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['client']} | {r['sent']} | {r['answered']} | {r['cpu_ms_per_request']} | {r['cores']} "
            f"| {r['own_loop_lag_p99_ms']} |"
        )


if __name__ == "__main__":
    main()
