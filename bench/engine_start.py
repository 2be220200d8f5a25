"""Benchmark helper, run as a fresh process by bench.pipeline_throughput: how long a run's classifier takes from
process start to its first answer, as the evaluation (offline vLLM) and as the Serve app (one replica).

    python -m bench.engine_start offline RUN TEXTS_JSON OUT_JSON   # then classifies every text of TEXTS_JSON
    python -m bench.engine_start serve RUN [PROCESS] OUT_JSON   # PROCESS: separate, inline (engine.process), or
                                                                # spawn (separate without engine.preload)

Writes wall-clock timestamps (time.time()) to OUT_JSON; the parent subtracts the moment it started this process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def offline(run: Path, texts_file: Path) -> dict:
    from ray_jobs.evaluate import classifier_source
    from textclf.config import load_config
    from textclf.inference import BatchClassifier

    cfg = load_config(str(run / "config.yaml"))
    model_dir, meta, adapter = classifier_source(cfg, run)
    texts = json.loads(texts_file.read_text())
    clf = BatchClassifier(model_dir, meta, cfg.eval.engine_settings(), adapter, cfg.eval.cpu_threads_bind)
    clf.classify(texts[:1])
    first = time.time()
    labels = [r["label"] for r in clf.classify(texts)]
    return {"first_answer_at": first, "done_at": time.time(), "labels": labels}


def serve(run: Path, process: str = "separate") -> dict:
    import httpx
    import yaml

    from serve_app.local import LocalServe

    one_replica = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    with LocalServe() as cluster:
        from serve_app.app import DEFAULT_CONFIG, app_from_config  # imports ray.serve: it reads the environment set

        engine = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]["args"]["engine"]
        spawn = process == "spawn"
        engine = {**engine, "process": "separate", "preload": False} if spawn else {**engine, "process": process}
        app = app_from_config(run=str(run), deployment_overrides=one_replica, engine=engine)
        deploy = time.time()
        cluster.run(app)
        r = httpx.post(f"{cluster.proxy_url}/classify", json={"text": "hello"}, timeout=60)
        r.raise_for_status()
        return {"deploy_at": deploy, "first_answer_at": time.time()}


if __name__ == "__main__":
    mode, run, *rest = sys.argv[1:]
    result = offline(Path(run), Path(rest[0])) if mode == "offline" else serve(Path(run), *rest[:-1])
    Path(rest[-1]).write_text(json.dumps(result))
