"""A run's reports and exported model in MLflow (textclf/tracking.py), offline: a fake run folder, a file store in a
temporary folder, the model registered and resolved back from models:/<name>/<version> to a folder."""

import json

import pytest

from textclf import tracking

LABELS = ["banking", "travel"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """(tracking URI, a run folder with an MLflow run, merged/ and the reports)."""
    monkeypatch.setenv("TEXTCLF_CACHE", str(tmp_path / "cache"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "runs" / "r1"
    merged = run / "merged"
    merged.mkdir(parents=True)
    (merged / "classifier.json").write_text(json.dumps({"kind": "merged", "base_model": "tiny", "labels": LABELS}))
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"weights")
    (run / "metrics.json").write_text(json.dumps({"macro_f1": 0.5}))
    (run / "report.md").write_text("# report")
    (run / "predictions.jsonl").write_text("{}\n")
    (run / "data_report.json").write_text(json.dumps({"labels": LABELS}))
    tracking.start_run(uri, "textclf", "r1", {"a": 1}, run)
    return uri, run


def test_reports_and_model_are_logged_and_registered(store):
    uri, run = store
    assert tracking.log_reports(uri, run) == ["report.md", "predictions.jsonl", "metrics.json", "data_report.json"]
    assert tracking.register_model(uri, run, "clf") == "models:/clf/1"
    assert tracking.register_model(uri, run, "clf") == "models:/clf/2"  # a rerun: a new version, new files
    client = tracking._client(uri)
    run_id = (run / tracking.RUN_ID_FILE).read_text()
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.md", "metrics.json", "predictions.jsonl", "data_report.json", "model", "model-2"} <= names
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/MLmodel", "model/classifier.json"}


def test_a_registered_version_resolves_to_a_model_folder_and_a_run_folder(store):
    uri, run = store
    tracking.register_model(uri, run, "clf")
    folder = tracking.resolve_model_uri("models:/clf/1", uri)
    assert folder.name == "clf"  # the server names the classifier after the folder
    original = (run / "merged" / "classifier.json").read_text()
    assert (folder / "classifier.json").read_text() == original  # model_dir, evaluation
    assert (folder / "merged" / "classifier.json").read_text() == original  # run, TEXTCLF_RUN
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert tracking.resolve_model_uri("models:/clf/1", uri) == folder  # resolved once, then reused


def test_latest_and_alias_pick_their_version(store):
    uri, run = store
    tracking.register_model(uri, run, "clf")
    (run / "merged" / "classifier.json").write_text(json.dumps({"kind": "merged", "labels": LABELS, "v": 2}))
    tracking.register_model(uri, run, "clf")
    latest = tracking.resolve_model_uri("models:/clf/latest", uri)
    assert json.loads((latest / "classifier.json").read_text())["v"] == 2 and latest.parent.name == "2"
    tracking._client(uri).set_registered_model_alias("clf", "champion", "1")
    first = tracking.resolve_model_uri("models:/clf@champion", uri)
    assert "v" not in json.loads((first / "classifier.json").read_text())


def test_an_adapter_resolves_as_an_adapter_folder(store):
    uri, run = store
    import shutil

    shutil.move(str(run / "merged"), str(run / "adapter"))
    meta = {"kind": "adapter", "base_model": "tiny", "labels": LABELS}
    (run / "adapter" / "classifier.json").write_text(json.dumps(meta))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    tracking.register_model(uri, run, "clf")
    folder = tracking.resolve_model_uri("models:/clf/1", uri)
    assert (folder / "adapter" / "adapter_config.json").exists() and not (folder / "merged").exists()


def test_the_server_takes_a_registered_model_where_it_takes_a_run(store, monkeypatch):
    from textclf.serving import project_path

    uri, run = store
    tracking.register_model(uri, run, "clf")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # else the default store, <project>/runs/mlruns
    assert project_path("models:/clf/1") == tracking.resolve_model_uri("models:/clf/1", uri)


@pytest.mark.parametrize("bad", ["models:/", "models:/clf", "models:/clf/one", "runs:/abc/model"])
def test_a_malformed_model_uri_is_refused(store, bad):
    with pytest.raises(ValueError, match="models:/<name>/<version>"):
        tracking.resolve_model_uri(bad, store[0])


def test_a_run_without_an_mlflow_run_registers_nothing(tmp_path):
    (tmp_path / "merged").mkdir()
    assert tracking.log_reports((tmp_path / "mlruns").as_uri(), tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no MLflow run"):
        tracking.register_model((tmp_path / "mlruns").as_uri(), tmp_path, "clf")
