"""The adaptive admission limit (textclf/serving/admission.py): on a clock of its own, and in the classify core
over a fake engine whose answers slow down with the texts it holds (no Ray, no vLLM engine)."""

from __future__ import annotations

import asyncio
import time

from serving_fakes import make_classifiers

from textclf.serving.admission import AdaptiveLimit
from textclf.serving.errors import Overloaded


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answer(a: AdaptiveLimit, clock: Clock, latency: float) -> None:
    """One request admitted now and answered `latency` seconds later."""
    key = a.begin()
    clock.now += latency
    a.end(key)


def after_an_idle_answer(clock: Clock, target_s=1.0, ceiling=64) -> AdaptiveLimit:
    """A limit that has seen an answer of 0.1 s (as a replica's readiness check), in an interval of its own."""
    a = AdaptiveLimit(ceiling, target_s, start=ceiling, interval_s=0.5, clock=clock)
    answer(a, clock, 0.1)
    clock.now += 0.5
    assert a.admits(0, 1)  # (the interval closes)
    return a


def limit_after(latencies: list[float], target_s=1.0, turned_away=True) -> AdaptiveLimit:
    """After an idle answer, one answer of each latency, each an interval or more, with a refusal before each."""
    clock = Clock()
    a = after_an_idle_answer(clock, target_s)
    for latency in latencies:
        if turned_away:
            assert not a.admits(a.limit, 1)
        answer(a, clock, max(latency, 0.5))
    return a


def test_slow_answers_shrink_the_limit_in_proportion_at_most_by_half():
    assert limit_after([0.9]).limit == 64  # within the target: kept
    assert limit_after([1.6]).limit == 40  # 64 x 1.0 / 1.6
    assert limit_after([10.0]).limit == 32  # at most halved at a time
    assert limit_after([10.0] * 20).limit == 1  # never under one


def test_the_limit_grows_back_only_while_requests_are_turned_away():
    assert limit_after([10.0] * 3 + [0.6]).limit == 10  # 64 -> 32 -> 16 -> 8, then near the target: 8 + sqrt(8)
    assert limit_after([10.0] * 3 + [0.6], turned_away=False).limit == 8  # no demand beyond it: no growth
    clock = Clock()
    a = after_an_idle_answer(clock, target_s=2.0)
    for _ in range(3):
        assert not a.admits(a.limit, 1)
        answer(a, clock, 20.0)
    assert a.limit == 8
    assert not a.admits(8, 1)
    answer(a, clock, 0.5)  # under half the target: doubled
    assert a.limit == 16
    assert limit_after([10.0] + [0.5] * 50).limit == 64  # never over the ceiling


def test_it_starts_low_and_opens_while_answers_come_in_time():
    assert AdaptiveLimit(256, None).limit == 256 and AdaptiveLimit(8, 1.0).limit == 8
    clock = Clock()
    a = AdaptiveLimit(256, 1.0, clock=clock)
    assert a.limit == 16
    for expected in (32, 64, 128, 256, 256):
        assert not a.admits(a.limit, 1)
        answer(a, clock, 0.3)  # under half the target
        clock.now += 0.2
        assert a.admits(0, 1)  # (the interval closes)
        assert a.limit == expected


def test_each_new_limit_is_told():
    told = []
    a = limit_after([])
    a.on_change = told.append
    for latency, refused in ((1.6, True), (10.0, True), (0.9, False), (0.6, True)):  # 64 -> 40 -> 20, kept, 24
        if refused:
            assert not a.admits(a.limit, 1)
        answer(a, a.clock, latency)
    assert told == [40, 20, 24]


def test_what_it_turns_away_is_reported_as_requests_in_progress():
    clock = Clock()
    a = after_an_idle_answer(clock)  # target 1 s
    a.unserved()  # (counted from here)
    for _ in range(10):
        assert not a.admits(a.limit, 1)
    assert not a.admits(a.limit, 30)  # one request, as Serve counts them
    clock.now += 2.0
    assert a.unserved() == 5.5  # 11 requests in 2 s, each 1 s in progress
    clock.now += 1.0
    assert a.unserved() == 0.0  # counted once
    fixed = AdaptiveLimit(4, None, clock=clock)
    assert not fixed.admits(4, 1)
    clock.now += 1.0
    assert fixed.unserved() == 0.0  # a fixed limit is reached in Serve's own count


def test_the_limit_moves_once_an_interval():
    clock = Clock()
    a = after_an_idle_answer(clock, target_s=0.2)
    keys = [a.begin() for _ in range(10)]
    clock.now += 0.4
    for key in keys:
        a.end(key)  # ten answers of 0.4 s within the interval
    assert a.limit == 64
    clock.now += 0.1
    assert not a.admits(64, 1)  # the interval closes: 64 x 0.2 / 0.4
    assert a.limit == 32


def test_an_engine_that_answers_nothing_shrinks_it_once_until_what_it_holds_drains():
    clock = Clock()
    a = after_an_idle_answer(clock)
    held = a.begin()
    clock.now += 3.0
    a.admits(1, 1)  # the oldest open request is 3 s old: halved, no answer needed
    assert a.limit == 32
    clock.now += 3.0
    a.end(held)  # admitted before the change: says nothing of the new limit
    clock.now += 1.0
    a.admits(1, 1)
    assert a.limit == 32


def test_an_idle_replica_admits_any_request_and_a_busy_one_up_to_the_limit():
    a = limit_after([10.0] * 4)
    assert a.limit == 4
    assert a.admits(0, 64)  # a batch larger than the limit, alone
    assert a.admits(3, 1) and not a.admits(3, 2) and not a.admits(4, 1)


def test_a_callers_cap_bounds_it_too_and_its_refusals_are_demand():
    """The replica's door passes Serve's max_ongoing_requests (serve_app/replica_gate.py)."""
    clock = Clock()
    a = after_an_idle_answer(clock)  # limit 64, target 1 s
    a.unserved()
    assert a.admits(3, 1, cap=4) and not a.admits(4, 1, cap=4) and a.admits(0, 1, cap=0)
    assert a.admits(63, 1, cap=100) and not a.admits(64, 1, cap=100)  # the limit still binds under a higher cap
    clock.now += 1.0
    assert a.unserved() == 2.0  # both refusals: requests turned away that autoscaling should see


def test_the_target_is_never_under_twice_the_fastest_answer():
    clock = Clock()
    a = AdaptiveLimit(64, 1.0, start=64, clock=clock)
    for _ in range(3):  # 3 s alone: a model slower than the target
        assert not a.admits(64, 1)
        answer(a, clock, 3.0)
    assert a.target == 6.0 and a.limit == 64  # it keeps batching
    assert AdaptiveLimit(64, 1.0).target == 1.0  # no answer yet


def test_without_a_target_the_limit_is_fixed():
    a = limit_after([100.0] * 5, target_s=None)
    assert a.limit == 64 and a.target is None
    assert not a.admits(64, 1) and a.admits(63, 1)


def run_overload(clf, engine, seconds: float) -> tuple[list[float], int]:
    """Requests started every 2 ms for `seconds` against the core; (latencies of those answered in the second
    half, refusals)."""

    async def go():
        latencies, refused, tasks = [], 0, []
        start = time.monotonic()

        async def one():
            nonlocal refused
            t0 = time.monotonic()
            try:
                await clf.classify(["text"])
            except Overloaded:
                refused += 1
                return
            if t0 - start > seconds / 2:
                latencies.append(time.monotonic() - t0)

        while time.monotonic() - start < seconds:
            tasks.append(asyncio.ensure_future(one()))
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        return latencies, refused

    return asyncio.run(go())


class LoadedEngine:
    """Each answer takes 10 ms plus 5 ms for every text in progress when it started, like a batching engine past
    its knee."""

    errored = False

    def __init__(self, engine, clf):
        self.engine, self.clf = engine, clf

    async def complete(self, ids, params, request_id, spec):
        await asyncio.sleep(0.01 + 0.005 * self.clf.inflight)
        return await self.engine.complete(ids, params, request_id, spec)


def test_an_overload_is_refused_and_the_admitted_keep_near_the_target(tokenizer):
    results = {}
    for target in (0.1, None):
        clf, engine, _ = make_classifiers(tokenizer, max_inflight_texts=64, target_latency_s=target)
        clf.admission = AdaptiveLimit(64, target, interval_s=0.1)  # ten reviews a second, not two
        clf.engine = LoadedEngine(engine, clf)
        latencies, refused = run_overload(clf, engine, 2.0)
        results[target] = (sum(latencies) / len(latencies), refused, clf.admission.limit)
    (adaptive, refused, limit), (fixed, fixed_refused, fixed_limit) = results[0.1], results[None]
    assert fixed > 0.3 and fixed_limit == 64  # 64 in progress: ~0.33 s each
    assert limit < 32 and refused > fixed_refused
    assert adaptive < 0.2 and adaptive < fixed / 2
