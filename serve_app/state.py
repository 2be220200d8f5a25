"""Per-process state of a replica: Prometheus metrics and HTTP limits.

Kept in its own module on purpose: Ray pickles the Serve deployment class by value, so module globals it
references would be copied, while the FastAPI middleware reaches the module itself. Both go through this
module (always pickled by reference), so they share one registry and one set of limits.
"""
from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()
REQUESTS = Counter("textclf_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=REGISTRY)
LATENCY = Histogram("textclf_request_latency_seconds", "HTTP request latency by endpoint", ["endpoint"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
PREDICTIONS = Counter("textclf_predictions", "Predictions by classifier and label (label \"\" when abstained)",
                      ["model", "label"], registry=REGISTRY)
TRUNCATED = Counter("textclf_truncated_texts", "Texts cut by tokens to the model's prompt length", ["model"],
                    registry=REGISTRY)

LIMITS = {"max_body_bytes": 1 << 20}  # set by the replica from its config
