"""A run name holds one run (textclf/runs.py, ray_jobs/common.py start_run): a rerun that differs is refused unless
asked to resume or overwrite, and an earlier attempt's outputs never pass for the new run's. No Ray, no training."""

import json

import pytest
import yaml

from ray_jobs.common import open_run, start_run
from textclf import runs
from textclf.config import load_config
from textclf.runs import RunConflictError
from textclf.sources import load_splits

STALE = [
    "adapter/classifier.json",
    "merged/classifier.json",
    "metrics.json",
    "report.md",
    "predictions.jsonl",
    "confusion_matrix.png",
    "summary.json",
    "train_metrics.json",
    "train_output.json",
]
CHECKPOINT = "ray_train/checkpoint_000001/checkpoint/adapter_model.safetensors"


def write_data(folder, labels=("a", "b"), extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 10), ("validation", 2), ("test", 2)):
        rows = [
            {"text": f"{split} {label} {i}{extra if split == 'train' else ''}", "label": label}
            for label in labels
            for i in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {f"{s}_file": str(folder / f"{s}.jsonl") for s in ("train", "validation", "test")}


def start(tmp_path, data=None, trains=True, **overrides):
    data = data or write_data(tmp_path / "data")
    cfg = load_config(overrides={"runs_dir": str(tmp_path / "runs"), "name": "r", **data, **overrides})
    return start_run(cfg, load_splits(cfg.data), trains=trains)


def fill(run_dir, paths):
    for p in paths:
        (run_dir / p).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / p).write_text("old")


def test_an_identical_rerun_resumes_without_the_earlier_attempts_outputs(tmp_path):
    run = start(tmp_path)
    assert (run / runs.FINGERPRINT).exists() and (run / "config.yaml").exists()
    fill(run, STALE + [CHECKPOINT])
    assert start(tmp_path, trains=False) == run  # prepare on its own leaves the trained outputs alone
    assert all((run / p).exists() for p in STALE)
    # run control and evaluation settings are not the model's: still the same run
    assert start(tmp_path, max_failures=2, kv_cache_gib=0.5, experiment="other", checkpoints_to_keep=3) == run
    assert not any((run / p.split("/")[0]).exists() for p in STALE)
    assert (run / CHECKPOINT).exists()  # what the rerun resumes from
    assert open_run(load_config(overrides={"runs_dir": str(tmp_path / "runs"), "name": "r"})) == run  # evaluate, export


def test_a_changed_learning_rate_is_refused_naming_it(tmp_path):
    run = start(tmp_path)
    fill(run, STALE + [CHECKPOINT])
    with pytest.raises(RunConflictError, match=r"learning_rate 0\.001 -> 0\.0005.*--on-existing"):
        start(tmp_path, learning_rate=5e-4)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["learning_rate"] == 1e-3  # untouched
    assert all((run / p).exists() for p in STALE + [CHECKPOINT])


def test_changed_labels_are_refused_even_when_resuming(tmp_path):
    run = start(tmp_path)
    other = write_data(tmp_path / "data2", labels=("a", "c"))
    for on_existing in ("refuse", "resume"):
        with pytest.raises(RunConflictError, match=r"labels: added 'c', removed 'b'.*overwrite") as e:
            start(tmp_path, data=other, on_existing=on_existing)
        assert "--on-existing resume" not in str(e.value)
    assert json.loads((run / runs.FINGERPRINT).read_text())["labels"] == ["a", "b"]


def test_changed_data_is_refused_unless_resumed(tmp_path):
    run = start(tmp_path)
    fill(run, STALE + [CHECKPOINT])
    other = write_data(tmp_path / "data2", extra=" more")
    with pytest.raises(RunConflictError, match=r"data: train \(other rows, 20 as before\)"):
        start(tmp_path, data=other)
    assert start(tmp_path, data=other, on_existing="resume", trains=False) == run  # prepare on its own, too
    assert (run / CHECKPOINT).exists() and not (run / "merged").exists()
    recorded = json.loads((run / runs.FINGERPRINT).read_text())
    assert recorded["data"]["train"] != recorded["earlier"][0]["data"]["train"]  # both setups on record
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["on_existing"] == "refuse"
    assert start(tmp_path, data=other) == run  # the resumed setup is now the run's own


def test_overwrite_starts_the_run_afresh(tmp_path):
    run = start(tmp_path)
    fill(run, STALE + [CHECKPOINT, "mlflow_run_id"])
    assert start(tmp_path, learning_rate=5e-4, on_existing="overwrite") == run
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", runs.FINGERPRINT]
    recorded = json.loads((run / runs.FINGERPRINT).read_text())
    assert recorded["config"]["learning_rate"] == 5e-4 and "earlier" not in recorded


def test_a_refused_step_exits_with_status_2_before_anything_runs(tmp_path, monkeypatch, capsys):
    import ray_jobs.train

    data = write_data(tmp_path / "data")
    start(tmp_path, data=data)
    monkeypatch.setattr(ray_jobs.train, "prepare", lambda *a: pytest.fail("prepared a refused run"))
    args = ["--runs-dir", str(tmp_path / "runs"), "--name", "r", "--learning-rate", "5e-4"]
    args += [x for k, v in data.items() for x in (f"--{k}", v)]
    with pytest.raises(SystemExit) as e:
        ray_jobs.train.main(args)
    assert e.value.code == 2 and "learning_rate" in capsys.readouterr().err


def test_a_run_behind_a_uri_loses_its_stale_outputs_there_too(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTCLF_CACHE", str(tmp_path / "cache"))
    data = write_data(tmp_path / "data")
    uri_runs = f"file://{tmp_path}/bucket/runs"
    remote = tmp_path / "bucket" / "runs" / "r"
    start(tmp_path, data=data, runs_dir=uri_runs, storage_path=str(tmp_path / "ckpt"))
    assert (remote / runs.FINGERPRINT).exists()
    fill(remote, STALE + [CHECKPOINT])
    fill(tmp_path / "ckpt" / "r", ["ray_train/checkpoint_000001/x"])
    run = start(tmp_path, data=data, runs_dir=uri_runs, storage_path=str(tmp_path / "ckpt"))
    assert not any((p / s).exists() for p in (remote, run) for s in STALE)
    assert (remote / CHECKPOINT).exists() and (tmp_path / "ckpt" / "r" / "ray_train").exists()
    start(tmp_path, data=data, runs_dir=uri_runs, storage_path=str(tmp_path / "ckpt"), on_existing="overwrite")
    assert not (remote / "ray_train").exists() and not (tmp_path / "ckpt" / "r" / "ray_train").exists()


def test_a_run_from_before_fingerprints_is_compared_by_its_files(tmp_path):
    run = start(tmp_path, trains=False)
    (run / "data").mkdir()
    for split in ("train", "validation", "test"):
        (run / "data" / f"{split}.jsonl").write_text((tmp_path / "data" / f"{split}.jsonl").read_text())
    (run / "data_report.json").write_text(json.dumps({"labels": ["a", "b"]}))
    (run / runs.FINGERPRINT).unlink()
    assert runs.recorded(run)["data"]["train"]["rows"] == 20
    with pytest.raises(RunConflictError, match="learning_rate"):
        start(tmp_path, learning_rate=5e-4)
    assert start(tmp_path) == run


def test_label_order_and_run_names():
    old = {"config": {}, "labels": ["a", "b"], "data": {}}
    assert runs.differences(old, {**old, "labels": ["b", "a"]})["labels"] == ["same labels in another order ('b', 'a')"]
    assert runs.check(None, old, "refuse", "r") == "new" and runs.check(old, dict(old), "refuse", "r") == "same"
    for bad in ("..", "../x", "/tmp/x", "a//b", "."):
        with pytest.raises(ValueError, match="run.name"):
            load_config(overrides={"name": bad})
    with pytest.raises(ValueError, match="on_existing"):
        load_config(overrides={"on_existing": "append"})
