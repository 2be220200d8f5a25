"""Checks the cluster configs against the project itself: every entry point is a ray_jobs module whose options
parse, every image is the project's GPU image on the pinned Ray version, GPUs are asked for as `nvidia.com/gpu`,
the RayService's serveConfigV2 is the rendering of serve_app/config.yaml, the serving nodes (RayService, launcher)
start with the serving environment (serve_app/local.py serve_env: direct ingress, HAProxy), and the launcher config
has a CPU head and an autoscaling GPU group.

    python -m cluster.validate                  # exit 1 naming each problem
    python -m cluster.validate --crd-dir DIR    # also against KubeRay's CRD schemas (ray.io_rayjobs.yaml, ...)

KubeRay's CRDs are not vendored here (they are ~1 MB each and outside this repository); pass them when you have
them (`kuberay/ray-operator/config/crd/bases`).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from . import render

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
LAUNCHER = ROOT / "cluster" / "aws.yaml"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
APP_ROOT = "/app/"  # where cluster/Dockerfile puts the project
GPU_KEY = "nvidia.com/gpu"
IMAGE_RE = re.compile(r"^[a-z0-9.\-/:]+/textclf:[\w.\-]+-gpu$")
RUNTIME_ENV_KEYS = {
    "env_vars",
    "pip",
    "uv",
    "conda",
    "working_dir",
    "py_modules",
    "excludes",
    "container",
    "config",
    "image_uri",
    "py_executable",
}
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}


def ray_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', text).group(1)


def check_entrypoint(entrypoint: str) -> list[str]:
    """`python -m ray_jobs.<step> [--config /app/x.yaml] [--key v ...]`, possibly several joined by &&."""
    from textclf.config import parse_args

    errors = []
    for cmd in entrypoint.split("&&"):
        argv = shlex.split(cmd)
        if argv[:2] != ["python", "-m"] or len(argv) < 3 or not argv[2].startswith("ray_jobs."):
            errors.append(f"entrypoint {cmd.strip()!r}: expected `python -m ray_jobs.<step> ...`")
            continue
        module = argv[2].split(".", 1)[1]
        path = ROOT / "ray_jobs" / f"{module}.py"
        if not path.exists() or "\ndef main(" not in path.read_text():
            errors.append(f"entrypoint {argv[2]}: no such step in ray_jobs/ (with a main)")
            continue
        args = [a.replace(APP_ROOT, f"{ROOT}/", 1) if a.startswith(APP_ROOT) else a for a in argv[3:]]
        if "--config" in args and not Path(args[args.index("--config") + 1]).exists():
            errors.append(f"entrypoint {argv[2]}: config file {argv[argv.index('--config') + 1]} is not in the image")
            continue
        try:
            parse_args(args)
        except SystemExit:
            errors.append(f"entrypoint {argv[2]}: its options do not parse: {' '.join(argv[3:])}")
    return errors


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return (group.get("template") or {}).get("spec", {}).get("containers") or []


def check_cluster_spec(spec: dict[str, Any], where: str) -> list[str]:
    """A RayCluster spec (rayClusterSpec / rayClusterConfig): versions, images, GPU resources."""
    errors = []
    if str(spec.get("rayVersion")) != ray_version():
        errors.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is not the pinned ray {ray_version()}")
    head = spec.get("headGroupSpec") or {}
    workers = spec.get("workerGroupSpecs") or []
    if not _containers(head) or not workers:
        return errors + [f"{where}: needs a headGroupSpec and at least one workerGroupSpec with containers"]
    for name, group, gpu in [("head", head, False)] + [(w.get("groupName", "?"), w, True) for w in workers]:
        for c in _containers(group):
            image = c.get("image", "")
            if not IMAGE_RE.match(image):
                errors.append(
                    f"{where} {name}: image {image!r} is not the project's GPU image (<registry>/textclf:<tag>-gpu)"
                )
            res = c.get("resources") or {}
            keys = {k for part in ("requests", "limits") for k in (res.get(part) or {})}
            wrong = {k for k in keys if "gpu" in k.lower() and k != GPU_KEY}
            if wrong:
                errors.append(f"{where} {name}: GPU resource key {sorted(wrong)}; Kubernetes' is {GPU_KEY}")
            limit = (res.get("limits") or {}).get(GPU_KEY)
            if gpu and not limit:
                errors.append(f"{where} {name}: a worker group without {GPU_KEY} in its limits")
            if gpu and limit != (res.get("requests") or {}).get(GPU_KEY, limit):
                errors.append(f"{where} {name}: {GPU_KEY} requests and limits differ")
    for w in workers:
        if not (w.get("minReplicas", 0) <= w.get("replicas", 0) <= w.get("maxReplicas", 0)):
            errors.append(f"{where} {w.get('groupName')}: needs minReplicas <= replicas <= maxReplicas")
    return errors


def _token_auth_env(c: dict[str, Any]) -> tuple[bool, bool]:
    """(turns token auth on, is given a token) from a container's env."""
    env = {e.get("name"): e for e in c.get("env") or []}
    on = str((env.get("RAY_AUTH_MODE") or {}).get("value", "")).lower() == "token"
    return on, "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env


def check_token_auth(spec: dict[str, Any], where: str) -> list[str]:
    """Token auth needs a token on every node: KubeRay's authOptions (mode token) makes and mounts one; a container
    that sets RAY_AUTH_MODE=token by hand must also get RAY_AUTH_TOKEN (from a Secret) or RAY_AUTH_TOKEN_PATH."""
    if str((spec.get("authOptions") or {}).get("mode", "")).lower() == "token":
        return []
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [(w.get("groupName", "?"), w) for w in spec.get("workerGroupSpecs") or []]
    states = [(name, *_token_auth_env(c)) for name, g in groups for c in _containers(g)]
    if not any(on for _, on, _ in states):
        return []
    return [
        f"{where} {name}: token auth is on (RAY_AUTH_MODE=token) but the node gets no token: set authOptions.mode "
        f"token (KubeRay makes one) or RAY_AUTH_TOKEN from a Secret"
        for name, _, has in states
        if not has
    ]


def cluster_serve_env() -> dict[str, str]:
    """What every serving node's Ray starts with: the serving environment with HAProxy, Ray's own file paths (one
    user per node there)."""
    from serve_app.local import serve_env

    return serve_env("haproxy")


def check_serve_env(spec: dict[str, Any], where: str) -> list[str]:
    """Each container of a serving cluster sets the serving environment (read when its Ray starts)."""
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [(w.get("groupName", "?"), w) for w in spec.get("workerGroupSpecs") or []]
    errors = []
    for name, group in groups:
        for c in _containers(group):
            env = {e.get("name"): str(e.get("value")) for e in c.get("env") or []}
            wrong = {k: v for k, v in cluster_serve_env().items() if env.get(k) != v}
            if wrong:
                errors.append(f"{where} {name}: the serving environment is missing or differs: {wrong}")
    return errors


def check_runtime_env(text: str, where: str) -> list[str]:
    env = yaml.safe_load(text or "") or {}
    errors = []
    if not isinstance(env, dict) or set(env) - RUNTIME_ENV_KEYS:
        return [
            f"{where}: runtimeEnvYAML keys "
            f"{sorted(set(env) - RUNTIME_ENV_KEYS) if isinstance(env, dict) else env!r} are not runtime_env fields"
        ]
    for k, v in (env.get("env_vars") or {}).items():
        if not isinstance(v, str):
            errors.append(f"{where}: env var {k} must be a string, not {v!r}")
    return errors


def check_rayjob(doc: dict[str, Any], where: str = "RayJob") -> list[str]:
    spec = doc.get("spec") or {}
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        return [f"{where}: expected apiVersion ray.io/v1, kind RayJob"]
    errors = check_entrypoint(spec.get("entrypoint", ""))
    errors += check_runtime_env(spec.get("runtimeEnvYAML", ""), where)
    cluster = spec.get("rayClusterSpec") or {}
    return errors + check_cluster_spec(cluster, where) + check_token_auth(cluster, where)


def check_rayservice(doc: dict[str, Any], where: str = "RayService") -> list[str]:
    from textclf.serving import ServeConfig

    spec = doc.get("spec") or {}
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayService":
        return [f"{where}: expected apiVersion ray.io/v1, kind RayService"]
    errors = []
    serve = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
    if serve != render.serve_config():
        errors.append(
            f"{where}: serveConfigV2 is not the rendering of serve_app/config.yaml (python -m cluster.render)"
        )
    app_src = (ROOT / "serve_app" / "app.py").read_text()
    deployment = re.search(r'^DEPLOYMENT = "(\w+)"', app_src, re.M).group(1)
    for app in serve.get("applications") or []:
        if app.get("import_path") != "serve_app.app:build_app" or "\ndef build_app(" not in app_src:
            errors.append(f"{where}: import_path {app.get('import_path')!r} is not serve_app.app:build_app")
        try:
            ServeConfig.model_validate(app.get("args") or {})
        except Exception as e:
            errors.append(f"{where}: args are not a valid ServeConfig: {e}")
        for d in app.get("deployments") or []:
            if d.get("name") != deployment:
                errors.append(f"{where}: deployment {d.get('name')!r} is not {deployment!r}")
            if (d.get("ray_actor_options") or {}).get("num_gpus", 0) < 1:
                errors.append(f"{where}: the {d.get('name')} replicas ask for no GPU")
    cluster = spec.get("rayClusterConfig") or {}
    errors += check_serve_env(cluster, where)
    return errors + check_cluster_spec(cluster, where) + check_token_auth(cluster, where)


def check_launcher(doc: dict[str, Any], where: str = "launcher") -> list[str]:
    errors = []
    if (doc.get("provider") or {}).get("type") not in ("aws", "gcp", "azure"):
        errors.append(f"{where}: provider.type must be a cloud (aws, gcp, azure)")
    types = doc.get("available_node_types") or {}
    head = doc.get("head_node_type")
    if head not in types:
        errors.append(f"{where}: head_node_type {head!r} is not among available_node_types")
    gpu_types = {
        n: t
        for n, t in types.items()
        if n != head and re.match(r"^(g|p)\d", str((t.get("node_config") or {}).get("InstanceType", "")))
    }
    if not gpu_types:
        errors.append(f"{where}: no GPU worker node type (g*/p* instances)")
    if head in types and re.match(r"^(g|p)\d", str((types[head].get("node_config") or {}).get("InstanceType", ""))):
        errors.append(f"{where}: the head should be a CPU instance")
    for n, t in gpu_types.items():
        if not (0 <= t.get("min_workers", 0) <= t.get("max_workers", -1) <= doc.get("max_workers", -1)):
            errors.append(f"{where} {n}: needs 0 <= min_workers <= max_workers <= the cluster's max_workers")
    setup = " ".join(doc.get("setup_commands") or [])
    if '-e ".[gpu]"' not in setup and "'.[gpu]'" not in setup:
        errors.append(f"{where}: setup_commands must install the project with the gpu extra")
    if "." not in (doc.get("file_mounts") or {}).values():
        errors.append(f"{where}: file_mounts must copy the project (.) to the nodes")
    starts = " ".join((doc.get("head_start_ray_commands") or []) + (doc.get("worker_start_ray_commands") or []))
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next((c for c in doc.get(kind) or [] if "ray start" in c), "")
        words = set(shlex.split(start.split(";")[-1])) if start else set()
        missing = [f"{k}={v}" for k, v in cluster_serve_env().items() if f"{k}={v}" not in words]
        if missing:
            errors.append(f"{where} {kind}: `ray start` without the serving environment {missing}")
    mounted = any(str(k).endswith("/.ray/auth_token") for k in (doc.get("file_mounts") or {}))
    if "RAY_AUTH_MODE=token" in starts and not mounted and "RAY_AUTH_TOKEN" not in starts:
        errors.append(
            f"{where}: token auth is on but no node gets a token: file_mounts must copy ~/.ray/auth_token "
            f"(made by `ray get-auth-token --generate`) to every node"
        )
    return errors


def check_dockerfile() -> list[str]:
    base = re.search(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M).group(1)
    if not base.startswith(f"rayproject/ray:{ray_version()}-") or "gpu" not in base:
        return [f"Dockerfile: base image {base} is not rayproject/ray:{ray_version()}-...-gpu"]
    return []


def check_crd(doc: dict[str, Any], crd_dir: Path, where: str) -> list[str]:
    import jsonschema

    crd = yaml.safe_load((crd_dir / CRD_FILES[doc["kind"]]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1])
    validator = jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])
    return [
        f"{where}: CRD schema: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def manifests() -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(ROOT)): yaml.safe_load(p.read_text())
        for p in sorted(KUBERAY.glob("*.yaml"))
        if p.name != render.OVERRIDES.name
    }


def validate_all(crd_dir: Path | None = None) -> list[str]:
    errors = check_dockerfile() + check_launcher(yaml.safe_load(LAUNCHER.read_text()), str(LAUNCHER.relative_to(ROOT)))
    for where, doc in manifests().items():
        check = {"RayJob": check_rayjob, "RayService": check_rayservice}.get(doc.get("kind"))
        errors += check(doc, where) if check else [f"{where}: unexpected kind {doc.get('kind')!r}"]
        if crd_dir and doc.get("kind") in CRD_FILES:
            errors += check_crd(doc, crd_dir, where)
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crd-dir", type=Path, help="KubeRay's CRD folder (ray-operator/config/crd/bases)")
    a = ap.parse_args(argv)
    errors = validate_all(a.crd_dir)
    for e in errors:
        print(e, file=sys.stderr)
    print(f"{len(manifests())} manifests + launcher config: {'OK' if not errors else f'{len(errors)} problems'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
