"""Run folders behind a URI (textclf/storage.py), with a real pyarrow filesystem: file:// works offline here;
s3:// and gs:// go through the same pyarrow calls but could not be reached from this machine."""

import fcntl
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs
import pytest

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

    plan = ServingPlan(
        "m", {"r1": ClassifierSpec("r1", {}, "/home/x/.cache/textclf/runs/s3/b/runs/r1/merged")}, "r1", 64, False, 1, 16
    )
    assert pin_model(ServeConfig(run="s3://b/runs/r1"), plan).model_dump()["model_dir"] == "s3://b/runs/r1/merged"
    local = pin_model(ServeConfig(run="runs/r1"), plan)
    assert local.model_dir.endswith("r1/merged") and local.model_dir.startswith("/home/x") and local.name == "r1"


def remote_run(tmp_path, files):
    remote = tmp_path / "bucket" / "run"
    for rel, text in files.items():
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_text(text)
    return remote, f"file://{remote}"


@pytest.mark.parametrize("key", ["../evil", "adapter/../../evil", "/evil", "adapter//x", "./x"])
def test_download_refuses_a_key_that_is_not_inside_the_folder(tmp_path, monkeypatch, key):
    remote, uri = remote_run(tmp_path, {"ok": "fine", "evil": "bad"})
    real = storage._files

    def listing(fs, base):  # a store's listing may name any key: here one that points elsewhere
        files = real(fs, base)
        return {**files, key: files.pop("evil")} if base == str(remote) else files

    monkeypatch.setattr(storage, "_files", listing)
    local = tmp_path / "cache" / "run"
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        storage.download(uri, local)
    assert not local.exists() and not (tmp_path / "cache" / "evil").exists()  # checked before anything is copied


def test_download_refuses_a_key_that_leaves_the_folder_through_a_link(tmp_path):
    _, uri = remote_run(tmp_path, {"adapter/weights": "w"})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "cache" / "run").mkdir(parents=True)
    (tmp_path / "cache" / "run" / "adapter").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="'adapter/weights': it resolves outside"):
        storage.download(uri, tmp_path / "cache" / "run")
    assert not list((tmp_path / "elsewhere").iterdir())


def test_downloads_of_one_run_take_turns_and_each_file_appears_whole(tmp_path):
    files = {f"part{i}/f{j}.bin": (f"{i}{j}" * 50_000) for i in range(4) for j in range(5)}
    _, uri = remote_run(tmp_path, files)
    local = tmp_path / "cache" / "run"
    local.parent.mkdir(parents=True)
    with open(local.parent / ".run.lock", "w") as lock:  # another download holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=storage.download, args=(uri, local))
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive() and not local.exists()
    waiting.join(30)
    with ThreadPoolExecutor(4) as pool:
        for got in [pool.submit(storage.download, uri, local) for _ in range(4)]:
            assert got.result() == local.resolve()
    assert {str(p.relative_to(local)): p.read_text() for p in local.rglob("*") if p.is_file()} == files


def test_a_failed_download_leaves_no_partial_or_temporary_file(tmp_path, monkeypatch):
    _, uri = remote_run(tmp_path, {"a/one": "1" * 1000, "b/two": "2" * 1000})
    real = pyarrow.fs.copy_files
    calls = []

    def copy_then_fail(source, target, **kw):  # the second file breaks off half-written
        real(source, target, **kw)
        calls.append(target)
        if len(calls) == 2:
            with open(target, "r+") as f:
                f.truncate(10)
            raise OSError("connection reset")

    monkeypatch.setattr(pyarrow.fs, "copy_files", copy_then_fail)
    local = tmp_path / "cache" / "run"
    with pytest.raises(OSError, match="connection reset"):
        storage.download(uri, local)
    assert [str(p.relative_to(local)) for p in local.rglob("*")] == ["a", "a/one"]  # complete files only
    assert (local / "a" / "one").read_text() == "1" * 1000
    monkeypatch.setattr(pyarrow.fs, "copy_files", real)
    storage.download(uri, local)
    assert (local / "b" / "two").read_text() == "2" * 1000


def test_remove_deletes_named_entries_locally_and_behind_a_uri(tmp_path):
    remote, uri = remote_run(tmp_path, {"merged/w": "w", "metrics.json": "{}", "ray_train/c": "c"})
    assert len(storage.remove(uri, ["merged", "metrics.json", "absent"])) == 2
    assert [p.name for p in remote.iterdir()] == ["ray_train"]
    assert storage.remove(str(remote)) == [str(remote)] and not remote.exists()
