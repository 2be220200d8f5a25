"""Serve's autoscaling policy for the classifier (config.yaml's `autoscaling_config.policy`): Serve's own, with
the requests the replicas turned away counted as demand.

Serve scales on the requests in progress at the replicas over `target_ongoing_requests`. A replica holds no more
than its admission limit (textclf/serving/admission.py), which for a slow model can sit under that target: an
overload would then be refused (429) and never scaled for. Each replica reports what it turned away as the
requests it would have kept in progress (`ClassifierServer.record_autoscaling_stats`); this policy adds them to
Serve's count. Serve applies its delays, smoothing and replica bounds around any policy. The Serve controller
imports this module: Ray only.
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

UNSERVED = "unserved_requests"  # the metric each replica reports


def policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    desired, state = replica_queue_length_autoscaling_policy(ctx)
    unserved = sum((ctx.aggregated_metrics or {}).get(UNSERVED, {}).values())
    if ctx.current_num_replicas and unserved > 0:
        desired += unserved / ctx.config.get_target_ongoing_requests()
    return desired, state
