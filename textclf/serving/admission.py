"""How many texts a replica takes at once: a limit that follows the engine's latency.

A fixed limit suits one model's speed only: the 64 requests a replica takes (and the queues in front of it) wait
about 0.4 s on the tiny test model and 5–13 s on the generative classifier of `make run` on CPU
(bench/results/chaos-*-generative.md). `AdaptiveLimit` keeps what it admits near a latency target. Every
`interval_s` it takes the latency of the requests admitted since its last change: the mean of their answers, or
the age of the oldest still open where that is longer (an engine that answers nothing yet). Slower than the
target, the limit shrinks in proportion (at most by half at a time); not slower while requests were turned away,
it grows: doubles under half the target, else by its square root (the gradient of Netflix's concurrency-limits
and Envoy's adaptive concurrency filter). Requests admitted before a change say nothing of the new limit, so a
shrink is not repeated while they drain, and it grows only on answers of requests admitted since. The target is
never under `tolerance` times the fastest answer seen, so that a model slower than the target on its own still
batches. It starts at `start` texts and opens from there as answers come back in time (TCP's slow start): a limit
at its ceiling let a sudden overload's first 64 requests a replica wait 4–8 s on CPU before any answer said so.
An idle replica admits any request, so a batch larger than the limit runs, alone.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Optional

START = 16  # texts at once before any answer was slow: a sudden overload's first requests wait little


class AdaptiveLimit:
    def __init__(
        self,
        ceiling: int,
        target_s: Optional[float],
        start: int = START,
        interval_s: float = 0.5,
        tolerance: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ceiling, self.target_s, self.interval_s = ceiling, target_s, interval_s
        self.tolerance, self.clock = tolerance, clock
        self.value = float(ceiling if target_s is None else min(start, ceiling))
        self.fastest = math.inf
        self._open: dict[int, float] = {}  # request -> its admission time, oldest first
        self._keys = itertools.count()
        self._changed = self._since = clock()
        self._total, self._answers, self._turned_away = 0.0, 0, False
        self.on_change: Optional[Callable[[int], None]] = None  # told each new limit (the replica's gauge)
        self._refused, self._counted_since = 0, clock()

    @property
    def limit(self) -> int:
        return max(1, int(self.value))

    @property
    def target(self) -> Optional[float]:
        """The latency aimed at: target_s, or tolerance x the fastest answer where that is longer; None: fixed."""
        if self.target_s is None:
            return None
        return max(self.target_s, self.tolerance * self.fastest) if self.fastest < math.inf else self.target_s

    def admits(self, inflight: int, n: int, cap: Optional[int] = None) -> bool:
        """Whether n more texts may start beside `inflight`, within the limit and within `cap` (a bound of the
        caller's: Serve's requests per replica); a refusal counts as demand beyond the limit."""
        self._review()
        if inflight == 0 or inflight + n <= (self.limit if cap is None else min(self.limit, cap)):
            return True
        self._turned_away = True
        self._refused += 1  # requests, as Serve counts those in progress
        return False

    def unserved(self) -> float:
        """The requests turned away since the last call as the requests they would have kept in progress: per
        second, times the target latency (Little's law); what Serve's autoscaling cannot see, as the replica holds
        only its limit (serve_app/autoscaling.py). 0 without a target: a fixed limit is reached in Serve's own
        count."""
        now, target = self.clock(), self.target
        elapsed, refused = now - self._counted_since, self._refused
        self._refused, self._counted_since = 0, now
        return refused / elapsed * target if target is not None and elapsed > 0 else 0.0

    def begin(self) -> int:
        """An admitted request starts; its key for `end`."""
        key = next(self._keys)
        self._open[key] = self.clock()
        return key

    def end(self, key: int, answered: bool = True) -> None:
        """The request is over: answered (its latency counts), or failed."""
        started = self._open.pop(key)
        if answered:
            latency = self.clock() - started
            self.fastest = min(self.fastest, latency)
            if started >= self._changed:
                self._total += latency
                self._answers += 1
        self._review()

    def _review(self) -> None:
        now, target = self.clock(), self.target
        if target is None or now - self._since < self.interval_s:
            return
        oldest = next((now - t for t in self._open.values() if t >= self._changed), 0.0)
        latency = max(self._total / self._answers if self._answers else 0.0, oldest)
        before = self.limit
        if latency > target:
            self.value = max(1.0, self.value * max(0.5, target / latency))
            self._changed = now
        elif self._turned_away and self._answers:  # far under the target it doubles, near it creeps
            grown = 2 * self.value if latency < target / 2 else self.value + math.sqrt(self.value)
            self.value = min(float(self.ceiling), grown)
        self._total, self._answers, self._turned_away, self._since = 0.0, 0, False, now
        if self.on_change is not None and self.limit != before:
            self.on_change(self.limit)
