"""Step 4: batch inference with vLLM over Ray Data on the run's validation and test splits (one engine, one pass);
writes the evaluation report. Each model kind scores in its own way (textclf.kinds): label tokens for generative
classifiers, vLLM's pooling runner for classification heads.

    python -m ray_jobs.evaluate --name <run> [--eval-adapter true] [--abstain-target auto]
    python -m ray_jobs.evaluate --name <run> --model-uri models:/textclf/3   # a registered model on the run's splits

Evaluates <run>/merged (or base + <run>/adapter with --eval-adapter) and writes metrics.json, report.md,
confusion_matrix.png, reliability.png and predictions.jsonl (test rows) into the run folder. The abstain threshold
is chosen on the validation predictions (textclf.abstain) and saved into the classifier.json of <run>/merged and
<run>/adapter, where the server takes it as its default. --abstain-target: auto, none, oos_recall:<share> or
precision:<share> (see textclf/abstain.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from textclf import tracking
from textclf.abstain import check_target, choose_threshold, oos_label, parse_target
from textclf.config import Config, parse_args
from textclf.data import Example
from textclf.export import META_FILE, read_meta, update_meta
from textclf.inference import BatchClassifier
from textclf.metrics import abstain_figures, abstained, calibration, compute_metrics, write_report
from textclf.models import resolve_model

from .common import init_ray, open_run, setup_logging, sync_run
from .console import say
from .prepare import read_split

log = logging.getLogger("ray_jobs.evaluate")


def classifier_source(cfg: Config, run_dir: Path) -> tuple[str, dict[str, Any], str | None]:
    """(model dir, classifier meta, adapter dir or None): the run's, or the registered model of --model-uri."""
    if cfg.eval.model_uri:
        folder = tracking.resolve_model_uri(
            cfg.eval.model_uri, tracking.tracking_uri(cfg.run.mlflow_uri, cfg.run.runs_dir)
        )
        meta = read_meta(folder)
        if meta["kind"] != "adapter":
            return str(folder), meta, None
        return resolve_model(meta["base_model"], cfg.model.model_cache_dir), meta, str(folder)
    merged = run_dir / "merged"
    if not cfg.eval.eval_adapter and (merged / "classifier.json").exists():
        return str(merged), read_meta(merged), None
    adapter = run_dir / "adapter"
    meta = read_meta(adapter)
    return resolve_model(meta["base_model"], cfg.model.model_cache_dir), meta, str(adapter)


def evaluate(cfg: Config, run_dir: Path) -> dict[str, Any]:
    import ray

    model_dir, meta, adapter = classifier_source(cfg, run_dir)
    out_dir = report_dir(cfg, run_dir, Path(adapter or model_dir))
    oos = oos_label(meta["labels"], cfg.data.oos_label)
    target = parse_target(cfg.eval.abstain_target)
    check_target(target, oos)  # a target the label set cannot have fails before the engine starts
    splits = {"validation": read_validation(run_dir), "test": read_split(run_dir, "test")}
    init_ray(cfg)
    e = cfg.eval
    # Both splits in one pass (one engine start); each row carries its split and index to be put back in order.
    items = [
        {"text": ex.text, "label": ex.label, "split": name, "row": i}
        for name, examples in splits.items()
        for i, ex in enumerate(examples)
    ]
    # about a batch a block: with from_items' default of 200 blocks each batch of 256 was followed by one of 3 texts
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / e.eval_batch_size)))
    start = time.time()
    rows = ds.map_batches(
        BatchClassifier,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "meta": meta,
            "engine": e.engine_settings(),
            "adapter_dir": adapter,
            "cpu_threads_bind": e.cpu_threads_bind,
        },
        batch_size=e.eval_batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),  # Ray 2.51 deprecated concurrency=
        num_cpus=e.eval_num_cpus,
        num_gpus=e.eval_num_gpus,
    ).take_all()
    elapsed = time.time() - start
    by_row = {(str(r["split"]), int(r["row"])): r for r in rows}
    val, test = (
        split_columns(splits[name], [by_row[(name, i)] for i in range(len(splits[name]))])
        for name in ("validation", "test")
    )
    choice = choose_threshold(val["gold"], val["predicted"], val["probability"], target, oos)
    threshold = choice["threshold"]
    level = logging.WARNING if threshold is None and target.kind != "none" else logging.INFO
    log.log(
        level,
        "abstain threshold %s (target %s, oos label %s)%s",
        threshold,
        choice["target"],
        oos,
        f": {choice['note']}" if choice["note"] else "",
    )
    predictions = []
    for i, ex in enumerate(splits["test"]):
        r = by_row[("test", i)]
        predictions.append(
            {
                "text": ex.text,
                "gold": ex.label,
                "predicted": test["predicted"][i],
                "probability": round(test["probability"][i], 6),
                "truncated": bool(r["truncated"]),
                "abstained": abstained(test["probability"][i], threshold),
            }
        )
    metrics = compute_metrics(test["gold"], test["predicted"], meta["labels"])
    cal = calibration(test["gold"], test["predicted"], test["probability"])
    figures = abstain_figures(test["gold"], test["predicted"], test["probability"], threshold, oos)
    n_prompts = sum(len(x) for x in splits.values())
    extra = {
        "model": model_dir,
        "adapter": adapter,
        "eval_seconds": round(elapsed, 1),
        "prompts_per_second": round(n_prompts / elapsed, 2),
        "n_validation": len(splits["validation"]),
        "truncated": sum(p["truncated"] for p in predictions),
        "ece": cal["ece"],
        "calibration": cal["bins"],
        "abstain": choice,
        "in_scope_accuracy": figures["in_scope_accuracy"],
        **({"oos_recall": figures["oos_recall"]} if oos is not None else {}),
        "abstain_rate": figures["abstain_rate"],
        "answered_accuracy": figures["answered_accuracy"],
    }
    write_report(metrics, predictions, out_dir, extra)
    if not cfg.eval.model_uri:  # a registered version's files never change: its threshold is in its report
        save_threshold(run_dir, threshold, oos)
    log.info(
        "evaluated %d prompts (%d validation, %d test) in %.1fs (%.1f/s, engine start included)",
        n_prompts,
        len(splits["validation"]),
        len(splits["test"]),
        elapsed,
        n_prompts / elapsed,
    )
    uri = tracking.tracking_uri(cfg.run.mlflow_uri, cfg.run.runs_dir)
    logged = (
        "macro_f1",
        "weighted_f1",
        "accuracy",
        "ece",
        "in_scope_accuracy",
        "oos_recall",
        "abstain_rate",
        "answered_accuracy",
    )
    try:
        if not cfg.eval.model_uri:  # the run's MLflow run holds its own model's figures
            tracking.log_metrics(
                uri, run_dir, {f"test_{k}": v for k, v in {**metrics, **extra}.items() if k in logged and v is not None}
            )
    except Exception as exc:
        log.warning("MLflow logging failed: %s", exc)
    return {**metrics, **extra, "report_dir": str(out_dir)}


def report_dir(cfg: Config, run_dir: Path, model: Path) -> Path:
    """The run folder, or for a registered model <run>/evaluations/<name>-<version> (resolve_model_uri's folder is
    <...>/<version>/<name>)."""
    if not cfg.eval.model_uri:
        return run_dir
    out = run_dir / "evaluations" / f"{model.name}-{model.parent.name}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def split_columns(examples: list[Example], rows: list[dict[str, Any]]) -> dict[str, list]:
    """gold, predicted and (unrounded) probability columns of one split, in the split's order."""
    return {
        "gold": [ex.label for ex in examples],
        "predicted": [str(r["predicted"]) for r in rows],
        "probability": [float(r["probability"]) for r in rows],
    }


def read_validation(run_dir: Path) -> list[Example]:
    """The run's validation split; none (no file, or an empty one) gives no rows, and then no threshold."""
    path = run_dir / "data" / "validation.jsonl"
    if not path.exists() or not path.read_text().strip():
        return []
    return read_split(run_dir, "validation")


def save_threshold(run_dir: Path, threshold: float | None, oos: str | None) -> None:
    """Into the run's exported classifiers (merged/ and adapter/), where the server reads its default threshold."""
    for sub in ("merged", "adapter"):
        if (run_dir / sub / META_FILE).exists():
            update_meta(run_dir / sub, abstain_threshold=threshold, oos_label=oos)


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_args(argv, description=__doc__)
    run_dir = open_run(cfg)
    m = evaluate(cfg, run_dir)
    sync_run(cfg, run_dir)
    say(f"macro_f1={m['macro_f1']:.4f} weighted_f1={m['weighted_f1']:.4f} accuracy={m['accuracy']:.4f} n={m['n']}")
    if cfg.eval.model_uri:
        say(f"{cfg.eval.model_uri}: report in {m['report_dir']}")


if __name__ == "__main__":
    main()
