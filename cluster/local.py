"""A multi-node Ray cluster on one machine, for trying `ray job submit` and node failures without a cloud.

    python -m cluster.local up [--workers 1] [--state-dir DIR]   # prints RAY_ADDRESS for `ray job submit`
    python -m cluster.local status
    python -m cluster.local down                                 # stops exactly the processes `up` started

Each node is its own `ray start --block` process (own --temp-dir, own ports, 1 CPU, explicit memory), started in
its own session. `down` stops those processes, the processes under them and any process still naming the
cluster's temp dir; it never runs `ray stop`, which stops every Ray process on the machine.

Token auth (Ray's default): `RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH` when set, else `~/.ray/auth_token` when it
exists, else a token made once in the state dir. Every node and CLI call gets it through `RAY_AUTH_TOKEN_PATH`
(or the `RAY_AUTH_TOKEN` given); `down` never deletes a token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
DEFAULT_STATE_DIR = Path(tempfile.gettempdir()) / f"textclf-cluster-{os.getuid()}"
GiB = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_range(n: int = 40) -> tuple[int, int]:
    """A block of n ports nobody listens on, for one node's worker processes."""
    for _ in range(200):
        lo = random.randrange(20000, 29000)
        try:
            for p in range(lo, lo + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return lo, lo + n - 1
        except OSError:
            continue
    raise RuntimeError("no free port range found")


def ray_bin() -> str:
    # The `ray` next to this interpreter: the nodes (and so a job's `python`) use this environment.
    return str(Path(sys.executable).with_name("ray"))


def auth_token(state_dir: Path) -> dict[str, str]:
    """Where the cluster's token comes from: {"source": ..., "path": ... (absent when RAY_AUTH_TOKEN is given)}.
    `ray start --head` with token auth makes no token of its own, so one must exist before it runs."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return {"source": "RAY_AUTH_TOKEN"}
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if given:
        if not Path(given).expanduser().is_file():
            raise SystemExit(f"RAY_AUTH_TOKEN_PATH={given}: no such file")
        return {"source": "RAY_AUTH_TOKEN_PATH", "path": str(Path(given).expanduser().resolve())}
    home = Path.home() / ".ray" / TOKEN_FILE
    if home.is_file():
        return {"source": "~/.ray/auth_token", "path": str(home)}
    made = Path(state_dir).resolve() / TOKEN_FILE
    if not made.is_file():
        made.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return {"source": "made by up", "path": str(made)}
    return {"source": "made by an earlier up", "path": str(made)}


def cli_env(state: dict[str, Any] | None = None) -> dict[str, str]:
    """The environment of a Ray CLI call against this cluster (or of a node): token auth, the cluster's token."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60's default for new clusters; said explicitly so the CLI agrees
    path = ((state or {}).get("auth") or {}).get("path")
    if path:
        env["RAY_AUTH_TOKEN_PATH"] = path
    env.pop("RAY_ADDRESS", None)
    return env


def node_env(state: dict[str, Any]) -> dict[str, str]:
    env = cli_env(state)
    env.pop("PYTHONPATH", None)  # a job's code comes from its --working-dir, not from where `up` ran
    return env


def node_args(temp_dir: Path, memory_gib: float, object_store_gib: float) -> list[str]:
    lo, hi = free_range()
    return [
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(temp_dir),
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
        "--memory",
        str(int(memory_gib * GiB)),
        "--object-store-memory",
        str(int(object_store_gib * GiB)),
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--min-worker-port",
        str(lo),
        "--max-worker-port",
        str(hi),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
    ]


def _tree(pids: list[int]) -> set[int]:
    found: set[int] = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            found.add(pid)
            found.update(c.pid for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return found


def _naming(text: str) -> set[int]:
    """Processes whose command line names `text` (the cluster's temp dir): Ray daemons reparented elsewhere."""
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in a for a in (p.info["cmdline"] or [])):
                out.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out - {os.getpid()}


def cluster_pids(state: dict[str, Any]) -> set[int]:
    """Every live process that belongs to this cluster."""
    pids = _tree([n["pid"] for n in state["nodes"]]) | _tree(state.get("pids", []))
    pids |= _naming(state["root"])
    return {p for p in pids if _alive(p)}


def load_state(state_dir: Path) -> dict[str, Any]:
    f = Path(state_dir) / STATE_FILE
    if not f.exists():
        raise SystemExit(f"no local cluster recorded in {state_dir} (run `up` first)")
    return json.loads(f.read_text())


def _wait_for_nodes(state: dict[str, Any], n: int, timeout: float) -> None:
    env = cli_env(state)
    deadline = time.time() + timeout
    out = ""
    while time.time() < deadline:
        for node in state["nodes"]:
            if not _alive(node["pid"]):
                raise RuntimeError(
                    f"node {node['name']} exited; see {node['log']}:\n{Path(node['log']).read_text()[-3000:]}"
                )
        proc = subprocess.run(
            [ray_bin(), "status", "--address", state["gcs_address"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 and _active_nodes(out) >= n:
            return
        time.sleep(2)
    raise RuntimeError(f"cluster did not reach {n} nodes in {timeout:.0f}s:\n{out[-3000:]}")


def _active_nodes(status_text: str) -> int:
    """Lines under 'Active:' in `ray status` output, one per node."""
    lines = status_text.splitlines()
    try:
        i = next(k for k, line in enumerate(lines) if line.strip() == "Active:")
    except StopIteration:
        return 0
    n = 0
    for line in lines[i + 1 :]:
        if not line.strip().startswith("1 node_"):
            break
        n += 1
    return n


def up(
    state_dir: Path = DEFAULT_STATE_DIR,
    workers: int = 1,
    memory_gib: float = 4.0,
    object_store_gib: float = 0.5,
    timeout: float = 120.0,
) -> dict[str, Any]:
    state_dir = Path(state_dir)
    if (state_dir / STATE_FILE).exists():
        state = load_state(state_dir)
        if cluster_pids(state):
            raise SystemExit(f"a local cluster is already up ({state['dashboard']}); `down` it first")
    state_dir.mkdir(parents=True, exist_ok=True)
    # Short: Ray puts unix sockets under the temp dir, and socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="tcl-", dir="/tmp"))
    gcs_port, dash_port = free_port(), free_port()
    state: dict[str, Any] = {
        "root": str(root),
        "gcs_address": f"127.0.0.1:{gcs_port}",
        "dashboard": f"http://127.0.0.1:{dash_port}",
        "nodes": [],
        "pids": [],
        "auth": auth_token(state_dir),
    }
    env = node_env(state)

    def start(name: str, extra: list[str]) -> None:
        temp = root / name
        temp.mkdir()
        log = state_dir / f"{name}.log"
        cmd = [ray_bin(), "start", *extra, *node_args(temp, memory_gib, object_store_gib)]
        with open(log, "w") as f:
            p = subprocess.Popen(
                cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        state["nodes"].append({"name": name, "pid": p.pid, "temp_dir": str(temp), "log": str(log)})
        (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))  # recorded at once, so `down` finds it

    try:
        start(
            "head",
            [
                "--head",
                "--port",
                str(gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dash_port),
                "--ray-client-server-port",
                str(free_port()),
            ],
        )
        _wait_for_nodes(state, 1, timeout)
        for i in range(1, workers + 1):
            start(f"worker{i}", ["--address", state["gcs_address"]])
        _wait_for_nodes(state, 1 + workers, timeout)
    except BaseException:
        down(state_dir)
        raise
    state["pids"] = sorted(cluster_pids(state))
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    return state


def down(state_dir: Path = DEFAULT_STATE_DIR, timeout: float = 30.0) -> list[int]:
    """Stop this cluster's processes (SIGTERM, then SIGKILL after `timeout`); returns the pids it stopped."""
    state = load_state(state_dir)
    known = cluster_pids(state)  # taken before anything stops: workers renamed `ray::...` are found by the tree only
    # Workers first, then the head, so the head does not spend the time rescheduling.
    for node in reversed(state["nodes"]):
        for pid in sorted(_tree([node["pid"]]), reverse=True):
            _signal(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while True:
        _reap(state)
        known |= cluster_pids(state)
        live = [p for p in known if _alive(p)]
        if not live or time.time() > deadline:
            break
        for pid in live:
            _signal(pid, signal.SIGTERM)
        time.sleep(1)
    for pid in live:
        _signal(pid, signal.SIGKILL)
    time.sleep(0.5)
    _reap(state)
    state["stopped"] = sorted(known)
    (Path(state_dir) / STATE_FILE).write_text(json.dumps(state, indent=2))
    if not any(_alive(p) for p in known):
        shutil.rmtree(state["root"], ignore_errors=True)  # the nodes' temp dirs; their start-up logs stay in state_dir
    return sorted(known)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(state: dict[str, Any]) -> None:
    """Collect the exit status of node processes this process started (else they linger as zombies)."""
    for node in state["nodes"]:
        try:
            os.waitpid(node["pid"], os.WNOHANG)
        except ChildProcessError:
            pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def status(state_dir: Path = DEFAULT_STATE_DIR) -> str:
    state = load_state(state_dir)
    proc = subprocess.run(
        [ray_bin(), "status", "--address", state["gcs_address"]],
        env=cli_env(state),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout + proc.stderr


def describe(state: dict[str, Any]) -> str:
    auth = state.get("auth") or {}
    token = f" RAY_AUTH_TOKEN_PATH={auth['path']}" if auth.get("path") else ""
    return (
        f"local Ray cluster: {len(state['nodes'])} nodes ({', '.join(n['name'] for n in state['nodes'])}), "
        f"temp dir {state['root']}\n"
        f"auth token: {auth.get('path') or 'from RAY_AUTH_TOKEN'} ({auth.get('source', '?')})\n"
        f"export RAY_ADDRESS={state['dashboard']} RAY_AUTH_MODE=token{token}   # for ray job submit\n"
        f"GCS address (ray status --address): {state['gcs_address']}\n"
        f"dashboard: {state['dashboard']}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--state-dir", default=os.environ.get("TEXTCLF_CLUSTER_DIR", str(DEFAULT_STATE_DIR)))
    ap.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    ap.add_argument(
        "--memory-gib", type=float, default=4.0, help="per node: on one machine each node counts all memory"
    )
    ap.add_argument("--object-store-gib", type=float, default=0.5, help="per node")
    a = ap.parse_args(argv)
    if a.command == "up":
        print(describe(up(Path(a.state_dir), a.workers, a.memory_gib, a.object_store_gib)))
    elif a.command == "down":
        print(f"stopped {len(down(Path(a.state_dir)))} processes")
    else:
        print(status(Path(a.state_dir)))


if __name__ == "__main__":
    main()
