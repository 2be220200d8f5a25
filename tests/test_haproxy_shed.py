"""Overload shedding in Serve's HAProxy (serve_app/haproxy_shed.py): the config Ray 2.60 itself generates, rewritten by
the wrapper, run by Ray's bundled HAProxy binary in front of small HTTP servers standing in for replicas (slow,
failing, dropping the connection; no Ray cluster: the wrapper only sees config files). Ray is imported in a
subprocess: importing ray.serve here would fix its settings for the serve tests."""

import json
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serve_app import haproxy_shed, local

ROOT = Path(__file__).resolve().parent.parent
SLOW_S = 2.0  # the stand-in replica's answer time: a refusal that waited for a slot would take this long

GENERATE = """
import os, sys
from ray.serve.config import HTTPOptions
from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
folder, port, replicas, stats, metrics = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:])
cfg = HAProxyConfig(
    socket_path=os.path.join(folder, "admin.sock"), server_state_base=folder,
    server_state_file=os.path.join(folder, "state"), stats_port=stats, metrics_port=metrics,
    http_options=HTTPOptions(host="127.0.0.1", port=port),
)
servers = [ServerConfig(f"replica{i}", "127.0.0.1", int(p)) for i, p in enumerate(replicas.split(","))]
backend = BackendConfig(name="textclf", path_prefix="/", app_name="textclf", servers=servers)
api = HAProxyApi(cfg, {"textclf": backend}, config_file_path=os.path.join(folder, "haproxy.cfg"))
api._generate_config_file_internal()
"""


def ray_config(folder: Path, port: int, *replica_ports: int) -> Path:
    """The HAProxy config Ray's own code writes for one app with these replicas."""
    ports = [str(port), ",".join(map(str, replica_ports)), str(local.free_port()), str(local.free_port())]
    subprocess.run([sys.executable, "-c", GENERATE, str(folder), *ports], check=True, capture_output=True)
    return folder / "haproxy.cfg"


class StandIn(BaseHTTPRequestHandler):
    """A replica's HTTP server: healthy to HAProxy's check; `respond` answers a POST once its body is read."""

    def do_GET(self):  # HAProxy's health check
        self._answer(b'{"status":"ok"}')

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.respond()

    def respond(self):
        self._answer(b'{"label":"x"}')

    def _answer(self, body: bytes, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class SlowReplica(StandIn):
    def respond(self):
        time.sleep(SLOW_S)
        self._answer(b'{"label":"x"}')


class FailingReplica(StandIn):
    def respond(self):  # a replica whose engine is dead: 503 at once
        self._answer(b"", status=503)


class DroppingReplica(StandIn):
    def respond(self):  # a replica process that dies mid-request: the connection closes without an answer
        self.close_connection = True


def serve(handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def replica():
    server = serve(SlowReplica)
    yield server.server_address[1]
    server.shutdown()


@contextmanager
def haproxy(config_file: str, port: int):
    """Ray's bundled HAProxy on `config_file`, once it answers on `port`."""
    binary = haproxy_shed.bundled_haproxy()
    check = subprocess.run([binary, "-c", "-f", config_file], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([binary, "-db", "-f", config_file], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with answering(proc, port):
        yield


@contextmanager
def answering(proc: subprocess.Popen, port: int):
    """Once the HAProxy `proc` answers on `port`; terminated after."""
    try:
        deadline = time.time() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


ERRORS = {502: "/x/502.http", 503: "/x/503.http", 504: "/x/504.http"}


def test_rays_config_gets_the_limit_and_the_refusal(tmp_path):
    config = ray_config(tmp_path, local.free_port(), local.free_port()).read_text()
    assert haproxy_shed.replica_backends(config) == ["textclf"]
    out = haproxy_shed.shed(
        config, maxconn=7, max_queue=3, retry_after_s=2, body_file="/x/busy.json", error_files=ERRORS
    )
    default_server = [line for line in out.splitlines() if line.strip().startswith("default-server")]
    assert default_server and all(line.endswith(" maxconn 7") for line in default_server)
    lines = out.splitlines()
    refusal = next(i for i, line in enumerate(lines) if "/x/busy.json" in line)
    assert "hdr Retry-After 2 file /x/busy.json if is_textclf { queue(textclf) ge 3 }" in lines[refusal]
    assert refusal < next(i for i, line in enumerate(lines) if line.strip().startswith("use_backend textclf"))
    servers = [line for line in lines if line.strip().startswith("server ")]
    assert servers and all(" observe layer7 " in line for line in servers)
    # Ray's plain-text 500 for HAProxy's own errors is replaced, status by status
    assert [line.split() for line in lines if line.strip().startswith("errorfile")] == [
        ["errorfile", str(status), path] for status, path in ERRORS.items()
    ]
    global_limit = haproxy_shed.shed(config, 7, 3, 2, "/x/busy.json", ERRORS, global_maxconn=1234).splitlines()
    assert [line for line in global_limit if line not in lines] == ["    maxconn 1234"]
    assert "    maxconn 4096" in lines and "    maxconn 4096" not in global_limit  # Ray's, where none is given
    # nothing else changed
    assert [
        line
        for line in lines
        if "maxconn 7" not in line
        and "busy.json" not in line
        and "textclf: overload" not in line
        and not line.strip().startswith("errorfile")
        and "observe layer7" not in line
    ] == [
        line
        for line in config.splitlines()
        if not line.strip().startswith(("default-server", "errorfile")) and "observe layer4" not in line
    ]


MOVED = (  # a template whose frontend routes its app some other way than `use_backend`
    "global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 5s\n    timeout client 5s\n"
    "    timeout server 5s\nfrontend http_frontend\n    bind 127.0.0.1:{port}\n    acl is_app path_beg /\n"
    "    http-request return status 404 if !is_app\nbackend app\n    default-server check\n"
    "    server r1 127.0.0.1:{replica} check\n"
)


def test_no_app_no_change_and_a_changed_template_is_noticed():
    empty = "frontend http_frontend\n    bind :8000\n    default_backend default_backend\nbackend default_backend\n"
    assert haproxy_shed.shed(empty, 64, 32, 1, "/b", ERRORS) == empty
    with pytest.raises(ValueError, match="template has changed"):
        haproxy_shed.shed(MOVED.format(port=1, replica=2), 64, 32, 1, "/b", ERRORS)


def test_the_wrapper_serves_rays_config_as_it_is_when_it_cannot_shed(tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(MOVED.format(port=local.free_port(), replica=local.free_port()))
    out = subprocess.run([haproxy_shed.installed_script(), "-c", "-f", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # HAProxy checked Ray's own config
    assert "no overload shedding" in out.stderr and "template has changed" in out.stderr
    assert not Path(f"{config}.shed").exists()


def test_haproxy_refuses_an_overload_at_once_with_the_api_error(tmp_path, replica, monkeypatch):
    port = local.free_port()
    config = ray_config(tmp_path, port, replica)
    monkeypatch.setenv("TEXTCLF_REPLICA_MAXCONN", "2")
    monkeypatch.setenv("TEXTCLF_HAPROXY_MAX_QUEUE", "2")

    def post(_):
        t0 = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{port}/classify", json={"text": "hi"}, timeout=30)
        return r, time.perf_counter() - t0

    with haproxy(haproxy_shed.shed_config(str(config)), port):
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, range(12)))
    served = [(r, s) for r, s in answers if r.status_code == 200]
    refused = [(r, s) for r, s in answers if r.status_code == 503]
    assert len(served) + len(refused) == 12
    assert len(served) >= 4  # 2 at the replica, 2 in HAProxy's queue
    assert len(refused) >= 4
    for r, seconds in refused:
        assert seconds < SLOW_S  # answered without waiting for a replica's slot
        assert r.headers["Retry-After"] == "1"
        assert r.headers["Content-Type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == 503 and error["type"] == "ServiceUnavailableError" and "busy" in error["message"]


@pytest.mark.parametrize("case", ["no replica listening", "replica drops the connection"])
def test_haproxys_own_errors_keep_their_status_with_the_api_error(tmp_path, case):
    if case == "no replica listening":
        replica_port, status = local.free_port(), 503  # connection refused, retried, then no server left
    else:
        server = serve(DroppingReplica)
        replica_port, status = server.server_address[1], 502
    port = local.free_port()
    config = ray_config(tmp_path, port, replica_port)
    assert "Internal Server Error" in (tmp_path / "500.http").read_text()  # what Ray's config answers
    with haproxy(haproxy_shed.shed_config(str(config)), port):
        r = httpx.post(f"http://127.0.0.1:{port}/classify", json={"text": "hi"}, timeout=30)
    if case != "no replica listening":
        server.shutdown()
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["error"]["code"] == status and r.json()["error"]["message"] == haproxy_shed.GATEWAY_ERRORS[status]
    assert r.headers.get("Retry-After") == ("1" if status == 503 else None)


def test_a_replica_answering_5xx_leaves_the_rotation(tmp_path):
    failing, fast = serve(FailingReplica), serve(StandIn)
    port = local.free_port()
    config = ray_config(tmp_path, port, failing.server_address[1], fast.server_address[1])
    with haproxy(haproxy_shed.shed_config(str(config)), port):
        with httpx.Client() as client:
            statuses = [
                client.post(f"http://127.0.0.1:{port}/classify", json={"text": "hi"}).status_code for _ in range(40)
            ]
    failing.shutdown()
    fast.shutdown()
    # Ray's config (observe layer4) alternates between the two for good: about 20 of the 40 would be 503
    assert 1 <= statuses.count(503) <= 3 and statuses[-20:] == [200] * 20, statuses


def test_the_wrapper_runs_rays_haproxy_on_the_rewritten_config(tmp_path):
    config = ray_config(tmp_path, local.free_port(), local.free_port())
    script = haproxy_shed.installed_script()
    assert script, "pip install -e . makes the textclf-haproxy script"
    out = subprocess.run([script, "-c", "-f", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "maxconn 64" in Path(f"{config}.shed").read_text()
    assert json.loads(Path(f"{config}.busy.json").read_text())["error"]["code"] == 503
    bad = subprocess.run([script, "-c", "-f", str(config)], env={**os.environ, "TEXTCLF_REPLICA_MAXCONN": "0"})
    assert bad.returncode != 0


def test_connection_limit_fits_the_open_file_limit():
    assert haproxy_shed.connection_limit(20000) == 7897  # 2.5 files a connection, 256 kept aside
    assert haproxy_shed.connection_limit(4096) == 1536 and haproxy_shed.connection_limit(100) == 1
    assert haproxy_shed.connection_limit(resource.RLIM_INFINITY) == haproxy_shed.connection_limit(10**7) == 65536


def _start(script: str, config: Path, env: dict, open_files: int) -> subprocess.Popen:
    def limit():  # in the child only: the hard limit a smaller host would give HAProxy
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    return subprocess.Popen(
        [script, "-db", "-f", str(config)], env=env, preexec_fn=limit, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_haproxy_starts_with_what_the_open_file_limit_allows(tmp_path):
    """Ray's maxconn 4096 needs ~10,300 open files; under a hard limit of 4096 the wrapper's HAProxy still starts
    and answers, with the connection limit that fits, and Ray's own setting, where given, is kept as it is."""
    port = local.free_port()
    config = ray_config(tmp_path, port, local.free_port())
    script = haproxy_shed.installed_script()
    env = {k: v for k, v in os.environ.items() if k != haproxy_shed.MAXCONN_VAR}
    with answering(_start(script, config, env, 4096), port):
        pass
    shed = Path(f"{config}.shed").read_text()
    assert "\n    maxconn 1536\n" in shed and "maxconn 4096" not in shed
    ray_setting = _start(script, config, {**env, haproxy_shed.MAXCONN_VAR: "4096"}, 4096)
    assert ray_setting.wait(20) != 0 and b"Cannot raise FD limit" in ray_setting.stderr.read()
    assert "\n    maxconn 4096\n" in Path(f"{config}.shed").read_text()
