"""The real stack end to end on a small subset: local Ray, Ray Data, 2 Ray Train workers running TRL SFTTrainer
with LoRA on SmolLM2-135M, the merge, and a vLLM CPU engine evaluating over Ray Data. One pipeline run is shared
by the tests below (and by the serving tests); the resume test then continues that run through the pipeline."""

import json
import os

import pytest
from support import SMALL, run_step

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline_run(tiny_pipeline):
    return tiny_pipeline


def test_pipeline_prints_macro_f1_and_writes_report(pipeline_run):
    runs, run, out = pipeline_run
    assert "macro_f1=" in out
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "macro_f1",
        "weighted_f1",
        "accuracy",
        "n",
        "per_class",
        "confusion_matrix",
        "prompts_per_second",
        "ece",
        "calibration",
        "abstain",
        "in_scope_accuracy",
        "abstain_rate",
        "answered_accuracy",
    ):
        assert key in metrics
    assert metrics["abstain"]["validation"]["n"] == metrics["n_validation"] > 0  # threshold chosen on validation
    for sub in ("merged", "adapter"):  # the chosen threshold is the server's default
        meta = json.loads((run / sub / "classifier.json").read_text())
        assert meta["abstain_threshold"] == metrics["abstain"]["threshold"] and "oos_label" in meta
    assert (run / "reliability.png").stat().st_size > 1000
    labels = json.loads((run / "data_report.json").read_text())["labels"]
    assert len(labels) == 10 and set(metrics["per_class"]) == set(labels)
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["n"]
    assert "Confusion matrix" in (run / "report.md").read_text()
    assert (run / "confusion_matrix.png").stat().st_size > 1000
    assert (run / "config.yaml").exists() and (run / "summary.json").exists()


def test_predictions_are_labels_with_probabilities(pipeline_run):
    _, run, _ = pipeline_run
    labels = set(json.loads((run / "adapter" / "classifier.json").read_text())["labels"])
    test_rows = (run / "data" / "test.jsonl").read_text().splitlines()
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(test_rows) > 0
    assert [p["text"] for p in preds] == [json.loads(line)["text"] for line in test_rows]
    for p in preds:
        assert p["predicted"] in labels and p["gold"] in labels
        assert 0.0 < p["probability"] <= 1.0 and isinstance(p["abstained"], bool)


def test_the_evaluation_engine_computes_on_every_core(pipeline_run):
    """Ray gives the one-CPU evaluation actor OMP_NUM_THREADS=1: its engine, bound to every core, sets its own count
    before torch loads OpenMP (vLLM logs the torch threads it keeps)."""
    _, run, _ = pipeline_run
    log = (run / "logs" / "pipeline.log").read_text()
    kept = [line for line in log.splitlines() if "BatchClassifier" in line and "leaving Torch threads at" in line]
    assert kept and all(f"leaving Torch threads at {os.cpu_count()} " in line for line in kept), kept


def test_training_ran_on_two_workers_with_label_only_loss(pipeline_run):
    _, run, out = pipeline_run
    assert "[train] start: world_size 2" in out
    assert "step 4/4" in out and "left ~" in out  # progress with steps, loss and time left
    report = json.loads((run / "data_report.json").read_text())
    assert report["tokens"]["train"]["rows"] == 40 and report["tokens"]["train"]["truncated_rows"] == 0
    ckpts = sorted((run / "ray_train").glob("checkpoint_*/checkpoint/trainer_state.json"))
    assert ckpts, "Ray Train stored no checkpoint"
    steps = {json.loads(p.read_text())["global_step"] for p in ckpts}
    assert 4 in steps  # the latest is always kept


def test_exported_adapter_and_merged_model(pipeline_run):
    _, run, _ = pipeline_run
    adapter, merged = run / "adapter", run / "merged"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    meta = json.loads((adapter / "classifier.json").read_text())
    assert meta["base_model"] == "smollm2-135m-instruct" and "{labels}" in meta["prompt"]["instruction"]
    assert (adapter / "tokenizer.json").exists() and not (adapter / "optimizer.pt").exists()
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    assert json.loads((merged / "classifier.json").read_text())["kind"] == "merged"


def test_mlflow_run_has_params_and_metrics(pipeline_run):
    runs, run, _ = pipeline_run
    import mlflow

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = mlflow.MlflowClient(tracking_uri=(runs / "mlruns").as_uri())
    r = client.get_run((run / "mlflow_run_id").read_text().strip())
    assert r.data.params["train.num_workers"] == "2"
    assert "test_macro_f1" in r.data.metrics and "loss" in r.data.metrics and "eval_loss" in r.data.metrics


def test_bad_data_fails_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "banking"}\n{"text": "", "label": "banking"}\n{"text": "x"}\n')
    proc = run_step(
        "pipeline", "--runs-dir", str(tmp_path / "runs"), "--name", "bad", "--train-file", str(bad), timeout=300
    )
    assert proc.returncode == 2
    assert f"{bad}:2: field 'text': empty text" in proc.stderr
    assert f"{bad}:3: field 'label': missing label" in proc.stderr
    assert not (tmp_path / "runs" / "bad" / "ray_train").exists()


def test_rerun_with_same_name_resumes_from_latest_checkpoint(pipeline_run):
    """A rerun on another setup is refused unless asked to resume; resumed as a whole pipeline, so that the model and
    report the serving tests read afterwards are the resumed run's (a train step alone removes the stale ones)."""
    runs, run, _ = pipeline_run
    args = [a if a != "4" else "6" for a in SMALL]  # max_steps 4 -> 6
    refused = run_step("train", "--runs-dir", str(runs), "--name", run.name, *args, timeout=300)
    assert refused.returncode == 2 and "max_steps 4 -> 6" in refused.stderr, refused.stderr[-3000:]
    proc = run_step("pipeline", "--runs-dir", str(runs), "--name", run.name, *args, "--on-existing", "resume")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "resuming from" in out
    assert "step 5/6" in out and "step 1/6" not in out  # continued, not restarted
    steps = {
        json.loads(p.read_text())["global_step"]
        for p in (run / "ray_train").glob("checkpoint_*/checkpoint/trainer_state.json")
    }
    assert 6 in steps
    assert (run / "merged" / "classifier.json").exists() and (run / "summary.json").exists()  # made again
