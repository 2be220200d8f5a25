"""Step 2: LoRA SFT on Ray Train: N workers, each running TRL's SFTTrainer (DDP: gloo on CPUs, NCCL on GPUs).

    python -m ray_jobs.train [--config run.yaml] [--num-workers 4 --use-gpu true ...]

Runs prepare first, then trains; checkpoints go through Ray Train (the best by eval loss kept, plus the latest),
a rerun with the same --name and setup resumes from the latest (another setup: see --on-existing), and the best
adapter is exported to <run>/adapter/.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from textclf import tracking
from textclf.config import Config, parse_args
from textclf.export import save_adapter
from textclf.kinds import get_kind
from textclf.models import resolve_model
from textclf.sources import load_splits

from .common import setup_logging, start_run, storage_path, sync_run
from .console import say
from .prepare import Prepared, exit_on_data_error, prepare

log = logging.getLogger("ray_jobs.train")


def train_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from textclf.plan import apply_plan, plan_training
    from textclf.training import PlanCallback, StepTimes, all_ranks_max, measure_step_seconds

    cfg = Config.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    # Which node each rank runs on (the cluster tests read it from the job's log).
    print(
        f"[train] rank {ctx.get_world_rank()} on node {ray.get_runtime_context().get_node_id()} pid {os.getpid()}",
        flush=True,
    )
    os.environ.update(config.get("env", {}))
    # Every worker gets the whole (small, tokenized) dataset; the HF sampler shards it across ranks.
    train_rows = list(ray.train.get_dataset_shard("train").iter_rows())
    eval_rows = list(ray.train.get_dataset_shard("validation").iter_rows())
    # A fresh folder per attempt: RayTrainReportCallback reports the highest-numbered checkpoint-N it finds there,
    # so a stale one from an earlier run of the same name (or a killed attempt) would be reported as this step's.
    output_dir = Path(tempfile.mkdtemp(prefix=f"textclf-{cfg.run.name}-rank{ctx.get_world_rank()}-"))
    trainer = get_kind(cfg.model.model_kind).build_trainer(
        cfg,
        resolve_model(cfg.model.model, cfg.model.model_cache_dir),
        train_rows,
        eval_rows,
        str(output_dir),
        labels=config["labels"],
        use_gpu=cfg.train.use_gpu,
        callbacks=[
            plan_keeper := PlanCallback(config["cfg"]["train"]),
            RayTrainReportCallback(),
            step_times := StepTimes(),
        ],  # the plan enters each checkpoint first
        report_to=["mlflow"] if config.get("env") else [],
    )
    checkpoint = ray.train.get_checkpoint()  # set when Ray restarts a failed run or resumes a named one
    plan = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            plan = plan_keeper.saved_plan(os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))
    if plan is None:
        step_s = all_ranks_max(measure_step_seconds(trainer))
        plan = plan_training(cfg.train, len(train_rows), len(eval_rows), ctx.get_world_size(), step_s)
    apply_plan(trainer.args, plan)
    plan_keeper.plan = plan
    if ctx.get_world_rank() == 0:
        print(f"[plan] training: {plan.describe()}", flush=True)
    trainer = prepare_trainer(trainer)
    if checkpoint:
        with checkpoint.as_directory() as d:
            print(f"[train] resuming from {d}", flush=True)
            output = trainer.train(resume_from_checkpoint=os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME))
    else:
        output = trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)  # Ray Train holds the checkpoints that count
    # Throughput and final loss, reported by every worker (a report is collective) without a checkpoint.
    ray.train.report(
        {
            **{f"final_{k}": v for k, v in output.metrics.items()},
            "final_median_step_s": step_times.median(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "plan": plan.to_dict(),
        }
    )


def _final_metrics_callback(path: Path):
    """Ray Train's Result keeps only metrics reported with a checkpoint; the end-of-training report (throughput,
    final loss) has none, so the controller writes it to the run folder as it arrives."""
    from ray.train import UserCallback

    class FinalMetrics(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            final = next((m for m in metrics if m and "final_train_runtime" in m), None)
            if final:
                # the node of each rank, in rank order: where the run actually ran
                final = {
                    **{k: v for k, v in final.items() if k != "node_id"},
                    "worker_nodes": [(m or {}).get("node_id") for m in metrics],
                }
                path.write_text(json.dumps(final, indent=2))

    return FinalMetrics()


def cpus_per_worker(t) -> float:
    """The configured CPUs per training worker, or: 1 beside a GPU; else the cluster's CPUs shared out evenly,
    capped at the largest node's, so that each worker's torch gets as many threads as it can use."""
    if t.cpus_per_worker is not None:
        return t.cpus_per_worker
    if t.use_gpu:
        return 1.0
    import ray

    per_node = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = sum(per_node)
    return float(max(1, min(max(per_node, default=1), total // t.num_workers)))


def train(cfg: Config, run_dir: Path, prepared: Prepared) -> Path:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    uri = tracking.tracking_uri(cfg.run.mlflow_uri, cfg.run.runs_dir)
    env: dict[str, str] = {}
    try:
        run_id = tracking.start_run(uri, cfg.run.experiment, cfg.run.name, cfg.to_dict(), run_dir)
        env = tracking.worker_env(uri, cfg.run.experiment, run_id)
        log.info("MLflow run %s at %s", run_id, uri)
    except Exception as e:  # tracking must not cost a training run
        log.warning("MLflow tracking off: %s", e)

    t = cfg.train
    cpus = cpus_per_worker(t)
    log.info("%d training worker(s), %g CPU(s) each%s", t.num_workers, cpus, ", 1 GPU each" if t.use_gpu else "")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "env": env, "labels": list(prepared.fmt.labels)},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            placement_strategy=t.placement_strategy,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if t.use_gpu else {})},
        ),
        datasets=prepared.datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(
            name="ray_train",
            storage_path=storage_path(cfg, run_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.checkpoints_to_keep, checkpoint_score_attribute="eval_loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=[_final_metrics_callback(run_dir / "train_output.json")],
        ),
    )
    started = time.time()
    result = trainer.fit()
    elapsed = time.time() - started
    if result.error:
        raise result.error
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if "eval_loss" in m]
    if not scored:
        raise RuntimeError("training reported no checkpoint with an eval loss (is save_steps <= the run's steps?)")
    best, metrics = min(scored, key=lambda cm: cm[1]["eval_loss"])
    pooling = get_kind(cfg.model.model_kind).pooling(resolve_model(cfg.model.model, cfg.model.model_cache_dir))
    log.info("best checkpoint %s: step %s, eval_loss %.4f", best.path, metrics.get("step"), metrics["eval_loss"])
    with best.as_directory() as d:
        adapter = save_adapter(
            Path(d) / "checkpoint",
            run_dir / "adapter",
            base_model=cfg.model.model,
            fmt=prepared.fmt,
            extra={
                "eval_loss": metrics["eval_loss"],
                "step": metrics.get("step"),
                "label_field": cfg.data.label_field,
                "run": cfg.run.name,
                "model_kind": cfg.model.model_kind,
                **({"pooling": pooling} if pooling else {}),
            },
        )
    final_file = run_dir / "train_output.json"
    final = json.loads(final_file.read_text()) if final_file.exists() else {}
    summary = {
        "best_step": metrics.get("step"),
        "best_eval_loss": metrics["eval_loss"],
        "train_wall_s": round(elapsed, 1),
        **final,
    }
    (run_dir / "train_metrics.json").write_text(json.dumps(summary, indent=2))
    plan = final.get("plan") or {}
    estimate = plan.get("estimate_s")
    say(
        f"[plan] trained {plan.get('steps', '?')} steps in {elapsed / 60:.1f} min (Ray Train start and checkpoints "
        f"included)"
        + (f"; estimated {estimate / 60:.1f} min" if estimate else "")
        + f"; kept step {metrics.get('step')} (lowest validation loss {metrics['eval_loss']:.4f})",
        flush=True,
    )
    if env:
        tracking.log_metrics(uri, run_dir, {"best_eval_loss": metrics["eval_loss"]})
    log.info("adapter saved to %s; training: %s", adapter, json.dumps(summary))
    return adapter


@exit_on_data_error
def main(argv=None) -> None:
    setup_logging()
    cfg = parse_args(argv, description=__doc__)
    splits = load_splits(cfg.data)  # bad data stops here, before the run folder is touched
    run_dir = start_run(cfg, splits, trains=True)
    adapter = train(cfg, run_dir, prepare(cfg, run_dir, splits))
    sync_run(cfg, run_dir)
    say(f"adapter: {adapter}")


if __name__ == "__main__":
    main()
