"""The overload refusal at the door of a replica's own HTTP server (direct ingress), before Serve's request path.

On a replica's port every request went through Serve's ingress (request metadata, routing, its queue) before any
limit was checked, and Serve's queue (`max_queued_requests`) held requests behind the `max_ongoing_requests` in
progress. Under an overload the refusals outnumber the answers, and the replica's one event loop spent as long
refusing as answering: refusals waited up to a second there, accepted requests as long in the queue
(bench/results/chaos-admission-latency.md, "The replica's door").

`AdmissionGate` is the outermost of the middlewares Serve runs around the replica's HTTP server
(serve_app/serve_errors.py `middlewares`). It counts the classify requests it let in, each until its answer ends
(when HAProxy gives the replica its next one), and answers the next one 429 with Retry-After, in the API's JSON, at
once, without reading its body, when the replica holds Serve's `max_ongoing_requests` of them (more would only wait
in Serve's queue) or as many as its admission limit allows texts (textclf/serving/admission.py; a request carries
one text at least, so the app still weighs a batch). The deployment opens the `Door` as its replica starts
(serve_app/app.py); without one (Serve's Python proxy, which runs the same middlewares) every request passes.

Light imports only: Serve builds this as each proxy and replica starts its server.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.serve_errors import answer_json
from textclf.serving.admission import AdaptiveLimit
from textclf.serving.errors import Overloaded, encode_json, error_body

CLASSIFY_PATHS = ("/classify/batch", "/classify")  # the ends of the paths, under the app's route prefix
FLUSH_S = 1.0  # refusals are told to the metrics at most once a second: a Ray metric costs more than the refusal


@dataclass
class Door:
    admission: AdaptiveLimit  # the replica's text limit (Classifiers.admission)
    max_ongoing: Callable[[], Optional[int]]  # Serve's max_ongoing_requests now (a redeploy can change it)
    retry_after_s: int
    refused: Callable[[str, int], None]  # (endpoint, count): refusals for the app's request metrics


_door: Optional[Door] = None


def open_door(door: Optional[Door]) -> None:
    """This process's replica admits by `door` from now on (None: every request passes)."""
    global _door
    _door = door


class AdmissionGate:
    """Pure ASGI; one per HTTP server, so its count is the replica's requests on its own port."""

    def __init__(self, app: ASGIApp):
        self.app, self.held = app, 0
        self.pending: Counter[str] = Counter()  # refusals not yet told to the metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        door = _door
        if door is None or scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        endpoint = next((p for p in CLASSIFY_PATHS if scope["path"].endswith(p)), None)
        if endpoint is None:
            return await self.app(scope, receive, send)
        cap = door.max_ongoing()
        if not door.admission.admits(self.held, 1, cap=cap):
            return await self.refuse(door, cap, endpoint, send)
        self.held += 1
        answered = False

        async def counted(msg: Message) -> None:
            nonlocal answered
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body") and not answered:
                answered = True  # HAProxy frees the slot as the answer ends, before Serve's wrappers return
                self.held -= 1

        try:
            await self.app(scope, receive, counted)
        finally:
            if not answered:
                self.held -= 1

    async def refuse(self, door: Door, cap: Optional[int], endpoint: str, send: Send) -> None:
        exc = refusal(self.held, door.admission.limit, cap)
        body = encode_json(error_body(exc.status, exc.message, None, exc.detail))
        await answer_json(send, exc.status, body, [(b"retry-after", str(door.retry_after_s).encode())])
        if not self.pending:
            asyncio.get_running_loop().call_later(FLUSH_S, self.flush, door)
        self.pending[endpoint] += 1

    def flush(self, door: Door) -> None:
        pending, self.pending = self.pending, Counter()
        for endpoint, n in pending.items():
            door.refused(endpoint, n)


def refusal(held: int, limit: int, max_ongoing: Optional[int]) -> Overloaded:
    bound = limit if max_ongoing is None else min(limit, max_ongoing)
    return Overloaded(
        f"server busy: {held} requests in progress, limit {bound}; retry later",
        {"inflight_requests": held, "limit": limit, "max_ongoing_requests": max_ongoing},
    )
