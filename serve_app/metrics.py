"""The app's metrics (requests, latency, predictions, truncated texts, the admission limit), recorded through
Ray's metrics API: each node's Ray metrics agent exports every replica's series (tagged deployment, replica,
application) in Prometheus text on the node's metrics export port, so one scrape of a node sees all its replicas
(serve_app/README.md, "Metrics"). `AppMetrics` takes the metric classes, so the unit tests record without Ray."""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any, Callable, Iterable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Ray's metric classes: Counter(name, description, tag_keys).inc(value, tags),
# Histogram(name, description, boundaries, tag_keys).observe(value, tags), Gauge(name, description, tag_keys).set(value)
CounterClass = Callable[..., Any]
HistogramClass = Callable[..., Any]
GaugeClass = Callable[..., Any]


class AppMetrics:
    """The app's five metrics; Ray exports them as ray_<name> (counters with _total)."""

    def __init__(self, counter: CounterClass, histogram: HistogramClass, gauge: GaugeClass):
        self.requests = counter(
            "textclf_requests", description="HTTP requests by endpoint and status code", tag_keys=("endpoint", "status")
        )
        self.latency = histogram(
            "textclf_request_latency_seconds",
            description="HTTP request latency by endpoint",
            boundaries=list(LATENCY_BUCKETS),
            tag_keys=("endpoint",),
        )
        self.predictions = counter(
            "textclf_predictions",
            description='Predictions by classifier and label (label "" when abstained)',
            tag_keys=("model", "label"),
        )
        self.truncated = counter(
            "textclf_truncated_texts",
            description="Texts cut by tokens to the model's prompt length",
            tag_keys=("model",),
        )

        self.admission_limit = gauge(
            "textclf_admission_limit",
            description="Texts the replica admits at once now: its latency target's limit (429 beyond it)",
            tag_keys=(),
        )

    def limit(self, texts: int) -> None:
        self.admission_limit.set(texts)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(seconds, tags={"endpoint": endpoint})

    def refused(self, endpoint: str, n: int) -> None:
        """n requests refused at the replica's door (serve_app/replica_gate.py): counted as 429s, their latency not
        observed."""
        self.requests.inc(n, tags={"endpoint": endpoint, "status": "429"})

    def results(self, results: Iterable[dict[str, Any]]) -> None:
        """One record per (model, label) of the answer, not per text: a batch of 64 is 64 texts."""
        labels, truncated = Tally(), Tally()
        for r in results:
            labels[r["model"], r["label"] or ""] += 1
            truncated[r["model"]] += bool(r["truncated"])
        for (model, label), n in labels.items():
            self.predictions.inc(n, tags={"model": model, "label": label})
        for model, n in truncated.items():
            if n:
                self.truncated.inc(n, tags={"model": model})


def serve_metrics() -> AppMetrics:
    """Ray Serve's metric classes, which add the deployment, replica and application tags; in a replica."""
    from ray.serve import metrics

    return AppMetrics(metrics.Counter, metrics.Histogram, metrics.Gauge)
