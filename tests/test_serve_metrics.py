"""The app's and vLLM's metrics through Ray's metrics system: two replicas serve traffic, then one scrape of the
node's Prometheus endpoint (Ray's metrics agent) must show every request, tagged by the replica that answered.
Ray exports metrics every few seconds, so the scrape is polled until a deadline."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import deployed, run_app

pytestmark = pytest.mark.e2e

TWO_REPLICAS = {
    "autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 16},
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
}
TEXTS = ["how much is left in my checking account", "book a flight to paris", "what is the weather", "hi"]
N_OK, N_BAD, N_LONG = 24, 3, 1  # good texts, empty texts (422), one text over the prompt length


@pytest.fixture(scope="module")
def app(cluster, tiny_run):
    with deployed(cluster, run_app(tiny_run, TWO_REPLICAS), "textclf") as d:
        yield d.client


def samples(url: str, name: str) -> list:
    """The samples called `name` in one scrape."""
    text = httpx.get(url, timeout=30).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def by_tag(found: list, tag: str, **match: str) -> dict[str, float]:
    """The sum of the samples matching `match`, by the value of `tag`."""
    out: dict[str, float] = {}
    for s in found:
        if all(s.labels.get(k) == v for k, v in match.items()):
            out[s.labels.get(tag, "")] = out.get(s.labels.get(tag, ""), 0) + s.value
    return out


def test_one_scrape_of_the_node_counts_every_replica(app):
    from serve_app.local import metrics_urls

    def post(i: int) -> int:
        if i < N_OK:
            body = {"text": TEXTS[i % len(TEXTS)]}
        elif i < N_OK + N_BAD:
            body = {"text": ""}
        else:
            body = {"text": "please move money between my accounts " * 100}
        return app.post("/classify", json=body).status_code

    with ThreadPoolExecutor(8) as pool:  # concurrent: the proxy spreads them over both replicas
        codes = list(pool.map(post, range(N_OK + N_BAD + N_LONG)))
    assert codes.count(200) == N_OK + N_LONG and codes.count(422) == N_BAD, codes

    (url,) = metrics_urls()  # one node
    names = {"requests": "ray_textclf_requests_total", "engine": "ray_vllm_request_success_total"}
    deadline = time.time() + 120
    while True:
        ok = by_tag(samples(url, names["requests"]), "replica", endpoint="/classify", status="200")
        if sum(ok.values()) >= N_OK + N_LONG and len(ok) == 2 or time.time() > deadline:
            break
        time.sleep(2)
    text = httpx.get(url, timeout=30).text
    exported = sorted({s.name for fam in text_string_to_metric_families(text) for s in fam.samples})
    print("[metrics] exported:", [n for n in exported if "textclf" in n or "vllm" in n])
    print(f"[metrics] {url}: /classify 200 by replica {ok}")

    assert sum(ok.values()) == N_OK + N_LONG and len(ok) == 2 and all(v > 0 for v in ok.values()), ok
    bad = by_tag(samples(url, names["requests"]), "replica", endpoint="/classify", status="422")
    assert sum(bad.values()) == N_BAD, bad

    latency = by_tag(samples(url, "ray_textclf_request_latency_seconds_count"), "replica", endpoint="/classify")
    assert sum(latency.values()) == N_OK + N_BAD + N_LONG, latency
    assert samples(url, "ray_textclf_request_latency_seconds_bucket")
    predicted = by_tag(samples(url, "ray_textclf_predictions_total"), "replica", model="tiny")
    assert sum(predicted.values()) == N_OK + N_LONG, predicted
    truncated = by_tag(samples(url, "ray_textclf_truncated_texts_total"), "replica", model="tiny")
    assert sum(truncated.values()) == N_LONG, truncated
    tagged = samples(url, names["requests"])
    assert {(s.labels.get("application"), s.labels.get("deployment")) for s in tagged} == {("textclf", "Classifier")}

    # vLLM's engine statistics, tagged by the Serve replica that owns the engine (health probes count too)
    deadline = time.time() + 60
    while True:
        engine = by_tag(samples(url, names["engine"]), "ReplicaId")
        if sum(engine.values()) >= N_OK + N_LONG and len(engine) == 2 or time.time() > deadline:
            break
        time.sleep(2)
    print(f"[metrics] vLLM finished requests by replica {engine}")
    assert sum(engine.values()) >= N_OK + N_LONG and set(engine) == set(ok), (engine, ok)  # the same two replicas

    # each replica's admission limit: 16 texts at the start, lower only if an answer came back over the target
    limit = by_tag(samples(url, "ray_textclf_admission_limit"), "replica")
    assert set(limit) == set(ok) and all(0 < v <= 16 for v in limit.values()), limit
