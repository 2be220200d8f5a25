"""The serving environment (serve_app/local.py): HAProxy in front of the replicas' direct-ingress ports by default,
Serve's Python proxy with TEXTCLF_SERVE_INGRESS=proxy, per-user (per-LocalServe) HAProxy files, and what Ray itself
makes of it (in a subprocess: importing ray.serve here would fix its settings for the serve tests)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app import local

ROOT = Path(__file__).resolve().parent.parent


def _env_lines(extra: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    out = subprocess.run(
        [sys.executable, "-m", "serve_app.local", "--env"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_haproxy_is_the_default_with_direct_ingress(monkeypatch):
    monkeypatch.delenv(local.INGRESS_VAR, raising=False)
    env = local.serve_env(haproxy_dir="/tmp/hx")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == "/tmp/hx/haproxy.cfg"
    assert env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == "/tmp/hx"
    assert all(env[k].startswith("/tmp/hx") for k in local.HAPROXY_PATHS)
    # a cluster's pods keep Ray's own paths
    assert not set(local.serve_env("haproxy")) & set(local.HAPROXY_PATHS)


def test_haproxy_runs_through_the_shedding_wrapper_unless_switched_off(monkeypatch):
    monkeypatch.delenv(local.INGRESS_VAR, raising=False)
    monkeypatch.delenv(local.SHED_VAR, raising=False)
    script = local.installed_script()
    assert script and script.endswith("/textclf-haproxy")  # pip install -e . makes it (pyproject [project.scripts])
    assert local.serve_env(haproxy_dir="/tmp/hx")["RAY_SERVE_HAPROXY_BINARY_PATH"] == script
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in local.serve_env("haproxy")  # a cluster names its own install's
    monkeypatch.setenv(local.SHED_VAR, "0")
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in local.serve_env(haproxy_dir="/tmp/hx")


def test_the_switch_puts_the_python_proxy_back(monkeypatch):
    monkeypatch.setenv(local.INGRESS_VAR, "proxy")
    env = local.serve_env(haproxy_dir="/tmp/hx")
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env and not set(env) & set(local.HAPROXY_PATHS)
    assert env == local.BASE_ENV  # direct ingress stays on
    assert local.serve_env("haproxy")["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # the argument wins
    monkeypatch.setenv(local.INGRESS_VAR, "nginx")
    with pytest.raises(ValueError, match="TEXTCLF_SERVE_INGRESS"):
        local.serve_env()


def test_make_serve_env_lines_follow_the_switch():
    default = _env_lines({local.INGRESS_VAR: ""})
    assert default["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert default["RAY_SERVE_HAPROXY_SOCKET_PATH"].startswith(f"/tmp/haproxy-serve-{os.getuid()}/")
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in _env_lines({local.INGRESS_VAR: "proxy"})
    # HAProxy's admin socket is mode 666: the folder keeps other users out
    assert os.stat(local.user_haproxy_dir()).st_mode & 0o777 == 0o700


def test_local_serve_gets_its_own_haproxy_files_and_ports():
    ls = local.LocalServe(di_ports=(18001, 18021))
    try:
        env = ls.env
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert all(env[k].startswith(ls.temp) for k in local.HAPROXY_PATHS)
        assert os.stat(ls.temp).st_mode & 0o777 == 0o700
        ports = [env[k] for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")]
        ports += [env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"], str(ls.http_port)]
        assert len(set(ports)) == 4 and "8404" not in ports and "9101" not in ports
        assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
            "18001",
            "18021",
        )
        assert ls.front_end() == "serve_proxy"  # nothing started: no HAProxy of this cluster runs
    finally:
        os.rmdir(ls.temp)
    ls = local.LocalServe(ingress="proxy")
    os.rmdir(ls.temp)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in ls.env and ls.front_end() == "serve_proxy"


def test_free_ports_stay_out_of_the_ranges_a_starting_cluster_takes():
    """Ray's workers bind 10002-19999 and its other processes the kernel's ephemeral range while a cluster starts:
    a port chosen there could be taken before Serve binds it. Ports given are distinct within the process."""
    low, _ = local.ephemeral_ports()
    ports = [local.free_port() for _ in range(50)] + [local.free_port(all_interfaces=True) for _ in range(10)]
    assert len(set(ports)) == len(ports)
    assert all(local.RAY_WORKER_PORTS_END < p < low for p in ports), ports
    for p in ports[:5]:  # free indeed
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_ray_reads_it_as_haproxy_with_loopback_kept():
    """Under the printed environment Ray turns HAProxy and direct ingress on and moves its default host to all
    interfaces, while the host the YAML names (127.0.0.1) stays what HAProxy and the replicas bind."""
    code = (
        "import json; from ray.serve._private import constants as c; from ray.serve._private.haproxy import "
        "HAProxyConfig; from ray.serve.config import HTTPOptions; "
        "cfg = HAProxyConfig(http_options=HTTPOptions(host='127.0.0.1', port=8000)); "
        "print(json.dumps([c.RAY_SERVE_ENABLE_HA_PROXY, c.RAY_SERVE_ENABLE_DIRECT_INGRESS, c.DEFAULT_HTTP_HOST, "
        "cfg.frontend_host, c.RAY_SERVE_HAPROXY_CONFIG_FILE_LOC]))"
    )
    env = {**os.environ, **_env_lines({local.INGRESS_VAR: ""})}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ha, direct, default_host, frontend, cfg = json.loads(out.stdout.strip().splitlines()[-1])
    assert ha and direct and default_host == "0.0.0.0" and frontend == "127.0.0.1"
    assert cfg == f"/tmp/haproxy-serve-{os.getuid()}/haproxy.cfg"
