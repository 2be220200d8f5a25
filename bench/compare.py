"""Benchmark, not a test: the model kinds (every registered one by default) side by side on the same data, in one run.

    python -m bench.compare [--smoke] [--kinds encoder,decoder-head] [--out runs/compare.md] [--key value ...]

For each kind: the whole pipeline with that kind's defaults (prepare, Ray Train, export, Ray Data + vLLM evaluation),
then the run's merged model served by the Serve app (serve_app/config.yaml's settings, one replica, `make serve`'s
serving environment) under bench.serve_compare's closed-loop load, through the direct ingress and through the proxy.
Writes runs/compare.md and compare.json with macro-F1, accuracy, training wall time, evaluation prompts/s, served req/s
and latency percentiles. `--smoke` takes configs/smoke.yaml and a short load (a plumbing check, not a measurement);
other `--key value` flags go to both runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.serve_compare import result_path
from ray_jobs.common import setup_logging
from ray_jobs.pipeline import run_pipeline
from textclf import kinds
from textclf.config import PROJECT_ROOT, config_overrides, load_config

SMOKE_CONFIG = PROJECT_ROOT / "configs" / "smoke.yaml"


def serve_and_measure(run_dir: Path, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    """The run's merged model served by the Serve app (serve_app/config.yaml's settings, one replica) in a local Ray
    with the serving environment of `make serve`, loaded by the shared load tester: bench.serve_compare, through the
    replica's own port (direct ingress) and through the Serve proxy. The pipeline's Ray is shut down first, so the
    served figure has the cores to itself."""
    import ray

    ray.shutdown()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.serve_compare",
            "--model",
            str(run_dir),
            "--only",
            "ingress,ingress_via_proxy",
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
        ],
        cwd=PROJECT_ROOT,
        check=True,
    )
    return json.loads(result_path(str(run_dir)).read_text())


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("model", lambda r: f"`{r['model']}`"),
        ("test macro-F1", lambda r: f"{r['macro_f1']:.4f}"),
        ("test accuracy", lambda r: f"{r['accuracy']:.4f}"),
        ("test rows", lambda r: str(r["n"])),
        ("training wall time (s)", lambda r: f"{r['timings']['train_s']:.0f}"),
        ("evaluation prompts/s (engine start included)", lambda r: f"{r['prompts_per_second']:.1f}"),
        ("served req/s, direct ingress", lambda r: f"{r['served']['ingress']['rps']:.1f}"),
        (
            "served p50 / p99 latency (ms), direct ingress",
            lambda r: f"{r['served']['ingress']['p50_ms']:.0f} / {r['served']['ingress']['p99_ms']:.0f}",
        ),
        ("served req/s, through the Serve proxy", lambda r: f"{r['served']['ingress_via_proxy']['rps']:.1f}"),
        (
            "served p50 / p99 latency (ms), proxy",
            lambda r: (
                f"{r['served']['ingress_via_proxy']['p50_ms']:.0f} / {r['served']['ingress_via_proxy']['p99_ms']:.0f}"
            ),
        ),
        ("pipeline total (s)", lambda r: f"{r['timings']['total_s']:.0f}"),
    ]
    columns = list(results)
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(fmt(results[k]) for k in columns) + " |" for name, fmt in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="configs/smoke.yaml and a short load: a plumbing check")
    ap.add_argument("--kinds", default=",".join(kinds.names()), help="comma-separated (default: every registered kind)")
    ap.add_argument("--out", default=None, help="default: <runs-dir>/compare.md")
    ap.add_argument("--duration", type=float, default=None, help="served load: measured seconds (default 20; smoke 5)")
    ap.add_argument("--concurrency", type=int, default=48, help="served load: concurrent requests (closed loop)")
    args, rest = ap.parse_known_args(argv)
    setup_logging()
    overrides = config_overrides(ap, rest)  # for both runs
    duration = args.duration or (5.0 if args.smoke else 20.0)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    for kind in args.kinds.split(","):
        cfg = load_config(
            str(SMOKE_CONFIG) if args.smoke else None,
            {**overrides, "model_kind": kind, "name": f"compare-{kind}-{stamp}"},
        )
        run_dir, summary = run_pipeline(cfg)
        summary.update(
            model=cfg.model.model,
            run=str(run_dir),
            served=serve_and_measure(run_dir, args.concurrency, duration, 2.0 if args.smoke else 5.0),
        )
        results[kind] = summary
        print(f"[compare] {kind}: {json.dumps(summary)}", flush=True)
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / "compare.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    note = (
        "smoke settings (configs/smoke.yaml): a plumbing check, not a measurement"
        if args.smoke
        else "each kind's defaults on the bundled CLINC150 10-domain data"
    )
    text = (
        f"# Model kinds side by side ({time.strftime('%Y-%m-%d %H:%M')}, one run on this machine)\n\n"
        f"{note}; served: serve_app/config.yaml's settings, one replica, `make serve`'s serving environment, "
        f"bench.serve_compare's closed loop at {args.concurrency} concurrent for {duration:.0f} s (after a warm-up), "
        f"the load client on the same machine.\n\n"
        f"{table(results)}\n"
    )
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
