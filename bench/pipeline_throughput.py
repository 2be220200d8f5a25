"""Benchmark, not a test: training and evaluation throughput, measured side by side in one run.

    python -m bench.pipeline_throughput [--steps 20] [--workers 2] [--batch 16] [--runs-dir runs/bench]

1. Training examples/s: the Ray Train job (N workers, global batch B) against a plain single-process
   SFTTrainer (per-device batch B) on the same tokenized data, model and settings. Both figures are the
   trainer's own train_samples_per_second (model loading excluded).
2. Evaluation prompts/s: the Ray Data + vLLM evaluation job against vLLM offline `LLM.generate` on the same
   prompts with the same engine and sampling settings. Engine start-up is reported separately.
Writes bench/results/pipeline-<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ray_jobs.common import setup_logging, start_run
from ray_jobs.evaluate import classifier_source, evaluate, read_validation
from ray_jobs.export import export
from ray_jobs.prepare import prepare, read_split
from ray_jobs.train import train
from textclf.config import load_config
from textclf.models import resolve_model
from textclf.sources import load_splits


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=None, help="default: the machine's CPUs / workers")
    ap.add_argument("--batch", type=int, default=16, help="global batch (examples per optimizer step)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs-dir", default="runs/bench")
    ap.add_argument("--eval-examples", type=int, default=None, help="a stratified subset of the test split")
    return ap.parse_args(argv)


def train_both(args: argparse.Namespace, overrides: dict[str, Any], cfg, run_dir: Path, prepared) -> dict[str, Any]:
    """Training examples/s: Ray Train with N workers, then one plain process on the same rows and global batch."""
    from textclf.training import build_trainer

    train(cfg, run_dir, prepared)
    ray_eps = json.loads((run_dir / "train_metrics.json").read_text())["final_train_samples_per_second"]
    single_cfg = load_config(overrides={**overrides, "num_workers": 1, "per_device_batch_size": args.batch})
    rows = {k: list(ds.iter_rows()) for k, ds in prepared.datasets.items()}
    trainer = build_trainer(
        single_cfg, resolve_model(args.model), rows["train"], rows["validation"], str(run_dir / "single_process")
    )
    single_eps = trainer.train().metrics["train_samples_per_second"]
    return {
        "ray_train_examples_per_s": ray_eps,
        "single_process_examples_per_s": single_eps,
        "ratio_ray_over_single": ray_eps / single_eps,
        "workers": args.workers,
        "global_batch": args.batch,
        "steps": args.steps,
    }


def evaluate_both(cfg, run_dir: Path) -> dict[str, Any]:
    """Evaluation prompts/s: the Ray Data + vLLM job, then vLLM offline in this process on the same prompts (the
    validation and test texts the job classifies) and settings."""
    import ray

    from textclf.inference import BatchClassifier

    export(cfg, run_dir)
    ray_eval = evaluate(cfg, run_dir)
    ray.shutdown()  # frees the CPUs the evaluation actor held
    model_dir, meta, adapter = classifier_source(cfg, run_dir)
    test = [ex.text for ex in read_split(run_dir, "test")]
    texts = [ex.text for ex in read_validation(run_dir)] + test
    t0 = time.time()
    clf = BatchClassifier(model_dir, meta, cfg.eval.engine_settings(), adapter, cfg.eval.cpu_threads_bind)
    engine_start = time.time() - t0
    t1 = time.time()
    offline = clf.classify(texts)[-len(test) :]
    gen_s = time.time() - t1
    job = [json.loads(line)["predicted"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    agree = sum(o["label"] == p for o, p in zip(offline, job))
    return {
        "ray_data_prompts_per_s_incl_engine_start": ray_eval["prompts_per_second"],
        "offline_prompts_per_s_incl_engine_start": len(texts) / (engine_start + gen_s),
        "offline_prompts_per_s_generate_only": len(texts) / gen_s,
        "offline_engine_start_s": engine_start,
        "n_prompts": len(texts),
        "same_labels": agree / len(test),
    }


def print_table(args: argparse.Namespace, results: dict[str, Any], out: Path) -> None:
    t, e = results["train"], results["eval"]
    print("\n| measure | Ray | plain | Ray / plain |\n|---|---:|---:|---:|")
    print(
        f"| training examples/s ({args.workers} workers vs 1 process, global batch {args.batch}) | "
        f"{t['ray_train_examples_per_s']:.2f} | {t['single_process_examples_per_s']:.2f} | "
        f"{t['ratio_ray_over_single']:.2f} |"
    )
    print(
        f"| evaluation prompts/s, engine start included | {e['ray_data_prompts_per_s_incl_engine_start']:.1f} | "
        f"{e['offline_prompts_per_s_incl_engine_start']:.1f} | "
        f"{e['ray_data_prompts_per_s_incl_engine_start'] / e['offline_prompts_per_s_incl_engine_start']:.2f} |"
    )
    print(f"| evaluation prompts/s, generate only (offline) | | {e['offline_prompts_per_s_generate_only']:.1f} | |")
    print(
        f"\nsame predicted label on the test rows, Ray Data job vs offline: {100 * e['same_labels']:.1f}%; "
        f"written {out}"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    cpus = args.cpus_per_worker or max(1.0, (os.cpu_count() or 1) // args.workers)
    overrides = dict(
        model=args.model,
        runs_dir=args.runs_dir,
        name=f"bench-{time.strftime('%H%M%S')}",
        num_workers=args.workers,
        cpus_per_worker=cpus,
        per_device_batch_size=args.batch // args.workers,
        max_steps=args.steps,
        eval_steps=args.steps,
        save_steps=args.steps,
        logging_steps=max(1, args.steps // 4),
        max_eval_examples=args.eval_examples,
    )
    cfg = load_config(overrides=overrides)
    splits = load_splits(cfg.data)
    run_dir = start_run(cfg, splits, trains=True)
    prepared = prepare(cfg, run_dir, splits)
    results = {
        "model": args.model,
        "train": train_both(args, overrides, cfg, run_dir, prepared),
        "eval": evaluate_both(cfg, run_dir),
    }
    out = Path("bench/results") / f"pipeline-{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(args, results, out)


if __name__ == "__main__":
    main()
