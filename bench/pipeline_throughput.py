"""Benchmark, not a test: what Ray costs in training and evaluation, how fast engines start, and the training's
model FLOPs utilisation, for each model kind, measured side by side in one run and repeated (median and spread).

    python -m bench.pipeline_throughput [--kinds generative,encoder] [--repeats 3] [--steps encoder=40] [--batch 16]

Per kind and repeat, on the bundled data (or --train-file/--test-file), with each kind's default model:
1. Training: the Ray Train job (one worker holding all the machine's CPUs) against the same kind's trainer in this
   process (torch on the same number of threads), same rows, steps and global batch; the Ray job runs first in odd
   repeats and second in even ones (Ray / plain came out ~10% higher with Ray first: bench/results/train-order.md).
   Reported: the median optimizer step (textclf.training.StepTimes: forward, backward, update), the examples/s of
   the whole train() (its evaluation and checkpoint included), tokens/s (the rows' tokens, no padding) and MFU: the
   FLOPs of a real training step, counted by torch.utils.flop_counter (so LoRA's frozen weights and prefix sharing
   count as what they compute), per second of median step, over the fp32 matmul peak of this machine measured in the
   same repeat.
2. Evaluation: the Ray Data + vLLM job against vLLM offline in a fresh process on the same prompts (validation and
   test), both from their start to the last answer (process and engine start included), in the training's order.
3. Engine start, process start to first answer: the evaluation's (offline, a fresh process) and the Serve app's
   (serve.run of one replica to its first /classify answer), with the app's engine in a process of its own (the
   default, forked from a server that preloads vLLM: engine.preload), spawned as vLLM does (preload false), and
   inside the replica (engine.process inline).
Writes bench/results/pipeline.json and bench/results/pipeline.md (the table it prints).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ray_jobs.common import init_ray, setup_logging, start_run
from ray_jobs.evaluate import evaluate, read_validation
from ray_jobs.export import export
from ray_jobs.prepare import prepare, read_split
from ray_jobs.train import train
from textclf.config import load_config
from textclf.sources import load_splits

RESULTS = Path("bench/results")
DEFAULT_STEPS = 10
STEPS = {"encoder": 40}  # its steps are ~15x shorter; 10 of them (~2-3 s) left the Ray / plain ratio to the noise


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="generative,encoder", help="comma-separated model kinds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--steps",
        default="",
        help=f"optimizer steps per training: N for every kind, or kind=N,... (default {STEPS}, else "
        f"{DEFAULT_STEPS}: about as many seconds of steps for each kind)",
    )
    ap.add_argument("--batch", type=int, default=16, help="global batch (examples per optimizer step)")
    ap.add_argument("--eval-examples", type=int, default=300, help="a stratified subset of the test split")
    ap.add_argument("--train-file", default=None)
    ap.add_argument("--test-file", default=None)
    ap.add_argument("--runs-dir", default="runs/bench")
    return ap.parse_args(argv)


def steps_for(kind: str, spec: str) -> int:
    """Optimizer steps for `kind` from --steps ("", "N" or "kind=N,...")."""
    if spec.strip().isdigit():
        return int(spec)
    given = dict(item.split("=", 1) for item in spec.split(",") if item.strip())
    return int(given.get(kind, STEPS.get(kind, DEFAULT_STEPS)))


def cpu_model() -> str:
    """The CPU's model name (benchmarks from different machines differ by ~2x here)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def matmul_peak_gflops(threads: int, n: int = 2048, seconds: float = 3.0) -> float:
    """This machine's fp32 matmul rate on `threads` threads (the best of repeated n x n products)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best / 1e9


def step_flops_and_tokens(trainer) -> tuple[float, float]:
    """(FLOPs, tokens) of one real training step (forward and backward) on the trainer's first batch; the
    gradients are dropped."""
    from torch.utils.flop_counter import FlopCounterMode

    from textclf.training import training_step

    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with FlopCounterMode(display=False) as counter:
        training_step(trainer, inputs)
    trainer.model.zero_grad(set_to_none=True)
    tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
    return float(counter.get_total_flops()), float(tokens)


def train_both(cfg, run_dir: Path, prepared, peak_gflops: float, ray_first: bool) -> dict[str, Any]:
    """The Ray Train job and the same kind's trainer in this process on the same rows and settings, in that order
    or the other."""
    import torch

    from textclf.kinds import get_kind
    from textclf.models import resolve_model
    from textclf.training import StepTimes, measure_step_seconds

    if ray_first:
        train(cfg, run_dir, prepared)
    rows = {k: list(ds.iter_rows()) for k, ds in prepared.datasets.items()}
    timer = StepTimes()
    trainer = get_kind(cfg.model.model_kind).build_trainer(
        cfg,
        resolve_model(cfg.model.model, cfg.model.model_cache_dir),
        rows["train"],
        rows["validation"],
        str(run_dir / "plain_process"),
        labels=list(prepared.fmt.labels),
        callbacks=[timer],
    )
    measure_step_seconds(trainer)  # as the Ray Train worker does before planning (it also warms the step up)
    plain = trainer.train().metrics
    flops, tokens = step_flops_and_tokens(trainer)
    if not ray_first:
        train(cfg, run_dir, prepared)
    ray_side = json.loads((run_dir / "train_metrics.json").read_text())
    mean_row = statistics.fmean(len(r["input_ids"]) for r in rows["train"])
    tokens_per_step = mean_row * cfg.train.per_device_batch_size * cfg.train.num_workers
    flops_per_token = flops / tokens
    out = {
        "threads": torch.get_num_threads(),
        "ray_first": ray_first,
        "ray_step_s": ray_side["final_median_step_s"],
        "plain_step_s": timer.median(),
        "ray_examples_per_s": ray_side["final_train_samples_per_second"],
        "plain_examples_per_s": plain["train_samples_per_second"],
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token,
        "peak_gflops": peak_gflops,
    }
    for side in ("ray", "plain"):
        out[f"{side}_tokens_per_s"] = tokens_per_step / out[f"{side}_step_s"]
        out[f"{side}_mfu"] = flops_per_token * out[f"{side}_tokens_per_s"] / (peak_gflops * 1e9)
    return out


def in_fresh_process(args: list[str]) -> tuple[float, dict[str, Any]]:
    """Run `python -m bench.engine_start ARGS OUT`; (the moment it was started, what it wrote)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        started = time.time()
        subprocess.run([sys.executable, "-m", "bench.engine_start", *args, str(out)], check=True)
        return started, json.loads(out.read_text())


class _Noop:
    def __call__(self, batch):
        return batch


def warm_ray_data() -> None:
    """What prepare()'s tokenizer has started before the evaluation in a pipeline (Ray Data's helper actors)."""
    import ray

    ray.data.range(10).map_batches(_Noop, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5).take_all()


def evaluate_both(cfg, run_dir: Path, ray_first: bool) -> dict[str, Any]:
    """The Ray Data + vLLM evaluation job and vLLM offline in a fresh process on the same prompts, in that order or
    the other (the generative run's offline side ran faster right after the Ray job: bench/results/eval-actor-cost.md);
    then the Serve app's start."""
    import ray

    export(cfg, run_dir)
    texts = [ex.text for ex in read_validation(run_dir)] + [ex.text for ex in read_split(run_dir, "test")]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(texts, f)
        f.flush()
        if not ray_first:
            ray.shutdown()  # the offline engine gets the CPUs to itself either way
            started, offline = in_fresh_process(["offline", str(run_dir), f.name])
            init_ray(cfg)
            warm_ray_data()
        ray_eval = evaluate(cfg, run_dir)
        ray.shutdown()  # (and the Serve test starts a cluster of its own)
        if ray_first:
            started, offline = in_fresh_process(["offline", str(run_dir), f.name])
    job = [json.loads(line)["predicted"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    agree = sum(a == b for a, b in zip(offline["labels"][-len(job) :], job)) / len(job)
    offline_s = offline["done_at"] - started
    _, served = in_fresh_process(["serve", str(run_dir)])  # timed from its deployment, not its process start
    _, spawned = in_fresh_process(["serve", str(run_dir), "spawn"])
    _, inline = in_fresh_process(["serve", str(run_dir), "inline"])
    return {
        "n_prompts": len(texts),
        "ray_data_prompts_per_s": ray_eval["prompts_per_second"],
        "offline_prompts_per_s": len(texts) / offline_s,
        "eval_ray_extra_s": ray_eval["eval_seconds"] - offline_s,
        "same_labels": agree,
        "eval_engine_start_s": offline["first_answer_at"] - started,
        "serve_start_s": served["first_answer_at"] - served["deploy_at"],
        "serve_start_spawn_s": spawned["first_answer_at"] - spawned["deploy_at"],
        "serve_start_inline_s": inline["first_answer_at"] - inline["deploy_at"],
    }


def bench_kind(args: argparse.Namespace, kind: str, repeat: int) -> dict[str, Any]:
    steps = steps_for(kind, args.steps)
    overrides = dict(
        model_kind=kind,
        runs_dir=args.runs_dir,
        name=f"bench-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-r{repeat}",
        num_workers=1,
        cpus_per_worker=float(os.cpu_count() or 1),
        per_device_batch_size=args.batch,
        max_steps=steps,
        eval_steps=steps,
        save_steps=steps,
        max_eval_examples=args.eval_examples,
        **({"train_file": args.train_file} if args.train_file else {}),
        **({"test_file": args.test_file} if args.test_file else {}),
    )
    cfg = load_config(overrides=overrides)
    splits = load_splits(cfg.data)
    run_dir = start_run(cfg, splits, trains=True)
    prepared = prepare(cfg, run_dir, splits)
    peak = matmul_peak_gflops(os.cpu_count() or 1)
    ray_first = repeat % 2 == 0
    trained = train_both(cfg, run_dir, prepared, peak, ray_first)
    return {"model": cfg.model.model, "steps": steps, **trained, **evaluate_both(cfg, run_dir, ray_first)}


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """median [min–max]"""
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}–{fmt(max(values))}]"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    rows = [
        ("training step, s (median step)", "ray_step_s", "plain_step_s", "{:.2f}", "Ray / plain (goal <= 1.1)"),
        ("training examples/s (whole train())", "ray_examples_per_s", "plain_examples_per_s", "{:.2f}", "Ray / plain"),
        ("training tokens/s", "ray_tokens_per_s", "plain_tokens_per_s", "{:.0f}", "Ray / plain"),
        ("training MFU, % of fp32 matmul peak", "ray_mfu", "plain_mfu", "{:.1%}", ""),
        ("evaluation prompts/s, start included", "ray_data_prompts_per_s", "offline_prompts_per_s", "{:.1f}",
         "Ray Data / offline (goal >= 0.9)"),
    ]  # fmt: skip
    lines = ["| kind | measure | Ray | plain | ratio |", "|---|---|---:|---:|---:|"]
    for kind, runs in results.items():
        for label, ray_key, plain_key, f, ratio_label in rows:
            fmt = f.format
            ratio = spread([r[ray_key] / r[plain_key] for r in runs], "{:.2f}".format) if ratio_label else ""
            ray_v, plain_v = spread([r[ray_key] for r in runs], fmt), spread([r[plain_key] for r in runs], fmt)
            lines.append(f"| {kind} | {label} | {ray_v} | {plain_v} | {ratio} {ratio_label} |")
        for label, key in (
            ("evaluation, Ray Data's seconds over offline's", "eval_ray_extra_s"),
            ("engine start, evaluation (process start to first answer), s", "eval_engine_start_s"),
            ("engine start, serving (serve.run to first answer), s", "serve_start_s"),
            ("the same, engine process spawned as vLLM does (engine.preload false), s", "serve_start_spawn_s"),
            ("the same, engine inside the replica (engine.process inline), s", "serve_start_inline_s"),
            ("fp32 matmul peak, GFLOP/s", "peak_gflops"),
            ("same label, Ray Data job vs offline", "same_labels"),
        ):
            lines.append(f"| {kind} | {label} | {spread([r[key] for r in runs], '{:.3g}'.format)} | | |")
    return "\n".join(lines)


def write(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> str:
    """The table of the repeats done so far, printed and written (after every repeat: a failure keeps them)."""
    done = min(len(runs) for runs in results.values())
    text = table({kind: runs[:done] for kind, runs in results.items()})
    steps = ", ".join(f"{kind} {runs[0]['steps']}" for kind, runs in results.items())
    cpu = cpu_model()
    header = (
        f"{done} repeats, median [min–max], on {os.cpu_count()} cores of {cpu}; steps of global batch "
        f"{args.batch} ({steps}), one Ray Train worker with {os.cpu_count()} CPUs against one process on as many "
        f"threads, the Ray side (training and evaluation) first in odd repeats and second in even ones; "
        f"{results[next(iter(results))][0]['n_prompts']} evaluation prompts"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps({"args": vars(args), "cpu": cpu, "results": results}, indent=2))
    (RESULTS / "pipeline.md").write_text(f"# make bench\n\n{header}\n\n{text}\n")
    return f"\n{header}\n\n{text}\n\nwritten {RESULTS / 'pipeline.md'}"


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in args.kinds.split(",")}
    for repeat in range(args.repeats):
        for kind in results:
            results[kind].append(bench_kind(args, kind, repeat))
        summary = write(args, results)
    print(summary)


if __name__ == "__main__":
    main()
