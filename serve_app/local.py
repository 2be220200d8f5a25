"""The serving environment, and a local Ray + Serve for scripts (benchmarks, the autoscaling demo).

Serve's fast path on small machines is direct ingress (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`): each ingress replica
runs its own HTTP server, on ports from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT up, bound to the host of
`http_options` (127.0.0.1 here), so a request skips the proxy hop (on 2 cores the proxy capped throughput at about
a third). The proxy keeps serving `http_options.port` and balances over all replicas. These variables are read
when the cluster starts, so they must be in the environment of `serve run` / `ray start`, not in the YAML:

    python -m serve_app.local --env      # prints them as KEY=VALUE lines (the Makefile's `make serve` uses it)
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Optional

# The defaults `make serve` and the benchmarks use (README, "Serving performance").
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # direct ingress, gRPC between deployments, no per-request stderr logs
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "8001",  # replica 1 on 127.0.0.1:8001, replica 2 on 8002, ...
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "8099",
    "RAY_worker_niceness": "0",  # Ray starts workers at nice 15: replicas then lose the CPU to anything else
}


# Scripts that start and stop their own cluster: a replica keeps its direct-ingress port open 30 s after a stop by
# default (for external load balancers to notice); nothing outside the script uses it.
SCRIPT_ENV = {**SERVE_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_details() -> dict[str, Any]:
    """The Serve controller's view of applications, replicas and ports (what `GET /api/serve/applications/`
    reports)."""
    import ray
    from ray.serve.context import _get_global_client

    return ray.get(_get_global_client()._controller.get_serve_instance_details.remote())


def replicas(app_name: str, deployment: str, details: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The deployment's replicas as the controller lists them: replica_id, state, pid, ..."""
    details = details if details is not None else serve_details()
    app = (details.get("applications") or {}).get(app_name) or {}
    return list(((app.get("deployments") or {}).get(deployment) or {}).get("replicas") or [])


def ingress_urls(app_name: str = "textclf", details: Optional[dict[str, Any]] = None) -> list[str]:
    """Direct-ingress URLs of the app's running replicas, from the Serve controller (its target_groups). Empty
    without direct ingress."""
    details = details if details is not None else serve_details()
    # Replicas listen on http_options.host; the targets carry the node's IP, which a loopback bind does not answer.
    host = (details.get("http_options") or {}).get("host")
    urls = []
    for group in details.get("target_groups", []):
        if group.get("app_name") == app_name and str(group.get("protocol")).upper().endswith("HTTP"):
            for t in group.get("targets", []):
                ip = host if host in ("127.0.0.1", "localhost") else t["ip"]
                urls.append(f"http://{ip}:{t['port']}")
    return sorted(set(urls))


class LocalServe:
    """A Ray cluster of our own (own temp dir, random ports, 127.0.0.1) with Serve's proxy on a free port.
    Environment variables in `env` are set before Ray starts (the direct-ingress settings must be)."""

    def __init__(
        self,
        env: Optional[dict[str, str]] = None,
        num_cpus: int = 2,
        http_port: Optional[int] = None,
        di_ports: Optional[tuple[int, int]] = None,
    ):
        self.env = dict(SCRIPT_ENV if env is None else env)
        if di_ports and self.env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1":
            self.env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], self.env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = (
                map(str, di_ports)
            )
        self.num_cpus = num_cpus
        self.http_port = http_port or free_port()
        self.temp = tempfile.mkdtemp(prefix="rsl", dir="/tmp")

    def __enter__(self) -> "LocalServe":
        if "ray.serve" in sys.modules:
            raise RuntimeError("set the serving environment before importing ray.serve (it is read at import)")
        os.environ.update(self.env)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        os.environ["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        import ray
        from ray import serve

        ray.init(
            num_cpus=self.num_cpus,
            include_dashboard=False,
            _temp_dir=self.temp,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "HF_HUB_OFFLINE": "1"}},
        )
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})
        return self

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def run(self, app: Any, name: str = "textclf") -> None:
        from ray import serve

        serve.run(app, name=name, route_prefix="/")

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(self.temp, ignore_errors=True)
            wait_no_vllm()


def our_vllm_processes(marker: Optional[str] = None) -> list[int]:
    """VLLM:: engine processes that are children of this process tree or carry `marker` (KEY=VALUE) in their
    environment."""
    found = []
    key = marker.encode() if marker else None
    me = os.environ["TEXTCLF_OWNER"].encode()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            comm = open(f"/proc/{p}/comm", "rb").read()
            if b"VLLM" not in comm and b"vllm" not in open(f"/proc/{p}/cmdline", "rb").read():
                continue
            env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if (key and key in env) or b"TEXTCLF_OWNER=" + me in env:
            found.append(int(p))
    return found


def wait_no_vllm(marker: Optional[str] = None, timeout: float = 60.0) -> None:
    """Wait until the vLLM processes this process started have exited (they release cores and memory)."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        if not our_vllm_processes(marker):
            return
        time.sleep(0.5)
    raise RuntimeError(f"vLLM processes still running after {timeout}s: {our_vllm_processes(marker)}")


os.environ.setdefault("TEXTCLF_OWNER", str(os.getpid()))  # inherited by every process this one starts


if __name__ == "__main__":
    if sys.argv[1:] == ["--env"]:
        print("\n".join(f"{k}={v}" for k, v in SERVE_ENV.items()))
    else:
        sys.exit(__doc__)
