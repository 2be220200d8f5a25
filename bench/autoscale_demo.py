"""Demo, not a test: Serve autoscaling under a load that goes up and down (a few minutes).

    python -m bench.autoscale_demo [--model tiny-random-llama] [--high 16] [--high-s 180] [--tail-s 50]
    make autoscale-demo

Starts the Serve app (serve_app/config.yaml; min 1, max 2 replicas of 1 CPU each, each engine on its own core
via cpu_binding "slot") in a local Ray with the serving environment, drives load through the Serve port (HAProxy
by default, Serve's Python proxy with TEXTCLF_SERVE_INGRESS=proxy; both spread it over the replicas): low, then
high, then low again, and records the replica count once a second from Serve's own API (`serve.status()`:
replicas per state). Writes bench/results/autoscale-<model>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.loadtest import RESULTS
from bench.serve_compare import classifier_folder, serve_args

ROOT = Path(__file__).resolve().parent.parent


def poll_replicas(samples: list, stop: threading.Event, t0: float, app: str, deployment: str) -> None:
    from ray import serve

    while not stop.is_set():
        try:
            st = serve.status().applications[app].deployments[deployment]
            states = {str(getattr(k, "value", k)): v for k, v in st.replica_states.items()}
            samples.append(
                {
                    "t": round(time.time() - t0, 1),
                    "running": states.get("RUNNING", 0),
                    "states": states,
                    "status": str(getattr(st.status, "value", st.status)),
                }
            )
        except Exception as exc:  # the controller is briefly busy while it scales: keep polling
            samples.append({"t": round(time.time() - t0, 1), "error": repr(exc)[:200]})
        stop.wait(1.0)


def plot(samples: list, phases: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ok = [s for s in samples if "running" in s]
    ax1.step([s["t"] for s in ok], [s["running"] for s in ok], where="post", label="running replicas")
    ax1.step(
        [s["t"] for s in ok],
        [sum(s["states"].values()) for s in ok],
        where="post",
        linestyle="--",
        label="replicas in any state",
    )
    ax1.set_ylabel("replicas")
    ax1.set_yticks(range(0, 4))
    ax1.legend(loc="upper left")
    for p in phases:
        tl = p.get("timeline") or {}
        ax2.plot([p["t0"] + t for t in tl.get("t", [])], tl.get("rps", []), color="C0")
        ax2.axvspan(p["t0"], p["t0"] + p["seconds"], alpha=0.08 if p["concurrency"] > 4 else 0.0, color="C1")
        ax2.text(p["t0"] + 1, 0, f"{p['concurrency']} concurrent", fontsize=8)
    ax2.set_ylabel("req/s (ok)")
    ax2.set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random-llama")
    ap.add_argument("--low", type=int, default=2, help="concurrent requests in the quiet phases")
    ap.add_argument("--high", type=int, default=16, help="concurrent requests in the busy phase (2x the target)")
    ap.add_argument("--low-s", type=float, default=20, help="seconds of the first quiet phase")
    # A second engine starting on 2 cores that the first replica and the load already saturate took ~140 s
    ap.add_argument("--high-s", type=float, default=180)
    ap.add_argument("--tail-s", type=float, default=50, help="seconds of the last quiet phase (scale-down)")
    ap.add_argument("--target", type=float, default=8, help="target_ongoing_requests per replica")
    ap.add_argument("--upscale-delay", type=float, default=5)
    ap.add_argument("--downscale-delay", type=float, default=20)
    a = ap.parse_args()

    folder = classifier_folder(a.model)
    slug = Path(a.model.rstrip("/")).name.lower()
    out = RESULTS / f"autoscale-{slug}"
    out.mkdir(parents=True, exist_ok=True)
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": a.target,
        "upscale_delay_s": a.upscale_delay,
        "downscale_delay_s": a.downscale_delay,
    }
    from serve_app.local import LocalServe, free_port

    di = free_port()
    with LocalServe(di_ports=(di, di + 20)) as cluster:
        from serve_app.app import DEPLOYMENT, app_from_config

        cluster.run(
            app_from_config(
                deployment_overrides={"autoscaling_config": autoscaling},
                **{**serve_args({}), "model_dir": folder, "run": None},
            )
        )
        front_end = cluster.front_end()
        print(f"--- load through {cluster.proxy_url} ({front_end})", flush=True)
        samples: list = []
        stop = threading.Event()
        t0 = time.time()
        poller = threading.Thread(target=poll_replicas, args=(samples, stop, t0, "textclf", DEPLOYMENT), daemon=True)
        poller.start()
        phases = []
        for conc, secs in ((a.low, a.low_s), (a.high, a.high_s), (a.low, a.tail_s)):
            name = f"phase{len(phases)}"
            start = time.time() - t0
            print(f"--- {start:5.0f} s: {conc} concurrent for {secs:.0f} s", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.loadtest",
                    "--url",
                    cluster.proxy_url,
                    "--concurrency",
                    str(conc),
                    "--duration",
                    str(secs),
                    "--warmup",
                    "0",
                    "--out",
                    str(out),
                    "--name",
                    name,
                    "--progress",
                    "5",
                ],
                cwd=ROOT,
                check=False,
            )
            r = json.loads((out / f"{name}.json").read_text())
            phases.append(
                {
                    "t0": round(start, 1),
                    "concurrency": conc,
                    "seconds": secs,
                    "rps": r["rps"],
                    "p50_ms": r["p50_ms"],
                    "p99_ms": r["p99_ms"],
                    "errors": r["errors"],
                    "timeline": r["timeline"],
                }
            )
            running = [s["running"] for s in samples if "running" in s]
            print(
                f"    {r['rps']} req/s, p99 {r['p99_ms']} ms, errors {r['errors']}; replicas now "
                f"{running[-1] if running else '?'}",
                flush=True,
            )
        stop.set()
        poller.join()
    result = {
        "model": a.model,
        "front_end": front_end,
        "autoscaling_config": autoscaling,
        "phases": phases,
        "replicas": samples,
    }
    path = RESULTS / f"autoscale-{slug}.json"
    path.write_text(json.dumps(result, indent=1))
    plot(
        samples,
        phases,
        RESULTS / f"autoscale-{slug}.png",
        f"{a.model}: load {a.low} -> {a.high} -> {a.low} concurrent through {front_end}, replicas from serve.status()",
    )
    changes = [
        (s["t"], s["running"])
        for i, s in enumerate(samples)
        if "running" in s and (i == 0 or s["running"] != samples[i - 1].get("running"))
    ]
    print("replica count changes (t s, running):", changes)
    print(f"wrote {path} and .png")


if __name__ == "__main__":
    main()
