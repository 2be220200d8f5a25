"""Run folders behind a URI (textclf/storage.py), with a real pyarrow filesystem: file:// works offline here;
s3:// and gs:// go through the same pyarrow calls but could not be reached from this machine."""
import os
import time

from textclf import storage
from textclf.config import load_config


def test_upload_and_download_mirror_changed_files(tmp_path):
    local = tmp_path / "local" / "run"
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "classifier.json").write_text("{}")
    (local / "ray_train" / "checkpoint_1").mkdir(parents=True)
    (local / "ray_train" / "checkpoint_1" / "x").write_text("ckpt")
    uri = f"file://{tmp_path}/bucket/runs/run"
    assert storage.upload(local, uri) == 1  # Ray Train's own folder is not mirrored
    assert (tmp_path / "bucket/runs/run/adapter/classifier.json").read_text() == "{}"
    assert not (tmp_path / "bucket/runs/run/ray_train").exists()
    assert storage.upload(local, uri) == 0  # unchanged: nothing copied
    time.sleep(0.01)
    (local / "adapter" / "classifier.json").write_text('{"a": 1}')
    assert storage.upload(local, uri) == 1
    got = storage.download(uri, tmp_path / "fetched")
    assert (got / "adapter" / "classifier.json").read_text() == '{"a": 1}'
    assert storage.download(uri, got) == got and storage.upload(got, uri) == 0  # in sync both ways: nothing copied


def test_a_uri_runs_dir_keeps_the_run_folder_in_a_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTCLF_CACHE", str(tmp_path / "cache"))
    cfg = load_config(overrides={"runs_dir": "s3://bucket/textclf/runs", "name": "r1"})
    assert cfg.run_uri == "s3://bucket/textclf/runs/r1"
    assert cfg.run_dir == tmp_path / "cache" / "runs" / "s3" / "bucket/textclf/runs/r1"
    local = load_config(overrides={"runs_dir": "runs", "name": "r1"})
    assert local.run_uri is None and str(local.run_dir) == os.path.join("runs", "r1")


def test_serving_reads_a_run_behind_a_uri(tmp_path, monkeypatch):
    from textclf.serving import project_path

    monkeypatch.setenv("TEXTCLF_CACHE", str(tmp_path / "cache"))
    remote = tmp_path / "bucket" / "run"
    (remote / "merged").mkdir(parents=True)
    (remote / "merged" / "classifier.json").write_text("{}")
    (remote / "ray_train").mkdir()
    (remote / "ray_train" / "big").write_text("checkpoint")
    local = project_path(f"file://{remote}")
    assert (local / "merged" / "classifier.json").exists() and not (local / "ray_train").exists()


def test_replicas_are_pinned_to_the_uri_not_to_a_node_local_cache():
    from textclf.serving import ClassifierSpec, ServeConfig, ServingPlan, pin_model

    plan = ServingPlan("m", {"r1": ClassifierSpec("r1", {}, "/home/x/.cache/textclf/runs/s3/b/runs/r1/merged")},
                       "r1", 64, False, 1, 16)
    assert pin_model(ServeConfig(run="s3://b/runs/r1"), plan).model_dump()["model_dir"] == "s3://b/runs/r1/merged"
    local = pin_model(ServeConfig(run="runs/r1"), plan)
    assert local.model_dir.endswith("r1/merged") and local.model_dir.startswith("/home/x") and local.name == "r1"
