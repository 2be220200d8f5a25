"""Per-process state of a replica: its Prometheus metrics (GET /metrics).

Kept in its own module on purpose: Ray pickles the Serve deployment class by value, so module globals it
references would be copied; this module is always imported by reference, so every part of a replica shares one
registry.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "textclf_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "textclf_request_latency_seconds",
    "HTTP request latency by endpoint",
    ["endpoint"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PREDICTIONS = Counter(
    "textclf_predictions",
    'Predictions by classifier and label (label "" when abstained)',
    ["model", "label"],
    registry=REGISTRY,
)
TRUNCATED = Counter(
    "textclf_truncated_texts", "Texts cut by tokens to the model's prompt length", ["model"], registry=REGISTRY
)
