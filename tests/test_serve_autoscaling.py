"""Autoscaling on the requests a replica turns away: each replica holds only the texts its latency target allows
(textclf/serving/admission.py), which can be fewer than Serve's target_ongoing_requests, and refuses the rest with
429; Serve still adds a replica, as config.yaml's policy (serve_app/autoscaling.py) counts what the replicas turned
away. A real local Ray + Serve and the tiny test run."""

import asyncio
import time

import httpx
import pytest
from support import deployed, run_app

pytestmark = pytest.mark.e2e

SCALING = {
    "autoscaling_config": {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 1,
        "downscale_delay_s": 600,
        "metrics_interval_s": 1,
        "look_back_period_s": 5,
        "policy": {"policy_function": "serve_app.autoscaling:policy"},
    },
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
}
CLIENTS = 48  # each sends a batch of 40 texts, honouring Retry-After; the replica holds a few batches in 0.5 s


def running_replicas(app: str) -> int:
    from serve_app.local import replicas

    return sum(str(getattr(r["state"], "value", r["state"])) == "RUNNING" for r in replicas(app, "Classifier"))


def test_turned_away_requests_scale_the_deployment(cluster, tiny_run):
    with deployed(cluster, run_app(tiny_run, SCALING, target_latency_s=0.5), "scaling") as d:
        assert running_replicas("scaling") == 1
        texts = [f"what is my balance {i}" for i in range(40)]
        codes: dict[int, int] = {}
        replicas = [1]  # running, as last seen

        async def client(c: httpx.AsyncClient, until: float) -> None:
            while time.time() < until and replicas[0] < 2:
                r = await c.post("/classify/batch", json={"texts": texts})
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 429:
                    await asyncio.sleep(float(r.headers["retry-after"]))

        async def watch(until: float) -> None:
            while time.time() < until and replicas[0] < 2:
                await asyncio.sleep(1)
                replicas[0] = await asyncio.to_thread(running_replicas, "scaling")

        async def load() -> None:
            until = time.time() + 150
            limits = httpx.Limits(max_connections=None)
            async with httpx.AsyncClient(base_url=str(d.client.base_url), timeout=120, limits=limits) as c:
                await asyncio.gather(watch(until), *(client(c, until) for _ in range(CLIENTS)))

        t0 = time.time()
        asyncio.run(load())
        print(f"[autoscale] {replicas[0]} replicas after {time.time() - t0:.0f}s; answers {codes}")
        assert codes.get(429), codes  # the replica held its limit and turned requests away
        assert replicas[0] == 2, codes
        assert set(codes) <= {200, 429}, codes
