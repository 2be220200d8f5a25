"""A fake engine and a Classifiers over it, for the serving unit tests (no Ray, no vLLM engine)."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any, Optional

from textclf.prompts import PromptFormat
from textclf.serving import Classifiers, ClassifierSpec, ServeConfig, ServingPlan, load_classifiers

LABELS = ("banking", "travel", "kitchen_and_dining")


class FakeEngine:
    """Answers one-step scoring with fixed logits per label first token; can be slowed, stalled or killed."""

    def __init__(self, plan_logprobs: dict[int, float]):
        self.logprobs = plan_logprobs
        self.errored = False
        self.calls: list[tuple[list[int], str, str]] = []
        self.delay = 0.0  # seconds before each answer
        self.delays: list[float] = []  # seconds before the next answers, one per call, before `delay` applies
        self.gate: Optional[asyncio.Event] = None  # set: answers wait until the event is set (a stalled engine)

    async def complete(self, ids, params, request_id, spec) -> Any:
        self.calls.append((ids, spec.name, request_id))
        delay = self.delays.pop(0) if self.delays else self.delay
        if delay:
            await asyncio.sleep(delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.errored:
            raise RuntimeError("EngineDeadError")
        step = {t: SimpleNamespace(logprob=lp) for t, lp in self.logprobs.items()}
        return SimpleNamespace(logprobs=[step], text="", cumulative_logprob=None)

    async def check_health(self) -> None:
        if self.errored:
            raise RuntimeError("dead")


def make_classifiers(tokenizer, meta: Optional[dict] = None, **cfg) -> tuple[Classifiers, FakeEngine, PromptFormat]:
    """Classifiers over one classifier `clf` whose fake engine answers travel 0.7, banking 0.2, kitchen 0.1."""
    fmt = PromptFormat(labels=LABELS, max_length=64)
    meta = meta or {"kind": "merged", "base_model": "x", "labels": list(LABELS), "prompt": fmt.to_dict()}
    spec = ClassifierSpec("clf", meta, "unused")
    plan = ServingPlan("unused", {"clf": spec}, "clf", 64, False, 1, 16)
    firsts = [ids[0] for ids in fmt.label_token_ids(tokenizer)]
    assert len(set(firsts)) == 3
    engine = FakeEngine({firsts[0]: math.log(0.2), firsts[1]: math.log(0.7), firsts[2]: math.log(0.1)})
    cfg = ServeConfig(**{"max_batch": 4, "max_text_chars": 5000, "top_k": 2, **cfg})
    return Classifiers(cfg, plan, engine, load_classifiers(plan, {"clf": tokenizer})), engine, fmt


class RecordedMetric:
    """A stand-in for Ray's Counter/Histogram/Gauge classes (same constructor and record calls) that keeps each record;
    like Ray, it refuses missing or unknown tags and non-string tag values."""

    def __init__(self, name: str, description: str = "", boundaries: Optional[list] = None, tag_keys=()):
        self.name, self.boundaries, self.tag_keys = name, boundaries, tuple(tag_keys)
        self.records: list[tuple[dict[str, str], float]] = []

    def inc(self, value: float = 1.0, tags: Optional[dict[str, str]] = None) -> None:
        assert value > 0, "Ray's Counter refuses values <= 0"
        self._record(value, tags or {})

    def observe(self, value: float, tags: Optional[dict[str, str]] = None) -> None:
        self._record(value, tags or {})

    def set(self, value: float, tags: Optional[dict[str, str]] = None) -> None:
        self._record(value, tags or {})

    def _record(self, value: float, tags: dict[str, str]) -> None:
        if set(tags) != set(self.tag_keys):
            raise ValueError(f"{self.name}: tags {sorted(tags)}, expected {sorted(self.tag_keys)}")
        if not all(isinstance(v, str) for v in tags.values()):
            raise TypeError(f"{self.name}: tag values must be str: {tags}")
        self.records.append((dict(tags), value))

    def totals(self, *keys: str) -> dict[tuple[str, ...], float]:
        """The sum of records by the values of these tags."""
        out: dict[tuple[str, ...], float] = {}
        for tags, value in self.records:
            k = tuple(tags[key] for key in keys)
            out[k] = out.get(k, 0) + value
        return out

    def counts(self, *keys: str) -> dict[tuple[str, ...], int]:
        """The number of records (observations) by the values of these tags."""
        out: dict[tuple[str, ...], int] = {}
        for tags, _ in self.records:
            k = tuple(tags[key] for key in keys)
            out[k] = out.get(k, 0) + 1
        return out


def recorded_metrics():
    """The app's AppMetrics over RecordedMetric."""
    from serve_app.metrics import AppMetrics

    return AppMetrics(RecordedMetric, RecordedMetric, RecordedMetric)
