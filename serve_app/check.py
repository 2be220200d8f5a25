"""Check a running server against the evaluation job, and time it.

    python -m serve_app.check --url http://127.0.0.1:8000 --run runs/<name> [--model NAME]
        [--requests 200 --concurrency 16]

Agreement: every text of the run's test split (predictions.jsonl, written by the evaluation job) goes through
POST /classify/batch; the served labels are compared with the evaluated ones. Then single-request latency
(sequential) and throughput (concurrent POST /classify) are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import httpx


def agreement(client: httpx.Client, run_dir: Path, batch: int = 32, model: Optional[str] = None) -> dict[str, Any]:
    preds = [
        json.loads(line) for line in (Path(run_dir) / "predictions.jsonl").read_text().splitlines() if line.strip()
    ]
    served: list[dict[str, Any]] = []
    for i in range(0, len(preds), batch):
        # threshold 0: compare labels, not where the server's threshold differs from the evaluation's
        body: dict[str, Any] = {"texts": [p["text"] for p in preds[i : i + batch]], "abstain_threshold": 0.0}
        if model:
            body["model"] = model
        r = client.post("/classify/batch", json=body)
        r.raise_for_status()
        served.extend(r.json())
    agree = sum(s["label"] == p["predicted"] for s, p in zip(served, preds))
    diffs = [abs(s["confidence"] - p["probability"]) for s, p in zip(served, preds) if s["label"] == p["predicted"]]
    return {
        "n": len(preds),
        "agree": agree,
        "rate": agree / len(preds) if preds else 0.0,
        "max_prob_diff": max(diffs, default=0.0),
        "disagreements": [
            {"text": p["text"], "evaluated": p["predicted"], "served": s["label"]}
            for s, p in zip(served, preds)
            if s["label"] != p["predicted"]
        ][:10],
    }


async def load(url: str, texts: list[str], n: int, concurrency: int, model: Optional[str]) -> dict[str, float]:
    lat: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:

        async def one(i: int):
            body: dict[str, Any] = {"text": texts[i % len(texts)]}
            if model:
                body["model"] = model
            async with sem:
                t0 = time.perf_counter()
                r = await c.post("/classify", json=body)
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": n,
        "concurrency": concurrency,
        "req_per_s": n / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p95_ms": 1000 * lat[int(len(lat) * 0.95) - 1],
        "p99_ms": 1000 * lat[max(0, int(len(lat) * 0.99) - 1)],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--run", required=True, help="run folder with predictions.jsonl")
    ap.add_argument("--model", default=None, help="classifier name (default: the server's default)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args(argv)
    with httpx.Client(base_url=a.url, timeout=300) as client:
        res = agreement(client, Path(a.run), a.batch, a.model)
        print(
            f"agreement: {res['agree']}/{res['n']} = {res['rate']:.2%} identical labels "
            f"(max |probability diff| on agreeing rows {res['max_prob_diff']:.4f})"
        )
        for d in res["disagreements"]:
            print("  differs:", json.dumps(d))
        texts = [
            json.loads(line)["text"]
            for line in (Path(a.run) / "predictions.jsonl").read_text().splitlines()
            if line.strip()
        ]
        seq = []
        for t in texts[:20]:
            t0 = time.perf_counter()
            client.post("/classify", json={"text": t, **({"model": a.model} if a.model else {})}).raise_for_status()
            seq.append(1000 * (time.perf_counter() - t0))
        print(f"sequential /classify: median {statistics.median(seq):.1f} ms, min {min(seq):.1f} ms over {len(seq)}")
    if a.requests:
        r = asyncio.run(load(a.url, texts, a.requests, a.concurrency, a.model))
        print(
            f"concurrent /classify: {r['req_per_s']:.1f} req/s at concurrency {r['concurrency']} "
            f"(p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, {r['requests']} requests)"
        )


if __name__ == "__main__":
    main()
