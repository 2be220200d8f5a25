"""Load tester for the classification service (and, for comparisons, vLLM's own OpenAI-compatible server).

    python -m bench.loadtest --url http://127.0.0.1:8000 --concurrency 48 --duration 20      # closed loop
    python -m bench.loadtest --rate 300 --duration 20 --requests 6000                         # open loop
    make loadtest URL=http://127.0.0.1:8000 ARGS="--rate 300"

Closed loop: `--concurrency` clients, each sending its next request when the last one is answered. Open loop:
requests start at `--rate` per second whatever the server does (latency counts from the planned start, so a
slow server cannot hide its queue). Both stop at `--duration` seconds or `--requests` requests, whichever comes
first, after `--warmup` seconds that are not recorded. Texts are the bundled test split's, in a fixed shuffled
order. Writes a JSON result and a PNG (latency and throughput over time); prints progress once a second.

The client is kept cheap, since on a small machine it shares the CPUs with the server: one process, aiohttp on
uvloop, request bodies encoded before the clock starts. Its own CPU time is measured and reported, and so is every
process's on the machine, by role (bench.cpu_share): where the CPU per request went, i.e. what limits the server.
`--api openai` sends the same one-step classification to a vLLM OpenAI-compatible server (/v1/completions with the
classifier's prompt, max_tokens 1 and the labels' first tokens in `logprob_token_ids`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from bench import cpu_share

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------
# what is sent, and how an answer's label is read


@dataclass
class Target:
    url: str  # full URL of the endpoint
    bodies: list[bytes]  # encoded request bodies, one per text
    label_of: Callable[[Any], Optional[str]]  # answer JSON -> predicted label


def test_texts(limit: Optional[int] = None, seed: int = 0) -> list[str]:
    """The bundled test split's texts (the run configuration's test file), shuffled reproducibly."""
    from textclf.config import load_config, resolve_path
    from textclf.data import read_jsonl

    cfg = load_config().data
    texts = [ex.text for ex in read_jsonl(resolve_path(cfg.test_file), cfg.text_field, cfg.label_field)]
    random.Random(seed).shuffle(texts)
    return texts[:limit] if limit else texts


def textclf_target(base_url: str, texts: list[str], path: str = "/classify") -> Target:
    return Target(
        base_url.rstrip("/") + path, [json.dumps({"text": t}).encode() for t in texts], lambda body: body.get("label")
    )


def openai_target(base_url: str, texts: list[str], classifier_dir: str, model_name: str) -> Target:
    """The same one-step scoring as textclf.inference.sampling_params, through the completions API: the prompt
    string of textclf.prompts (tokenized by the server, as our ingress tokenizes), one token, the labels' first
    tokens' log-probabilities."""
    from transformers import AutoTokenizer

    from textclf.export import prompt_format, read_meta
    from textclf.inference import scoring_plan

    fmt = prompt_format(read_meta(Path(classifier_dir)))
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    plan = scoring_plan(fmt, tok)
    if not plan.one_step:
        raise SystemExit("--api openai needs labels whose first tokens differ (one-step scoring)")
    ids = list(plan.first_token_ids)
    by_token = {tok.convert_ids_to_tokens(i): label for i, label in zip(ids, plan.labels)}
    bodies = [
        json.dumps(
            {
                "model": model_name,
                "prompt": fmt.prompt(tok, t),
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": len(ids),
                "logprob_token_ids": ids,
                "add_special_tokens": False,
                "seed": 0,
            }
        ).encode()
        for t in texts
    ]

    def label_of(body: dict) -> Optional[str]:
        top = ((body.get("choices") or [{}])[0].get("logprobs") or {}).get("top_logprobs") or [{}]
        scores = {by_token[k]: v for k, v in (top[0] or {}).items() if k in by_token}
        return max(scores, key=scores.get) if scores else None

    return Target(base_url.rstrip("/") + "/v1/completions", bodies, label_of)


def vllm_classify_target(base_url: str, texts: list[str], model_name: str) -> Target:
    """vLLM's own classification endpoint (a server with the pooling runner on an encoder classifier): the server
    tokenizes the text, the label is the model config's id2label name of the top class."""
    bodies = [json.dumps({"model": model_name, "input": t}).encode() for t in texts]
    return Target(base_url.rstrip("/") + "/classify", bodies, lambda body: ((body.get("data") or [{}])[0]).get("label"))


# ---------------------------------------------------------------------------------------------------------------
# the load


@dataclass
class Record:
    start: list[float] = field(default_factory=list)  # seconds since the measured phase began
    latency: list[float] = field(default_factory=list)  # seconds
    status: list[str] = field(default_factory=list)  # "200", "503", "ClientConnectorError", ...
    labels: Counter = field(default_factory=Counter)
    cpu_by_process: dict = field(default_factory=dict)  # bench.cpu_share.shares over the measured phase


async def _send(session, target: Target, i: int, t_planned: float, t0: float, rec: Optional[Record]) -> None:
    body = target.bodies[i % len(target.bodies)]
    label = None
    try:
        async with session.post(target.url, data=body, headers={"Content-Type": "application/json"}) as resp:
            raw = await resp.read()
            status = str(resp.status)
            if resp.status == 200 and rec is not None:
                label = target.label_of(json.loads(raw))
    except Exception as exc:  # connection refused/reset, timeout: counted by kind, never fatal
        status = type(exc).__name__
    if rec is not None:
        now = time.perf_counter()
        rec.start.append(t_planned - t0)
        rec.latency.append(now - t_planned)
        rec.status.append(status)
        if label is not None:
            rec.labels[label] += 1


async def _closed(session, target, concurrency, t_end, max_requests, t0, rec, counter) -> None:
    async def client():
        while True:
            i = next(counter)
            now = time.perf_counter()
            if now >= t_end or (max_requests and i >= max_requests):
                return
            await _send(session, target, i, now, t0, rec)

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def _open(session, target, rate, t_end, max_requests, t0, rec, counter, poisson: bool, rng) -> None:
    tasks = set()
    t_next = time.perf_counter()
    while True:
        i = next(counter)
        if t_next >= t_end or (max_requests and i >= max_requests):
            break
        delay = t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(_send(session, target, i, t_next, t0, rec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        t_next += rng.expovariate(rate) if poisson else 1.0 / rate
    if tasks:
        await asyncio.gather(*tasks)


async def _progress(rec: Record, t0: float, every: float, stop: asyncio.Event) -> None:
    seen = 0
    tty = sys.stderr.isatty()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
        n = len(rec.latency)
        recent = rec.latency[seen:n]
        errs = sum(s != "200" for s in rec.status)
        p50 = np.percentile(recent, 50) * 1000 if recent else float("nan")
        p99 = np.percentile(recent, 99) * 1000 if recent else float("nan")
        line = (
            f"[{time.perf_counter() - t0:6.1f}s] {n:7d} done  {len(recent) / every:7.1f} req/s  "
            f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  errors {errs}"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        seen = n
    if tty:
        print(file=sys.stderr)


async def run_load(
    target: Target,
    *,
    concurrency: int = 0,
    rate: float = 0.0,
    duration: float = 20.0,
    requests: int = 0,
    warmup: float = 0.0,
    timeout: float = 30.0,
    poisson: bool = False,
    progress: float = 1.0,
    seed: int = 0,
) -> tuple[Record, float, float]:
    """Run the load; returns (records, measured wall seconds, client CPU seconds during the measured phase)."""
    import itertools

    import aiohttp

    conns = concurrency if concurrency else 0  # open loop: as many connections as requests in flight
    connector = aiohttp.TCPConnector(limit=conns, force_close=False, enable_cleanup_closed=False)
    rng = random.Random(seed)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), skip_auto_headers=("User-Agent",)
    ) as session:
        counter = itertools.count()

        async def phase(seconds: float, rec: Optional[Record], max_requests: int, t0: float):
            t_end = time.perf_counter() + seconds
            if concurrency:
                await _closed(session, target, concurrency, t_end, max_requests, t0, rec, counter)
            else:
                await _open(session, target, rate, t_end, max_requests, t0, rec, counter, poisson, rng)

        if warmup > 0:
            await phase(warmup, None, 0, time.perf_counter())
        rec = Record()
        counter = itertools.count()
        stop = asyncio.Event()
        procs0 = cpu_share.snapshot()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        shower = asyncio.ensure_future(_progress(rec, t0, progress, stop)) if progress > 0 else None
        await phase(duration, rec, requests, t0)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        rec.cpu_by_process = cpu_share.shares(procs0, cpu_share.snapshot(), wall, rec.status.count("200"))
        stop.set()
        if shower:
            await shower
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return rec, wall, cpu


# ---------------------------------------------------------------------------------------------------------------
# results


def summarize(rec: Record, wall: float, cpu: float) -> dict[str, Any]:
    status = np.array(rec.status)
    lat = np.array(rec.latency) * 1000
    ok = lat[status == "200"] if len(lat) else lat

    def pct(q):
        return round(float(np.percentile(ok, q)), 2) if len(ok) else None

    return {
        "requests": len(lat),
        "ok": int(len(ok)),
        "errors": int(len(lat) - len(ok)),
        "errors_by_status": dict(Counter(s for s in rec.status if s != "200")),
        "wall_s": round(wall, 3),
        "rps": round(len(ok) / wall, 2) if wall > 0 else 0.0,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": round(float(ok.max()), 2) if len(ok) else None,
        "mean_ms": round(float(ok.mean()), 2) if len(ok) else None,
        "labels": dict(rec.labels.most_common()),
        "client_cpu_s": round(cpu, 2),
        "client_cpu_pct_of_core": round(100 * cpu / wall, 1) if wall > 0 else None,
        "cpu_by_process": rec.cpu_by_process,
    }


def timeline(rec: Record, bucket: float = 1.0) -> dict[str, list]:
    """Per-second completed requests and latency percentiles (by completion time)."""
    if not rec.latency:
        return {"t": [], "rps": [], "p50_ms": [], "p99_ms": [], "errors": []}
    done = np.array(rec.start) + np.array(rec.latency)
    lat = np.array(rec.latency) * 1000
    err = np.array([s != "200" for s in rec.status])
    n = int(math.ceil(done.max() / bucket)) or 1
    idx = np.minimum((done / bucket).astype(int), n - 1)
    out = {"t": [], "rps": [], "p50_ms": [], "p99_ms": [], "errors": []}
    for b in range(n):
        m = idx == b
        good = lat[m & ~err]
        out["t"].append(round((b + 0.5) * bucket, 2))
        out["rps"].append(round(float((m & ~err).sum()) / bucket, 1))
        out["p50_ms"].append(round(float(np.percentile(good, 50)), 2) if len(good) else None)
        out["p99_ms"].append(round(float(np.percentile(good, 99)), 2) if len(good) else None)
        out["errors"].append(int((m & err).sum()))
    return out


def plot(rec: Record, series: dict[str, list], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    done = np.array(rec.start) + np.array(rec.latency)
    ax1.scatter(done, np.array(rec.latency) * 1000, s=1, alpha=0.25, color="0.6", label="requests")
    nan = lambda xs: [np.nan if x is None else x for x in xs]  # noqa: E731
    ax1.plot(series["t"], nan(series["p50_ms"]), label="p50")
    ax1.plot(series["t"], nan(series["p99_ms"]), label="p99")
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right")
    ax2.plot(series["t"], series["rps"], label="ok req/s")
    if any(series["errors"]):
        ax2.plot(series["t"], series["errors"], color="red", label="errors/s")
    ax2.set_ylabel("requests/s")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measure(
    target: Target, name: str = "loadtest", out_dir: Optional[Path] = None, plot_png: bool = True, **load
) -> dict[str, Any]:
    """Run a load and return its summary (+ timeline); writes <out_dir>/<name>.json and .png when out_dir is set."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    rec, wall, cpu = runner(run_load(target, **load))
    result = {
        "name": name,
        "url": target.url,
        "load": {k: v for k, v in load.items() if k != "progress"},
        **summarize(rec, wall, cpu),
        "timeline": timeline(rec),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
        if plot_png and rec.latency:
            mode = (
                f"{load.get('concurrency')} concurrent"
                if load.get("concurrency")
                else f"{load.get('rate')} req/s offered"
            )
            plot(
                rec,
                result["timeline"],
                f"{name}: {target.url}, {mode}: {result['rps']} req/s, p99 {result['p99_ms']} ms",
                out_dir / f"{name}.png",
            )
    return result


def print_summary(r: dict[str, Any]) -> None:
    print(f"{r['url']}: {r['requests']} requests in {r['wall_s']} s")
    print(
        f"  req/s {r['rps']}   p50 {r['p50_ms']} ms   p90 {r['p90_ms']} ms   p99 {r['p99_ms']} ms   "
        f"max {r['max_ms']} ms"
    )
    print(
        f"  errors {r['errors']} {r['errors_by_status'] or ''}   client CPU {r['client_cpu_pct_of_core']} % of a core"
    )
    print("  labels: " + ", ".join(f"{k} {v}" for k, v in r["labels"].items()))
    if r.get("cpu_by_process"):
        print("  CPU by process over the measured phase (every process on this machine):")
        print("  " + cpu_share.table(r["cpu_by_process"]).replace("\n", "\n  "))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    load = ap.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: clients in flight (default 32)")
    load.add_argument("--rate", type=float, default=None, help="open loop: requests started per second")
    ap.add_argument("--poisson", action="store_true", help="open loop: exponential gaps instead of even ones")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured (after the warm-up)")
    ap.add_argument("--requests", type=int, default=0, help="stop after this many requests (0: duration only)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unrecorded load first")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    ap.add_argument("--api", choices=("textclf", "openai"), default="textclf")
    ap.add_argument("--classifier-dir", help="--api openai: the classifier folder (classifier.json + tokenizer)")
    ap.add_argument("--served-model", default="clf", help="--api openai: the model name the server serves")
    ap.add_argument("--progress", type=float, default=1.0, help="seconds between progress lines (0: none)")
    ap.add_argument("--name", default="loadtest", help="result file name (without extension)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for <name>.json and <name>.png")
    args = ap.parse_args(argv)
    texts = test_texts()
    if args.api == "openai":
        if not args.classifier_dir:
            ap.error("--api openai needs --classifier-dir")
        target = openai_target(args.url, texts, args.classifier_dir, args.served_model)
    else:
        target = textclf_target(args.url, texts)
    concurrency = 0 if args.rate else (args.concurrency or 32)
    r = measure(
        target,
        args.name,
        Path(args.out),
        concurrency=concurrency,
        rate=args.rate or 0.0,
        duration=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        timeout=args.timeout,
        poisson=args.poisson,
        progress=args.progress,
    )
    print_summary(r)
    print(f"  wrote {Path(args.out) / args.name}.json and .png")
    if r["ok"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
