"""Benchmark, not a test: the Serve ingress against vLLM's own server and a naive wrapper, in one run, on the same
model, the same requests (the bundled test split) and the same load generator (bench.loadtest, closed loop).

    python -m bench.serve_compare --model tiny-random-llama [--concurrency 48] [--duration 20]
    python -m bench.serve_compare --model smollm2-135m-instruct
    python -m bench.serve_compare --model runs/<name>          # a trained run's merged model
    make bench-serve ARGS="--model tiny-random-llama"

(a) vllm_server: `python -m vllm.entrypoints.openai.api_server` with the engine settings the Serve app uses
    (textclf.inference.engine_kwargs), the same one-step classification through /v1/completions (the classifier's
    prompt, max_tokens 1, logprob_token_ids = the labels' first tokens), its engine on the same cores, no access
    log (the app has none either).
    For an encoder classifier (a run of the encoder kind): vLLM's own /classify endpoint, one text per request.
(b) naive_wrapper: bench/naive_wrapper.py (FastAPI + the sync OpenAI client, 5 free tokens, parsed) in front of (a);
    generative classifiers only.
(c) ingress: our Serve app (serve_app/config.yaml, one replica) in a local Ray with the serving environment
    (serve_app.local.serve_env: direct ingress), requests to the replica's own port; also measured through
    http_options.port (ingress_via_proxy), the URL users get: HAProxy by default, Serve's Python proxy with
    --ingress proxy (or TEXTCLF_SERVE_INGRESS=proxy); its `front_end` field says which one answered.
The servers run one after the other, never together (2 cores). Prints a table; writes
bench/results/serve-<model>.json (summaries) and bench/results/serve-<model>/<server>.json|png (timelines).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import cpu_share
from bench.loadtest import RESULTS, measure, openai_target, test_texts, textclf_target, vllm_classify_target
from serve_app.local import INGRESSES

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "clf"


def classifier_folder(model: str) -> str:
    """A run folder's merged/ model, or a base model (alias or path) with the bundled task's labels."""
    run = Path(model)
    if (run / "merged" / "classifier.json").exists():
        return str(run / "merged")
    from textclf.config import load_config
    from textclf.export import base_classifier
    from textclf.prompts import format_from_config
    from textclf.sources import load_splits

    cfg = load_config()
    return str(base_classifier(model, format_from_config(cfg.model, load_splits(cfg.data).labels)))


def result_path(model: str, tag: str = "") -> Path:
    """bench/results/serve-<model folder name>[-<tag>].json"""
    return RESULTS / f"serve-{Path(model.rstrip('/')).name.lower()}{f'-{tag}' if tag else ''}.json"


def serve_args(overrides: dict[str, Any]) -> dict[str, Any]:
    import yaml

    conf = yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text())
    return {**(conf["applications"][0].get("args") or {}), **overrides}


SERVE_ARG_HELP = "override a serve_app/config.yaml arg, e.g. engine='{\"max_num_seqs\": 128}'"


def serve_args_from(pairs: list[str]) -> dict[str, Any]:
    """serve_args with the KEY=JSON overrides of --serve-arg."""
    return serve_args({k: json.loads(v) for k, v in (s.split("=", 1) for s in pairs)})


def engine_plan(folder: str, args: dict[str, Any]):
    """(the Serve app's configuration for this classifier, the engine plan it resolves to)"""
    from textclf.serving import ServeConfig, resolve_plan

    cfg = ServeConfig.model_validate({**args, "model_dir": folder, "run": None})
    return cfg, resolve_plan(cfg)


def engine_cli(cfg, plan) -> list[str]:
    """vLLM server flags for the engine the Serve app builds from the same configuration (`engine_plan`)."""
    from textclf.inference import engine_kwargs

    kw = engine_kwargs(
        plan.engine_model, plan.max_model_len, cfg.engine.settings(), runner=plan.runner, pooling=plan.pooling
    )
    kw["disable_log_stats"] = True
    if plan.pooling:  # the server takes the pooler config as JSON
        kw["pooler_config"] = json.dumps({"seq_pooling_type": plan.pooling})
    flags = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + flag[2:])  # the server's default may differ from the app's
        elif v is not None:
            flags += [flag, str(v)]
    return flags


class Proc:
    """A server subprocess in its own session (so the whole group stops together), logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.log = name, log_dir / f"{name}.log"
        self.p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_http(self, url: str, timeout: float = 240.0) -> None:
        import httpx

        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.p.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.p.returncode}); log {self.log}:\n" + self.log.read_text()[-3000:]
                )
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not up after {timeout}s; log {self.log}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()


def engine_cores(args: dict[str, Any]) -> str:
    """The cores the Serve replica's engine takes (cpu_binding "slot": the first free `cores_per_replica`)."""
    if args.get("cpu_binding", "slot") != "slot":
        return args["cpu_binding"]
    n = args.get("cores_per_replica") or 1
    return ",".join(map(str, sorted(os.sched_getaffinity(0))[:n]))


SERVERS = ("vllm_server", "naive_wrapper", "ingress", "ingress_via_proxy")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random-llama", help="alias, model path, or a run folder")
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per server")
    ap.add_argument("--warmup", type=float, default=5.0, help="unrecorded seconds of load before each")
    ap.add_argument("--only", default=",".join(SERVERS), help="comma-separated subset of the servers")
    ap.add_argument("--tag", default="", help="suffix of the result names (repeated runs)")
    ap.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help=SERVE_ARG_HELP,
    )
    ap.add_argument("--deployment", default="{}", help="JSON overrides of the deployment options")
    ap.add_argument(
        "--ingress",
        choices=list(INGRESSES),
        default=None,
        help="front end on the Serve port (ingress_via_proxy); default: $TEXTCLF_SERVE_INGRESS, else haproxy",
    )
    return ap.parse_args(argv)


class Bench:
    """One benchmark run: the servers measured in turn under the same closed-loop load, results kept by name."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.only = set(a.only.split(","))
        self.folder = classifier_folder(a.model)
        self.path = result_path(a.model, a.tag)
        self.out_dir = self.path.with_suffix("")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.args = serve_args_from(a.serve_arg)
        self.deployment = {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
            **json.loads(a.deployment),
        }
        self.texts = test_texts()
        self.results: dict[str, Any] = {}
        self.cores = engine_cores(self.args)
        self.serve_cfg, self.plan = engine_plan(self.folder, self.args)
        self.encoder = self.plan.runner == "pooling"
        if self.encoder and "naive_wrapper" in self.only:
            print(
                "--- naive_wrapper: skipped, it wraps the completions API and an encoder classifier has none",
                flush=True,
            )
            self.only.discard("naive_wrapper")

    def run(self, name: str, target) -> None:
        print(f"--- {name}: {target.url}", flush=True)
        r = measure(
            target, name, self.out_dir, concurrency=self.a.concurrency, duration=self.a.duration, warmup=self.a.warmup
        )
        r.pop("timeline", None)
        self.results[name] = r
        print(
            f"    {r['rps']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}, "
            f"client CPU {r['client_cpu_pct_of_core']} % of a core",
            flush=True,
        )

    def vllm_side(self) -> None:
        """vLLM's own server, and the naive wrapper in front of it."""
        from serve_app.local import free_port, wait_no_vllm

        if not self.only & {"vllm_server", "naive_wrapper"}:
            return
        port = free_port()
        vllm = Proc(
            "vllm_server",
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--served-model-name",
                SERVED_NAME,
                "--disable-uvicorn-access-log",
                *engine_cli(self.serve_cfg, self.plan),
            ],
            {"VLLM_CPU_OMP_THREADS_BIND": self.cores},
            self.out_dir,
        )
        try:
            vllm.wait_http(f"http://127.0.0.1:{port}/health")
            url = f"http://127.0.0.1:{port}"
            if "vllm_server" in self.only:
                self.run(
                    "vllm_server",
                    vllm_classify_target(url, self.texts, SERVED_NAME)
                    if self.encoder
                    else openai_target(url, self.texts, self.folder, SERVED_NAME),
                )
            if "naive_wrapper" in self.only:
                self.naive_wrapper(port)
        finally:
            vllm.stop()
        wait_no_vllm()

    def naive_wrapper(self, upstream_port: int) -> None:
        from serve_app.local import free_port

        wport = free_port()
        naive = Proc(
            "naive_wrapper",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.naive_wrapper:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(wport),
                "--log-level",
                "warning",
            ],
            {
                "NAIVE_UPSTREAM": f"http://127.0.0.1:{upstream_port}/v1",
                "NAIVE_MODEL": SERVED_NAME,
                "NAIVE_CLASSIFIER_DIR": self.folder,
                "PYTHONPATH": str(ROOT),
            },
            self.out_dir,
        )
        try:
            naive.wait_http(f"http://127.0.0.1:{wport}/docs", timeout=60)
            self.run("naive_wrapper", textclf_target(f"http://127.0.0.1:{wport}", self.texts))
        finally:
            naive.stop()

    def serve_side(self) -> None:
        """The Serve app: a replica's own port (direct ingress) and the Serve proxy."""
        from serve_app.local import LocalServe, free_port, ingress_urls

        if not self.only & {"ingress", "ingress_via_proxy"}:
            return
        di = free_port()
        with LocalServe(di_ports=(di, di + 20), ingress=self.a.ingress) as cluster:
            from serve_app.app import app_from_config  # imports ray.serve, which reads the environment just set

            t0 = time.time()
            cluster.run(
                app_from_config(
                    deployment_overrides=self.deployment, **{**self.args, "model_dir": self.folder, "run": None}
                )
            )
            print(f"    Serve app up in {time.time() - t0:.0f} s", flush=True)
            urls = ingress_urls() or [cluster.proxy_url]
            if "ingress" in self.only:
                self.run("ingress", textclf_target(urls[0], self.texts))
            if "ingress_via_proxy" in self.only:
                front_end = cluster.front_end()
                print(f"    {cluster.proxy_url} is served by {front_end}", flush=True)
                self.run("ingress_via_proxy", textclf_target(cluster.proxy_url, self.texts))
                self.results["ingress_via_proxy"]["front_end"] = front_end

    def summary(self, wall_s: float) -> dict[str, Any]:
        a, results = self.a, self.results
        out = {
            "model": a.model,
            "classifier_dir": self.folder,
            "concurrency": a.concurrency,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "engine_cores": self.cores,
            "serve_args": self.args,
            "deployment": self.deployment,
            "wall_s": round(wall_s, 1),
            **results,
        }
        if "ingress" in results:
            c = results["ingress"]["rps"]
            out["ratios"] = {
                k: round(c / results[v]["rps"], 2)
                for k, v in (("c/a", "vllm_server"), ("c/b", "naive_wrapper"))
                if results.get(v, {}).get("rps")
            }
            if results.get("ingress_via_proxy", {}).get("rps") and c:
                out["ratios"]["port/ingress"] = round(results["ingress_via_proxy"]["rps"] / c, 2)
        return out


def print_tables(a: argparse.Namespace, summary: dict[str, Any]) -> None:
    print(f"\n{a.model}, {a.concurrency} concurrent, {a.duration:.0f} s each (after {a.warmup:.0f} s warm-up)")
    print("| server | req/s | p50 ms | p99 ms | errors | client CPU % |\n|---|---|---|---|---|---|")
    measured = [k for k in SERVERS if k in summary]
    for k in measured:
        r = summary[k]
        k = f"{k} ({r['front_end']})" if r.get("front_end") else k
        print(f"| {k} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r['client_cpu_pct_of_core']} |")
    for k in measured:
        if summary[k].get("cpu_by_process"):
            print(f"\n{k}: CPU by process over the measured phase\n" + cpu_share.table(summary[k]["cpu_by_process"]))
    what = {"c/a": "ingress / vLLM server", "c/b": "ingress / naive wrapper", "port/ingress": "Serve port / ingress"}
    for k, v in summary.get("ratios", {}).items():
        print(f"{k} ({what[k]}): {v}")


def main(argv=None) -> None:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bench = Bench(a)
    t_start = time.time()
    bench.vllm_side()
    bench.serve_side()
    summary = bench.summary(time.time() - t_start)
    bench.path.write_text(json.dumps(summary, indent=1))
    print_tables(a, summary)
    print(f"wrote {bench.path}")


if __name__ == "__main__":
    main()
