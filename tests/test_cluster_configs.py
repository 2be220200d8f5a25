"""The cluster configs (cluster/) against the project: real manifests pass, and each kind of mistake is caught.
KubeRay's CRD schemas are not available offline here, so these are the project's own checks (cluster/validate.py);
`python -m cluster.validate --crd-dir <kuberay>/ray-operator/config/crd/bases` adds the CRD schemas."""

import copy

import pytest
import yaml

from cluster import render, validate


@pytest.fixture(scope="module")
def docs():
    return validate.manifests()


def test_all_cluster_configs_pass():
    assert validate.validate_all() == []
    assert render.main(["--check"]) == 0


def test_manifests_use_the_real_entry_points_and_config(docs):
    jobs = {d["metadata"]["name"]: d for d in docs.values() if d["kind"] == "RayJob"}
    assert set(jobs) == {"textclf-train", "textclf-evaluate"}
    assert (
        "python -m ray_jobs.train --config /app/configs/llama3-8b-gpu.yaml"
        in jobs["textclf-train"]["spec"]["entrypoint"]
    )
    assert "python -m ray_jobs.evaluate" in jobs["textclf-evaluate"]["spec"]["entrypoint"]
    assert [d["kind"] for d in docs.values()].count("RayService") == 1


def _job(docs):
    return copy.deepcopy(next(d for d in docs.values() if d["metadata"]["name"] == "textclf-train"))


@pytest.mark.parametrize(
    "entrypoint, problem",
    [
        ("python -m ray_jobs.trian --config /app/configs/llama3-8b-gpu.yaml", "no such step"),
        ("python train.py", "expected `python -m ray_jobs"),
        ("python -m ray_jobs.train --config /app/configs/nope.yaml", "not in the image"),
        ("python -m ray_jobs.train --num-wrkers 8", "do not parse"),
        ("python -m ray_jobs.export --name x && python -m ray_jobs.evalute --name x", "no such step"),
    ],
)
def test_a_wrong_entry_point_is_caught(docs, entrypoint, problem):
    job = _job(docs)
    job["spec"]["entrypoint"] = entrypoint
    errors = validate.check_rayjob(job)
    assert any(problem in e for e in errors), errors


def test_a_wrong_gpu_key_image_or_version_is_caught(docs):
    job = _job(docs)
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resources"]["limits"]["gpu"] = worker["resources"]["limits"].pop("nvidia.com/gpu")
    assert any("GPU resource key" in e for e in validate.check_rayjob(job))
    job = _job(docs)
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = (
        "rayproject/ray:2.60.0"
    )
    assert any("not the project's GPU image" in e for e in validate.check_rayjob(job))
    job = _job(docs)
    job["spec"]["rayClusterSpec"]["rayVersion"] = "2.52.0"
    assert any("rayVersion" in e for e in validate.check_rayjob(job))
    job = _job(docs)
    job["spec"]["runtimeEnvYAML"] = "envvars: {A: 1}"
    assert any("runtime_env fields" in e for e in validate.check_rayjob(job))


def test_serve_config_v2_is_generated_from_serve_app_config(docs, monkeypatch, tmp_path):
    svc = copy.deepcopy(next(d for d in docs.values() if d["kind"] == "RayService"))
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    base = yaml.safe_load(render.SERVE_CONFIG.read_text())
    app, base_app = serve["applications"][0], base["applications"][0]
    assert app["import_path"] == base_app["import_path"]
    assert app["args"]["max_text_chars"] == base_app["args"]["max_text_chars"]
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 1  # the override
    assert app["args"]["run"].startswith("s3://")
    # A drifted copy fails: edit serve_app/config.yaml (a copy of it) and the manifest no longer matches.
    drifted = tmp_path / "config.yaml"
    drifted.write_text(render.SERVE_CONFIG.read_text().replace("max_batch: 64", "max_batch: 65"))
    monkeypatch.setattr(render, "SERVE_CONFIG", drifted)
    assert any("not the rendering" in e for e in validate.check_rayservice(svc))
    assert render.main(["--check"]) == 1


def test_render_splices_only_the_serve_config_block():
    manifest = "a: 1\nspec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n  rayClusterConfig:\n    x: 1\n"
    out = render.splice(manifest, "new: 2\n")
    assert out == "a: 1\nspec:\n  serveConfigV2: |\n    new: 2\n  rayClusterConfig:\n    x: 1\n"


def test_render_merges_by_name_and_refuses_unknown_names():
    base = {"applications": [{"name": "a", "args": {"x": 1, "y": 2}}]}
    assert render.merge(base, {"applications": [{"name": "a", "args": {"y": 3}}]}) == {
        "applications": [{"name": "a", "args": {"x": 1, "y": 3}}]
    }
    with pytest.raises(ValueError):
        render.merge(base, {"applications": [{"name": "b"}]})


def test_launcher_config_checks():
    doc = yaml.safe_load(validate.LAUNCHER.read_text())
    assert validate.check_launcher(doc) == []
    bad = copy.deepcopy(doc)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = 9
    assert any("min_workers" in e for e in validate.check_launcher(bad))
    bad = copy.deepcopy(doc)
    bad["setup_commands"] = ["pip install -e ."]
    assert any("gpu extra" in e for e in validate.check_launcher(bad))


def test_local_cluster_reads_active_nodes_from_ray_status():
    from cluster import local

    status = (
        "======== Autoscaler status ========\nNode status\n------\nActive:\n 1 node_aa11\n 1 node_bb22\n"
        "Pending:\n (no pending nodes)\n"
    )
    assert local._active_nodes(status) == 2
    assert local._active_nodes("Active:\n (no active nodes)\n") == 0
    lo, hi = local.free_range(10)
    assert hi - lo == 9 and 20000 <= lo


def test_a_manifest_that_turns_token_auth_on_without_a_token_fails(docs):
    job = _job(docs)
    cluster = job["spec"]["rayClusterSpec"]
    del cluster["authOptions"]  # KubeRay no longer makes and mounts the token
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault("env", []).append(
        {"name": "RAY_AUTH_MODE", "value": "token"}
    )
    errors = validate.check_rayjob(job)
    assert any("token auth is on" in e and "head" in e for e in errors), errors
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            c.setdefault("env", []).append(
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "t"}}}
            )
    assert not [e for e in validate.check_rayjob(job) if "token" in e]


def test_a_launcher_with_token_auth_must_copy_the_token_to_the_nodes():
    doc = yaml.safe_load(validate.LAUNCHER.read_text())
    assert not validate.check_launcher(doc)
    doc["file_mounts"] = {k: v for k, v in doc["file_mounts"].items() if not k.endswith("/.ray/auth_token")}
    assert any("no node gets a token" in e for e in validate.check_launcher(doc))


def test_serving_nodes_start_with_haproxy_and_direct_ingress(docs):
    svc = copy.deepcopy(next(d for d in docs.values() if d["kind"] == "RayService"))
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    env = workers[0]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in env
    workers[0]["template"]["spec"]["containers"][0]["env"] = [
        e for e in env if e["name"] != "RAY_SERVE_ENABLE_HA_PROXY"
    ]
    errors = validate.check_rayservice(svc)
    assert any("serving environment" in e and "gpu" in e for e in errors), errors
    doc = yaml.safe_load(validate.LAUNCHER.read_text())
    doc["worker_start_ray_commands"] = [
        c.replace(" RAY_SERVE_ENABLE_HA_PROXY=1", "") for c in doc["worker_start_ray_commands"]
    ]
    errors = validate.check_launcher(doc)
    assert any("worker_start_ray_commands" in e and "RAY_SERVE_ENABLE_HA_PROXY=1" in e for e in errors), errors
