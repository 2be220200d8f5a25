"""Step 4: batch inference with vLLM over Ray Data on the run's test split; writes the evaluation report.
Each model kind scores in its own way (textclf.kinds): label tokens for generative classifiers, vLLM's pooling runner
for classification heads.

    python -m ray_jobs.evaluate --name <run> [--eval-adapter true]

Evaluates <run>/merged (or base + <run>/adapter with --eval-adapter) and writes metrics.json, report.md,
confusion_matrix.png and predictions.jsonl into the run folder.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from textclf import tracking
from textclf.config import Config, parse_args
from textclf.export import read_meta
from textclf.inference import BatchClassifier
from textclf.metrics import compute_metrics, write_report
from textclf.models import resolve_model

from .common import init_ray, open_run, setup_logging, sync_run
from .prepare import read_split

log = logging.getLogger("ray_jobs.evaluate")


def classifier_source(cfg: Config, run_dir: Path) -> tuple[str, dict[str, Any], str | None]:
    """(model dir, classifier meta, adapter dir or None)."""
    merged = run_dir / "merged"
    if not cfg.eval.eval_adapter and (merged / "classifier.json").exists():
        return str(merged), read_meta(merged), None
    adapter = run_dir / "adapter"
    meta = read_meta(adapter)
    return resolve_model(meta["base_model"], cfg.model.model_cache_dir), meta, str(adapter)


def evaluate(cfg: Config, run_dir: Path) -> dict[str, Any]:
    import ray

    model_dir, meta, adapter = classifier_source(cfg, run_dir)
    test = read_split(run_dir, "test")
    init_ray(cfg)
    e = cfg.eval
    engine_options = {"max_num_seqs": e.max_num_seqs, "kv_cache_gib": e.kv_cache_gib,
                      "gpu_memory_utilization": e.gpu_memory_utilization}
    ds = ray.data.from_items([{"text": ex.text, "label": ex.label} for ex in test])
    start = time.time()
    rows = ds.map_batches(
        BatchClassifier,
        fn_constructor_kwargs={"model_dir": model_dir, "meta": meta, "engine_options": engine_options, "adapter_dir": adapter,
                               "cpu_threads_bind": e.cpu_threads_bind},
        batch_size=e.eval_batch_size,
        concurrency=1,
        num_cpus=e.eval_num_cpus,
        num_gpus=e.eval_num_gpus,
    ).take_all()
    elapsed = time.time() - start
    by_text = {}  # Ray Data may reorder blocks: put predictions back in the split's order
    for r in rows:
        by_text.setdefault(r["text"], []).append(r)
    predictions = []
    for ex in test:
        r = by_text[ex.text].pop()
        predictions.append({"text": ex.text, "gold": ex.label, "predicted": r["predicted"],
                            "probability": round(float(r["probability"]), 6), "truncated": bool(r["truncated"])})
    metrics = compute_metrics([p["gold"] for p in predictions], [p["predicted"] for p in predictions], meta["labels"])
    extra = {"model": model_dir, "adapter": adapter, "eval_seconds": round(elapsed, 1),
             "prompts_per_second": round(len(test) / elapsed, 2), "truncated": sum(p["truncated"] for p in predictions)}
    write_report(metrics, predictions, run_dir, extra)
    log.info("evaluated %d prompts in %.1fs (%.1f/s, engine start included)", len(test), elapsed, len(test) / elapsed)
    uri = tracking.tracking_uri(cfg.run.mlflow_uri, cfg.run.runs_dir)
    try:
        tracking.log_metrics(uri, run_dir, {f"test_{k}": metrics[k] for k in ("macro_f1", "weighted_f1", "accuracy")})
    except Exception as exc:
        log.warning("MLflow logging failed: %s", exc)
    return {**metrics, **extra}


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_args(argv, description=__doc__)
    run_dir = open_run(cfg)
    m = evaluate(cfg, run_dir)
    sync_run(cfg, run_dir)
    print(f"macro_f1={m['macro_f1']:.4f} weighted_f1={m['weighted_f1']:.4f} accuracy={m['accuracy']:.4f} n={m['n']}")


if __name__ == "__main__":
    main()
