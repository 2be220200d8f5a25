import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOMAINS = [
    "auto_and_commute",
    "banking",
    "credit_cards",
    "home",
    "kitchen_and_dining",
    "meta",
    "small_talk",
    "travel",
    "utility",
    "work",
]


@pytest.fixture(autouse=True)
def _console_back():
    """A step's main() run in the test process takes over stdout/stderr (ray_jobs/console.py): give them back."""
    yield
    from ray_jobs import console

    console.detach()


@pytest.fixture(scope="session")
def smollm2_path():
    from textclf.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


# A small run of the real pipeline (2 Ray Train workers, 4 steps, vLLM evaluation), trained once per session and
# shared by the pipeline tests and the serving tests. TEXTCLF_TEST_RUN=<run folder> reuses an existing one.
SMALL = [
    "--max-train-examples",
    "40",
    "--max-eval-examples",
    "30",
    "--num-workers",
    "2",
    "--per-device-batch-size",
    "2",
    "--max-steps",
    "4",
    "--eval-steps",
    "2",
    "--save-steps",
    "2",
    "--logging-steps",
    "1",
    "--warmup-steps",
    "1",
    "--kv-cache-gib",
    "0.25",
    "--max-num-seqs",
    "32",
]


def run_step(step, *args, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"ray_jobs.{step}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """(runs dir, run dir, the pipeline's output)."""
    given = os.environ.get("TEXTCLF_TEST_RUN")
    if given:
        run = Path(given).resolve()
        return run.parent, run, (run / "pipeline.log").read_text() if (run / "pipeline.log").exists() else ""
    runs = tmp_path_factory.mktemp("runs")
    proc = run_step("pipeline", "--runs-dir", str(runs), "--name", "tiny", *SMALL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    (runs / "tiny" / "pipeline.log").write_text(out)
    return runs, runs / "tiny", out


@pytest.fixture(scope="session")
def tiny_run(tiny_pipeline):
    return tiny_pipeline[1]


# Serve tests (test_serve, test_encoder): one local Ray + Serve per test module, on its own port and temp dir.
MARKER = f"TEXTCLF_SERVE_TEST={uuid.uuid4().hex}"  # in the environment of every process the serve tests start
# abstain_threshold 0: the tests check labels; the tiny run's own threshold (classifier.json) would withhold some.
TEST_ARGS = {
    "request_timeout_s": 300,
    "max_text_chars": 5000,
    "max_batch": 40,
    "max_body_bytes": 65536,
    "abstain_threshold": 0.0,
    "engine": {"kv_cache_gib": 0.25, "max_num_seqs": 32},
}
ONE_REPLICA = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
}


def shutdown_serve(cluster, timeout: float = 60) -> list[int]:
    """Shut Serve down and wait for the engines to exit; the vLLM processes still left after `timeout`."""
    import time

    from ray import serve

    serve.shutdown()
    cluster["shut"] = True
    deadline = time.time() + timeout
    while our_vllm_processes() and time.time() < deadline:
        time.sleep(1)
    return our_vllm_processes()


def our_vllm_processes(marker: str = MARKER, vllm_only: bool = True) -> list[int]:
    """vLLM engine processes started by the serve tests (found by the marker, KEY=VALUE, in their environment);
    with vllm_only False every process that carries it."""
    found = []
    key = marker.encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes()
            name = (p / "comm").read_text() + (p / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if key in env.split(b"\0") and ("VLLM" in name or not vllm_only):
            found.append(int(p.name))
    return found


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    k, v = MARKER.split("=")
    os.environ[k] = v
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp,
        log_to_driver=False,
        runtime_env={"env_vars": {k: v, "PYTHONPATH": os.environ["PYTHONPATH"], "HF_HUB_OFFLINE": "1"}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    state = {"url": f"http://127.0.0.1:{port}", "shut": False}
    yield state
    if not state["shut"]:
        serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
