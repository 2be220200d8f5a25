"""A real two-node Ray cluster on this machine (cluster/local.py): training and evaluation submitted with
`ray job submit --working-dir .`, training workers on both nodes, a run folder behind a URI (file://, the one
pyarrow scheme that works offline here; s3:// and gs:// take the same code path), a training worker killed
mid-run, and a teardown that leaves none of the cluster's processes behind."""

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from cluster import local

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["--config", "configs/smoke.yaml", "--placement-strategy", "SPREAD"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    state = local.up(state_dir, workers=1, memory_gib=3.0, object_store_gib=0.4)
    yield state
    stopped = local.down(state_dir)
    assert stopped, "down found no process to stop"
    left = [p for p in stopped if local._alive(p)]
    assert not left, f"processes of the test cluster still running: {left}"
    assert not local._naming(state["root"]), "a process still names the cluster's temp dir"
    assert not Path(state["root"]).exists()


def ray_cli(cluster, *args, timeout=600):
    env = local.cli_env(cluster)
    return subprocess.run([RAY, "job", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def submit(cluster, *entrypoint, wait=True, submission_id=None, timeout=600):
    args = [
        "submit",
        "--address",
        cluster["dashboard"],
        "--working-dir",
        ".",
        # RAY_DEDUP_LOGS=0: Ray folds log lines that differ only in numbers (ranks, steps) across workers.
        "--runtime-env-json",
        json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}}),
    ]
    if submission_id:
        args += ["--submission-id", submission_id]
    if not wait:
        args.append("--no-wait")
    return ray_cli(cluster, *args, "--", *entrypoint, timeout=timeout)


def node_ids(cluster) -> set[str]:
    """The node ids `ray status` lists as active for this cluster."""
    status = subprocess.run(
        [RAY, "status", "--address", cluster["gcs_address"]], capture_output=True, text=True, env=local.cli_env(cluster)
    ).stdout
    return set(re.findall(r"node_([0-9a-f]{20,})", status))


def test_cluster_is_two_nodes_on_loopback(cluster):
    assert len(cluster["nodes"]) == 2 and len(node_ids(cluster)) == 2
    assert cluster["dashboard"].startswith("http://127.0.0.1:")
    dash_port = int(cluster["dashboard"].rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == dash_port]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    assert int(cluster["gcs_address"].rsplit(":", 1)[1]) not in (6379, 8265)


def _train_workers(cluster) -> list[psutil.Process]:
    procs = []
    for pid in local.cluster_pids(cluster):
        try:
            p = psutil.Process(pid)
            if "RayTrainWorker" in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    return procs


def _steps(path: Path) -> list[int]:
    """Global steps of the checkpoints written so far (one still being copied is skipped)."""
    steps = []
    for p in path.glob("checkpoint_*/checkpoint/trainer_state.json"):
        try:
            steps.append(json.loads(p.read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            pass
    return sorted(steps)


STEPS = 6


@pytest.fixture(scope="module")
def killed_run(cluster, tmp_path_factory):
    """One training job, the only one of this module (each costs minutes on 2 cores): submitted with
    `ray job submit --no-wait` onto a run folder behind a file:// URI, one of its two workers SIGKILLed once the
    first checkpoint is on disk. Returns the URI, the run's folder, the newest checkpoint's step before the kill,
    whether and how the job ended, and its log."""
    bucket = tmp_path_factory.mktemp("bucket")
    runs_uri = f"file://{bucket}/runs"
    job = f"kill-{uuid.uuid4().hex[:8]}"
    args = ["--runs-dir", runs_uri, "--name", "cl", "--max-steps", str(STEPS), "--max-failures", "2"]
    args += ["--checkpoints-to-keep", "10"]
    proc = submit(cluster, "python", "-m", "ray_jobs.train", *TINY, *args, wait=False, submission_id=job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    remote = bucket / "runs" / "cl"
    ckpt_dir = remote / "ray_train"
    deadline = time.time() + 400
    while not _steps(ckpt_dir):
        assert time.time() < deadline, ray_cli(cluster, "logs", "--address", cluster["dashboard"], job).stdout[-4000:]
        time.sleep(0.5)
    # A checkpoint lands on disk just before Ray Train records it: give it a moment, so the one seen is the one
    # (or older than the one) a restart resumes from.
    killed_after = max(_steps(ckpt_dir))
    time.sleep(3)
    victims = _train_workers(cluster)
    assert len(victims) == 2, [p.cmdline() for p in victims]
    victims[-1].send_signal(signal.SIGKILL)
    assert max(_steps(ckpt_dir)) < STEPS, "training finished before the kill"

    while True:
        proc = ray_cli(cluster, "status", "--address", cluster["dashboard"], job)
        # The CLI prints, on stderr, "Job '<id>' succeeded" (failed, was stopped) once the job has ended, and
        # "Status for job '<id>': RUNNING" before.
        st = proc.stdout + proc.stderr
        ended = re.search(rf"Job '{job}' (succeeded|failed|was stopped)", st)
        if ended or time.time() > deadline:
            break
        time.sleep(2)
    log = ray_cli(cluster, "logs", "--address", cluster["dashboard"], job).stdout
    return {
        "uri": runs_uri,
        "remote": remote,
        "killed_after": killed_after,
        "ended": ended and ended.group(1),
        "log": st + log,
    }


def test_killed_training_worker_resumes_from_its_checkpoint(killed_run):
    log = killed_run["log"]
    assert killed_run["ended"] == "succeeded", log[-6000:]
    assert "[train] resuming from" in log, log[-6000:]
    after = log[log.index("[train] resuming from") :]
    start = re.search(rf"\[train\] start: world_size 2, \d+ threads, step (\d+)/{STEPS}.*\n", after)
    assert start, after[-6000:]
    resumed_at = int(start.group(1))
    assert resumed_at >= killed_run["killed_after"] >= 2  # the global step continues from a checkpoint, not from 0
    # the progress lines after the resumed start line (which names the start step itself)
    later = [int(s) for s in re.findall(rf"\[train\] step (\d+)/{STEPS}", after[start.end() :])]
    assert later and min(later) > resumed_at and max(later) == STEPS
    assert max(_steps(killed_run["remote"] / "ray_train")) == STEPS


def test_training_ran_on_both_nodes_and_wrote_the_run_behind_the_uri(cluster, killed_run):
    out, remote = killed_run["log"], killed_run["remote"]
    assert killed_run["ended"] == "succeeded", out[-6000:]
    # Each rank printed its node (again after the restart): two ranks, two different nodes, both of this cluster.
    ranks = dict(re.findall(r"\[train\] rank (\d+) on node ([0-9a-f]+)", out))
    assert set(ranks) == {"0", "1"}, out[-4000:]
    assert len(set(ranks.values())) == 2 and set(ranks.values()) <= node_ids(cluster)
    workers = json.loads((remote / "train_output.json").read_text())["worker_nodes"]  # as Ray Train reported them
    assert len(workers) == 2 and set(workers) == set(ranks.values())
    assert (remote / "adapter" / "classifier.json").exists() and (remote / "config.yaml").exists()
    assert list((remote / "ray_train").glob("checkpoint_*/checkpoint/trainer_state.json"))


def test_export_then_evaluate_jobs_through_the_uri(cluster, killed_run):
    assert killed_run["ended"] == "succeeded", killed_run["log"][-6000:]
    runs_uri, remote = killed_run["uri"], killed_run["remote"]
    probe = "python -c \"import os, sys; print('PY', sys.executable); print('TOP', sorted(os.listdir('.')))\""
    # `ray job submit -- a b` quotes each argument, so a command line with && goes through bash -c.
    proc = submit(
        cluster,
        "bash",
        "-c",
        f"{probe} && python -m ray_jobs.export --runs-dir {runs_uri} --name cl && "
        f"python -m ray_jobs.evaluate --config configs/smoke.yaml --runs-dir {runs_uri} --name cl",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "macro_f1=" in out, out[-6000:]
    # The job's `python` is this venv's, on the uploaded working dir, without .venv / runs / .git in it.
    assert Path(re.search(r"^PY (\S+)$", out, re.M).group(1)).parent == Path(sys.executable).parent
    top = re.search(r"^TOP (.*)$", out, re.M).group(1)
    assert "'ray_jobs'" in top and not any(f"'{d}'" in top for d in (".venv", "runs", ".git"))
    metrics = json.loads((remote / "metrics.json").read_text())  # mirrored back to the URI
    assert metrics["n"] > 0 and 0 <= metrics["macro_f1"] <= 1
    assert (remote / "merged" / "model.safetensors").exists()
