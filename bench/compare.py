"""Benchmark, not a test: the generative and the encoder kind side by side on the same data, in one run.

    python -m bench.compare [--smoke] [--kinds generative,encoder] [--out runs/compare.md] [--key value ...]

For each kind: the whole pipeline with that kind's defaults (prepare, Ray Train, export, Ray Data + vLLM evaluation),
then the run's merged model served by the Serve app (serve_app/config.yaml's settings, one replica, on a free
loopback port of the same local Ray) and a closed-loop load through the ingress. Writes runs/compare.md and compare.json with macro-F1,
accuracy, training wall time, evaluation prompts/s, served req/s and latency percentiles. `--smoke` takes
configs/smoke.yaml and a short load (a plumbing check, not a measurement); other `--key value` flags go to both runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

from ray_jobs.common import setup_logging
from ray_jobs.pipeline import run_pipeline
from textclf.config import PROJECT_ROOT, load_config

SMOKE_CONFIG = PROJECT_ROOT / "configs" / "smoke.yaml"
# One replica, so that a second one starting on a saturated 2-core node (over a minute) is not part of the figure.
ONE_REPLICA = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16}


def served_throughput(url: str, texts: list[str], requests: int, concurrency: int, warmup: int = 50) -> dict[str, float]:
    """Closed loop: `concurrency` clients, each sending its next POST /classify when the last one is answered.
    The one place compare measures serving (swap in the shared load tester here)."""
    from serve_app.check import load

    asyncio.run(load(url, texts, min(warmup, requests), min(concurrency, 8), None))
    return asyncio.run(load(url, texts, requests, concurrency, None))


def serve_and_measure(run_dir: Path, requests: int, concurrency: int) -> dict[str, Any]:
    """Serve the run's merged model (serve_app/config.yaml's settings, one replica) on this process's Ray and load it
    through the ingress; Serve is shut down after."""
    import httpx
    from ray import serve

    from serve_app.app import app_from_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        t0 = time.time()
        serve.run(app_from_config(run=str(run_dir), deployment_overrides={"autoscaling_config": ONE_REPLICA}),
                  name="textclf", route_prefix="/")
        start_s = time.time() - t0
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/ready").json()["ready"]
        texts = [json.loads(l)["text"] for l in (run_dir / "predictions.jsonl").read_text().splitlines() if l.strip()]
        return {"serve_start_s": round(start_s, 1), **served_throughput(url, texts, requests, concurrency)}
    finally:
        serve.shutdown()


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("model", lambda r: f"`{r['model']}`"),
        ("test macro-F1", lambda r: f"{r['macro_f1']:.4f}"),
        ("test accuracy", lambda r: f"{r['accuracy']:.4f}"),
        ("test rows", lambda r: str(r["n"])),
        ("training wall time (s)", lambda r: f"{r['timings']['train_s']:.0f}"),
        ("evaluation prompts/s (engine start included)", lambda r: f"{r['prompts_per_second']:.1f}"),
        ("served req/s through the ingress", lambda r: f"{r['served']['req_per_s']:.1f}"),
        ("served p50 / p99 latency (ms)", lambda r: f"{r['served']['p50_ms']:.0f} / {r['served']['p99_ms']:.0f}"),
        ("pipeline total (s)", lambda r: f"{r['timings']['total_s']:.0f}"),
    ]
    kinds = list(results)
    lines = ["| | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    lines += [f"| {name} | " + " | ".join(fmt(results[k]) for k in kinds) + " |" for name, fmt in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="configs/smoke.yaml and a short load: a plumbing check")
    ap.add_argument("--kinds", default="generative,encoder")
    ap.add_argument("--out", default=None, help="default: <runs-dir>/compare.md")
    ap.add_argument("--requests", type=int, default=None, help="served load: requests (default 2000; smoke 100)")
    ap.add_argument("--concurrency", type=int, default=32)
    args, rest = ap.parse_known_args(argv)
    setup_logging()
    overrides: dict[str, Any] = {}
    for i in range(0, len(rest), 2):  # --key value pairs for both runs
        if not rest[i].startswith("--") or i + 1 >= len(rest):
            ap.error(f"expected --key value pairs, got {rest[i:]}")
        overrides[rest[i][2:]] = rest[i + 1]
    requests = args.requests or (100 if args.smoke else 2000)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    for kind in args.kinds.split(","):
        cfg = load_config(str(SMOKE_CONFIG) if args.smoke else None,
                          {**overrides, "model_kind": kind, "name": f"compare-{kind}-{stamp}"})
        run_dir, summary = run_pipeline(cfg)
        summary.update(model=cfg.model.model, run=str(run_dir),
                       served=serve_and_measure(run_dir, requests, args.concurrency))
        results[kind] = summary
        print(f"[compare] {kind}: {json.dumps(summary)}", flush=True)
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / "compare.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    note = ("smoke settings (configs/smoke.yaml): a plumbing check, not a measurement" if args.smoke
            else "each kind's defaults on the bundled CLINC150 10-domain data")
    text = (f"# Generative vs encoder classifier ({time.strftime('%Y-%m-%d %H:%M')}, one run on this machine)\n\n"
            f"{note}; served: serve_app/config.yaml's settings, one replica, through the Serve ingress, closed loop, "
            f"{requests} requests at concurrency {args.concurrency}, the load client on the same machine.\n\n"
            f"{table(results)}\n")
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
