"""The autoscaling policy of config.yaml (serve_app/autoscaling.py): Serve's own count of requests in progress,
plus the requests the replicas report they turned away. Run in a subprocess, as importing ray.serve here would change
the logging and Serve settings of later tests."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, sys
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from serve_app.autoscaling import UNSERVED, policy

config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=16)
replica = ReplicaID("r1", DeploymentID(name="Classifier", app_name="textclf"))
out = []
for in_progress, unserved in json.loads(sys.argv[1]):
    ctx = AutoscalingContext(
        deployment_id=replica.deployment_id, deployment_name="Classifier", app_name="textclf",
        current_num_replicas=1, target_num_replicas=1, running_replicas=[replica],
        total_num_requests=in_progress, total_queued_requests=0,
        aggregated_metrics={UNSERVED: {replica: unserved}} if unserved is not None else {},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config,
    )
    out.append(policy(ctx)[0])
print(json.dumps(out))
"""


def test_turned_away_requests_count_as_demand():
    cases = [[12, None], [12, 0.0], [12, 28.0], [40, 0.0]]
    proc = subprocess.run(
        [sys.executable, "-c", CODE, json.dumps(cases)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    without, none, refused, busy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert without == none == 12 / 16  # Serve's own: one replica holding 12 of its target 16
    assert refused == (12 + 28) / 16  # 28 more would be in progress: a second replica
    assert busy == 40 / 16
