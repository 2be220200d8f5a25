"""bench/lean_http.py, the load client's HTTP, against small real servers (aiohttp in-process, or raw asyncio sockets
for the misbehaving ones)."""

import asyncio

import pytest
from aiohttp import web
from support import classify_stub

from bench.lean_http import LeanSession
from serve_app.local import free_port


def _with_stub(handler, use):
    """Run `await use(url)` against a /classify served by `handler`."""

    async def go():
        runner, url = await classify_stub(handler)
        try:
            return await use(url + "/classify")
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_answers_come_back_whole_on_one_kept_alive_connection():
    peers = []

    async def echo(request):
        peers.append(request.transport.get_extra_info("peername"))
        body = await request.read()
        return web.json_response({"echo": body.decode()}, status=429, headers={"Retry-After": "2"})

    async def use(url):
        async with LeanSession() as s:
            return [await s.post(url, b'{"text": "hi %d"}' % i) for i in range(20)]

    answers = _with_stub(echo, use)
    assert [a.body for a in answers] == [b'{"echo": "{\\"text\\": \\"hi %d\\"}"}' % i for i in range(20)]
    assert all(a.status == 429 and a.headers["retry-after"] == "2" for a in answers)
    assert answers[0].headers["content-type"].startswith("application/json")
    assert len(set(peers)) == 1  # keep-alive: every request on the first connection


def test_concurrent_requests_each_get_their_own_answer():
    async def echo(request):
        body = await request.read()
        await asyncio.sleep(0.01 * (len(body) % 5))  # answers finish out of order
        return web.Response(body=body)

    async def use(url):
        async with LeanSession() as s:
            return await asyncio.gather(*(s.post(url, b"x" * n) for n in range(1, 61)))

    answers = _with_stub(echo, use)
    assert [len(a.body) for a in answers] == list(range(1, 61)) and {a.status for a in answers} == {200}


def test_a_chunked_answer_is_read_whole():
    async def chunked(request):
        resp = web.StreamResponse(status=200)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"a": ', b"1", b"}"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def use(url):
        async with LeanSession() as s:
            return await s.post(url, b"{}"), await s.post(url, b"{}")

    first, second = _with_stub(chunked, use)
    assert first.body == second.body == b'{"a": 1}'
    assert first.headers["transfer-encoding"] == "chunked"


def test_connection_close_is_honoured():
    peers = []

    async def closing(request):
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="bye", headers={"Connection": "close"})

    async def use(url):
        async with LeanSession() as s:
            answers = [await s.post(url, b"{}") for _ in range(3)]
            return answers, sum(map(len, s.idle.values()))

    answers, pooled = _with_stub(closing, use)
    assert [a.body for a in answers] == [b"bye"] * 3 and pooled == 0
    assert len(set(peers)) == 3  # a new connection for each


def test_a_slow_answer_times_out_and_its_connection_is_not_reused():
    peers = []

    async def slow_once(request):
        peers.append(request.transport.get_extra_info("peername"))
        if len(peers) == 1:
            await asyncio.sleep(2)
        return web.Response(text="ok")

    async def use(url):
        async with LeanSession(timeout=0.3) as s:
            with pytest.raises(TimeoutError):
                await s.post(url, b"{}")
            return await s.post(url, b"{}")

    answer = _with_stub(slow_once, use)
    assert answer.body == b"ok" and len(set(peers)) == 2


def test_a_server_that_hangs_up_or_speaks_garbage_fails_the_attempt_only():
    async def go():
        served = {"n": 0}

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            served["n"] += 1
            if served["n"] == 2:
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            elif served["n"] == 3:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()  # the first: closed before any answer

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/classify"
        try:
            async with LeanSession(timeout=5) as s:
                outcomes = []
                for _ in range(3):
                    try:
                        outcomes.append((await s.post(url, b"{}")).body)
                    except Exception as exc:
                        outcomes.append(type(exc).__name__)
                return outcomes
        finally:
            server.close()

    hung_up, garbage, ok = asyncio.run(go())
    assert hung_up == "ConnectionResetError" and garbage == "HttpParserError" and ok == b"ok"


def test_nobody_listening_and_other_schemes():
    async def go():
        async with LeanSession(timeout=5) as s:
            with pytest.raises(ConnectionRefusedError):
                await s.post(f"http://127.0.0.1:{free_port()}/classify", b"{}")
            with pytest.raises(ValueError, match="plain http"):
                await s.post("https://127.0.0.1/classify", b"{}")

    asyncio.run(go())


def test_the_client_cost_benchmark_times_both_clients(capsys):
    from bench import client_cost

    client_cost.main(["--rate", "200", "--seconds", "0.5", "--rounds", "1"])
    rows = [
        line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith(("| aiohttp", "| lean"))
    ]
    assert [r[1].strip() for r in rows] == ["aiohttp", "lean_http"]
    assert all(r[2].strip() == r[3].strip() == "100" and float(r[4]) > 0 for r in rows)  # sent, all answered, CPU
