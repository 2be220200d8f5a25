"""A lean HTTP/1.1 client for load generators that share the service's cores: POSTs over keep-alive connections,
each an asyncio protocol whose answers httptools (uvicorn's parser) reads, pooled per host and port.

On the 2 cores of bench/chaos.py's overload the load client (aiohttp) took more CPU than either replica, and every
core-millisecond it takes is one the service under test waits for; this one does a request's HTTP in about half of
that (bench/results/chaos-lean-client.md). No Ray here.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from functools import lru_cache
from typing import NamedTuple, Optional
from urllib.parse import urlsplit

import httptools


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time (no pipelining)."""

    def __init__(self):
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.waiter: Optional[asyncio.Future] = None
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, request: bytes, waiter: asyncio.Future) -> None:
        self.waiter, self.headers, self.body = waiter, {}, []
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(exc)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.fail(exc or ConnectionResetError("the server closed the connection before its answer"))

    def fail(self, exc: BaseException) -> None:
        self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(Answer(self.parser.get_status_code(), self.headers, b"".join(self.body)))


@lru_cache(maxsize=64)
def _target(url: str) -> tuple[str, int, bytes, bytes]:
    """(host, port, the request line's path, the Host header's value) of an http:// URL."""
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"lean_http speaks plain http:// only, not {url!r}")
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return u.hostname, u.port or 80, path.encode(), u.netloc.encode()


class LeanSession:
    """POSTs with a total timeout per attempt (connect, send, answer). An attempt that fails or times out closes its
    connection; an answered one returns it to the pool unless the server said to close it."""

    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout
        self.idle: defaultdict[tuple[str, int], list[_Connection]] = defaultdict(list)

    async def post(self, url: str, body: bytes, content_type: str = "application/json") -> Answer:
        host, port, path, netloc = _target(url)
        request = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            path,
            netloc,
            content_type.encode(),
            len(body),
            body,
        )
        conn: Optional[_Connection] = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._connection(host, port)
                waiter = asyncio.get_running_loop().create_future()
                conn.send(request, waiter)
                answer = await waiter
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if not conn.closed:
            self.idle[(host, port)].append(conn)
        return answer

    async def _connection(self, host: str, port: int) -> _Connection:
        pool = self.idle[(host, port)]
        while pool:
            conn = pool.pop()
            if not conn.closed:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, host, port)
        return conn

    async def close(self) -> None:
        for pool in self.idle.values():
            for conn in pool:
                conn.close()
        self.idle.clear()

    async def __aenter__(self) -> "LeanSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
