"""The HTTP API (serve_app/api.py) built over a fake engine, without Ray: status codes, the JSON error body,
Retry-After, admission by texts in progress, the health probe, bad input."""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serving_fakes import make_classifiers, recorded_metrics

from serve_app.api import create_api
from textclf.serving import EngineUnavailable, ServeConfig

ROOT = Path(__file__).resolve().parent.parent


def client_for(tokenizer, **cfg):
    clf, engine, _ = make_classifiers(tokenizer, **cfg)
    metrics = recorded_metrics()
    client = TestClient(create_api(clf, metrics), raise_server_exceptions=False)
    client.metrics = metrics  # what the app recorded, for the metrics tests
    return client, clf, engine


@pytest.fixture
def api(tokenizer):
    return client_for(tokenizer)


def error_of(r, status):
    """The API's error body, OpenAI's shape: {"error": {"message", "type", "param", "code", "detail"?}}; returned
    flat, as {"error": message, "detail": ..., "type": ..., "param": ...}."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err) <= {"message", "type", "param", "code", "detail"}, err
    assert isinstance(err["message"], str) and err["message"] and err["code"] == status
    assert err["type"].endswith("Error") and " " not in err["type"]
    return {"error": err["message"], "detail": err.get("detail"), "type": err["type"], "param": err["param"]}


def test_classify_batch_labels_health(api):
    c, _, _ = api
    r = c.post("/classify", json={"text": "book me a flight"})
    assert r.status_code == 200 and r.json()["label"] == "travel"
    r = c.post("/classify/batch", json={"texts": ["a", "b"], "abstain_threshold": 0})
    assert r.status_code == 200 and [p["label"] for p in r.json()] == ["travel", "travel"]
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/ready").json() == {"ready": True, "reason": "ok"}
    assert c.get("/labels").json()["classifiers"] == {"clf": ["banking", "travel", "kitchen_and_dining"]}


# -- a dead or stalled engine -------------------------------------------------------------------------------------


def test_dead_engine_answers_503_with_retry_after_at_once(tokenizer):
    c, clf, engine = client_for(tokenizer, retry_after_s=3)
    engine.errored = True
    calls = len(engine.calls)
    for path, body in (("/classify", {"text": "hi"}), ("/classify/batch", {"texts": ["a", "b"]})):
        r = c.post(path, json=body)
        assert "not running" in error_of(r, 503)["error"] and r.headers["retry-after"] == "3"
    assert len(engine.calls) == calls  # refused before reaching the engine
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False and r.headers["retry-after"] == "3"
    t0 = time.perf_counter()
    with pytest.raises(EngineUnavailable):
        asyncio.run(clf.check_health())
    assert time.perf_counter() - t0 < 1 and len(engine.calls) == calls  # at once, no probe


def test_an_engine_slower_than_the_request_timeout_gives_503(tokenizer):
    c, _, engine = client_for(tokenizer, request_timeout_s=0.2)
    engine.delay = 5
    r = c.post("/classify", json={"text": "hi"})
    assert "did not answer within 0.2s" in error_of(r, 503)["error"] and r.headers["retry-after"] == "1"


def test_health_check_probes_an_idle_engine(tokenizer):
    clf, engine, _ = make_classifiers(tokenizer, health_probe_timeout_s=0.3)
    asyncio.run(clf.check_health())
    assert len(engine.calls) == 1  # one probe text went through the engine
    asyncio.run(clf.check_health())
    assert len(engine.calls) == 1  # its answer is recent: no second probe


def test_health_check_fails_when_the_engine_stalls(tokenizer):
    clf, engine, _ = make_classifiers(tokenizer, health_probe_timeout_s=0.2)

    async def stalled():
        engine.gate = asyncio.Event()  # never set: the engine takes requests and answers none
        t0 = time.perf_counter()
        with pytest.raises(EngineUnavailable, match="did not answer within 0.2s"):
            await clf.check_health()
        return time.perf_counter() - t0

    assert asyncio.run(stalled()) < 2


def test_health_check_does_not_kill_a_busy_replica(tokenizer):
    """Answers to real requests prove liveness: a recent one skips the probe, and answers that arrive while a probe
    waits in the queue pass the check even when the probe itself is late."""
    clf, engine, _ = make_classifiers(tokenizer, health_probe_timeout_s=0.3, max_batch=40)

    async def recent():
        await clf.classify(["x"])
        engine.gate = asyncio.Event()  # stalled from now on, but an answer came just now
        await clf.check_health()

    asyncio.run(recent())
    calls = len(engine.calls)
    assert calls == 1

    clf, engine, _ = make_classifiers(tokenizer, health_probe_timeout_s=1.0, max_batch=40)

    async def busy():
        engine.delays = [0.3] * 8  # eight queued requests answered 0.3 s after they came
        engine.delay = 30  # and the probe behind them: later than its deadline
        queue = asyncio.ensure_future(asyncio.gather(*(clf.classify([f"t{i}"]) for i in range(8))))
        await asyncio.sleep(0.1)
        await clf.check_health()  # the queued requests are answered during the probe's wait
        assert len(engine.calls) == 9
        await queue

    asyncio.run(busy())


# -- overload ---------------------------------------------------------------------------------------------------


def test_admission_counts_texts_and_refuses_beyond_the_limit(tokenizer):
    clf, engine, _ = make_classifiers(tokenizer, max_inflight_texts=5, retry_after_s=2)
    app = create_api(clf, recorded_metrics())

    async def go():
        engine.gate = asyncio.Event()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            held = asyncio.ensure_future(c.post("/classify/batch", json={"texts": ["a", "b", "c", "d"]}))
            while clf.inflight < 4:
                await asyncio.sleep(0.01)
            over = await c.post("/classify/batch", json={"texts": ["e", "f"]})  # 4 + 2 > 5
            one = asyncio.ensure_future(c.post("/classify", json={"text": "g"}))  # 4 + 1 fits
            while clf.inflight < 5:
                await asyncio.sleep(0.01)
            full = await c.post("/classify", json={"text": "h"})
            # at the limit a classify request is refused before its body is read or checked
            unread = await c.post("/classify/batch", content=b"{not json")
            engine.gate.set()
            return over, full, unread, await held, await one

    over, full, unread, held, one = asyncio.run(go())
    for r in (over, full, unread):
        body = error_of(r, 429)
        assert r.headers["retry-after"] == "2" and body["detail"]["max_inflight_texts"] == 5
    assert held.status_code == 200 and len(held.json()) == 4 and one.status_code == 200
    assert clf.inflight == 0


def test_inflight_limit_defaults_and_checks():
    assert ServeConfig().inflight_limit == 4 * ServeConfig().engine.max_num_seqs
    assert ServeConfig(max_inflight_texts=100).inflight_limit == 100
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_inflight_texts=10, max_batch=64)


# -- bad input: every refusal in the API's JSON shape ----------------------------------------------------------


def post_raw(c, path, body: bytes, **headers):
    return c.post(path, content=body, headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize(
    "path,body",
    [
        ("/classify", b'{"text": "\\ud800"}'),
        ("/classify", b'{"text": "ok \\udfff"}'),
        ("/classify/batch", b'{"texts": ["ok", "\\ud800"]}'),
        ("/classify", b'{"text": "ok", "\\ud800": 1}'),  # an unknown field whose name UTF-8 cannot encode
        ("/classify", b'{"text": "ok", "model": "\\ud800"}'),
    ],
)
def test_lone_surrogates_are_a_json_4xx(api, path, body):
    c, _, engine = api
    r = post_raw(c, path, body)
    assert r.status_code in (404, 422) and r.json()["error"]["message"], r.text
    assert not engine.calls


def test_surrogate_refusal_names_the_index(api):
    c, _, _ = api
    detail = error_of(post_raw(c, "/classify/batch", b'{"texts": ["ok", "\\ud800"]}'), 422)["detail"]
    assert "[1]" in detail[0]["msg"] and "surrogate" in detail[0]["msg"]


@pytest.mark.parametrize(
    "body",
    [
        b"{text: oops",
        b"",
        b"[1, 2]",
        b'"just a string"',
        b'{"text": "\xff\xfe"}',
        b"{" * 10,
        b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # nested deeper than any JSON parser's stack
        b'{"text": "ok", "abstain_threshold": ' + b"9" * 5000 + b"}",
    ],
)
def test_malformed_bodies_get_the_api_error(api, body):
    c, _, _ = api
    body_ = error_of(post_raw(c, "/classify", body), 422)
    assert "There was an error parsing the body" not in json.dumps(body_)


def test_deep_nesting_says_so(api):
    c, _, _ = api
    r = post_raw(c, "/classify/batch", b'{"texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    assert "nested too deeply" in error_of(r, 422)["error"]


def test_a_huge_batch_is_refused_by_its_count_before_validation(api, monkeypatch):
    """150,000 one-character texts fit the body limit; they are counted and refused before pydantic runs."""
    import textclf.serving.api as serving_api

    c, _, engine = api

    def no_validation(*a, **k):
        raise AssertionError("validated a batch that its count refuses")

    monkeypatch.setattr(serving_api, "validate", no_validation)
    body = json.dumps({"texts": ["a"] * 150_000}).encode()
    assert len(body) < ServeConfig().max_body_bytes
    r = post_raw(c, "/classify/batch", body)
    assert "150000" in error_of(r, 413)["error"] and not engine.calls


def test_a_body_over_the_limit_is_refused_by_its_length(tokenizer):
    c, _, _ = client_for(tokenizer, max_body_bytes=2048)
    assert "limit of 2048 bytes" in error_of(c.post("/classify", json={"text": "a" * 5000}), 413)["error"]


@pytest.mark.parametrize("text", ["\u200b", "\x00", "\u2060", " \t\n", "\ufeff\u200b ", "\u3164", "\u00ad", ""])
def test_invisible_texts_are_refused_like_blank_ones(api, text):
    c, _, engine = api
    assert "invisible" in error_of(c.post("/classify", json={"text": text}), 422)["detail"][0]["msg"]
    detail = error_of(c.post("/classify/batch", json={"texts": ["fine", text, "ok"]}), 422)["detail"]
    assert "[1]" in detail[0]["msg"]
    assert not engine.calls


@pytest.mark.parametrize("value", ["0.5", True, "1", [0.5], {"x": 1}])
def test_thresholds_are_strict_floats(api, value):
    c, _, _ = api
    error_of(c.post("/classify", json={"text": "hi", "abstain_threshold": value}), 422)
    error_of(c.post("/classify/batch", json={"texts": ["hi"], "abstain_threshold": value}), 422)


def test_int_thresholds_are_floats(api):
    c, _, _ = api
    assert c.post("/classify", json={"text": "hi", "abstain_threshold": 1}).json()["label"] is None
    assert c.post("/classify", json={"text": "hi", "abstain_threshold": 0}).json()["label"] == "travel"


def test_other_errors_are_json_too(api, monkeypatch):
    c, clf, _ = api
    error_of(c.get("/nowhere"), 404)
    error_of(c.get("/classify"), 405)
    assert c.get("/classify").headers["allow"] == "POST"
    body = error_of(c.post("/classify", json={"text": "hi", "model": "../etc"}), 404)
    assert body["detail"] == {"valid": ["clf"]}
    error_of(c.post("/classify/batch", json={"texts": ["x"] * 5}), 413)
    error_of(c.post("/classify", json={"text": "x" * 5001}), 413)

    async def broken(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(clf, "classify", broken)
    assert "KeyError" in error_of(c.post("/classify", json={"text": "hi"}), 500)["error"]


# -- docs and metrics -------------------------------------------------------------------------------------------


def test_openapi_documents_every_route_and_both_request_shapes(api):
    c, _, _ = api
    doc = c.get("/openapi.json").json()
    paths = doc["paths"]
    assert set(paths) == {"/classify", "/classify/batch", "/health", "/ready", "/labels", "/v1/models"}
    one = paths["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    assert [sorted(s["required"]) for s in one] == [["text"], ["input"]]
    batch = paths["/classify/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "texts" in batch["properties"]
    answers = paths["/classify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
    assert {a["$ref"].rsplit("/", 1)[1] for a in answers} == {"Prediction", "ClassificationResponse"}
    assert set(doc["components"]["schemas"]["ErrorBody"]["properties"]) == {"error"}
    assert c.get("/docs").status_code == 200


# -- vLLM's classification API and OpenAI's model list -----------------------------------------------------------


def test_vllm_classify_one_text(api):
    c, clf, engine = api
    r = c.post("/classify", json={"model": "clf", "input": "book me a flight"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == "clf"
    assert abs(body["created"] - time.time()) < 60
    (d,) = body["data"]
    assert d["index"] == 0 and d["label"] == "travel" and d["num_classes"] == 3
    assert d["probs"] == pytest.approx([0.2, 0.7, 0.1])  # every label, in the classifier's label order
    tokens = len(engine.calls[0][0])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens


def test_vllm_classify_a_list_uses_the_default_and_the_servers_threshold(tokenizer):
    c, _, engine = client_for(tokenizer, abstain_threshold=0.8)
    r = c.post("/classify", json={"input": ["a", "b", "c"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "clf" and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["label"] for d in body["data"]] == [None, None, None]  # below the server's threshold, as /classify
    assert body["usage"]["prompt_tokens"] == sum(len(call[0]) for call in engine.calls)


@pytest.mark.parametrize(
    "body,status",
    [
        ({"input": []}, 422),
        ({"input": ["ok", "\u200b"]}, 422),
        ({"input": [1, 2, 3]}, 422),
        ({"input": [[1, 2]]}, 422),
        ({"input": "ok", "model": "nope"}, 404),
        ({"input": ["x"] * 5}, 413),
        ({"input": "x" * 5001}, 413),
        ({"input": "ok", "truncate_prompt_tokens": 8}, 422),
        ({"input": "ok", "add_special_tokens": False}, 422),
        ({"input": "ok", "use_activation": False}, 422),
        ({"input": "ok", "priority": 1}, 422),
        ({"input": "ok", "cache_salt": "s"}, 422),
        ({"input": "ok", "padding": "max_length"}, 422),
        ({"input": "ok", "abstain_threshold": 0.5}, 422),
    ],
)
def test_vllm_classify_refusals(api, body, status):
    c, _, engine = api
    error_of(c.post("/classify", json=body), status)
    assert not engine.calls


def test_vllm_refusal_names_the_field_and_index(api):
    c, _, _ = api
    err = error_of(c.post("/classify", json={"input": ["ok", "\u200b"]}), 422)
    assert err["param"] == "input" and "[1]" in err["detail"][0]["msg"] and err["type"] == "UnprocessableEntityError"
    err = error_of(c.post("/classify", json={"input": "ok", "model": "nope"}), 404)
    assert err["type"] == "NotFoundError" and err["detail"] == {"valid": ["clf"]}


def test_vllm_classify_accepts_user_and_request_id(api):
    c, _, _ = api
    r = c.post("/classify", json={"input": "hi", "user": "u1", "request_id": "r1"})
    assert r.status_code == 200 and r.json()["data"][0]["label"] == "travel"


def test_vllm_options_at_their_defaults_are_accepted(api):
    c, _, _ = api
    body = {"input": "hi", "truncate_prompt_tokens": -1, "use_activation": True, "add_special_tokens": True}
    r = c.post("/classify", json={**body, "priority": 0, "padding": None, "cache_salt": None})
    assert r.status_code == 200 and r.json()["data"][0]["label"] == "travel"


def test_vllm_clients_own_request_and_response_models(api):
    """A client built on vLLM's protocol classes: its request dumped whole (every option at vLLM's default) is
    accepted, and the answer parses as vLLM's ClassificationResponse."""
    from vllm.entrypoints.pooling.classify.protocol import ClassificationCompletionRequest, ClassificationResponse

    c, _, _ = api
    req = ClassificationCompletionRequest(model="clf", input=["book me a flight", "hi"])
    r = c.post("/classify", json=req.model_dump(mode="json"))
    assert r.status_code == 200, r.text
    resp = ClassificationResponse.model_validate(r.json())
    assert resp.model == "clf"
    assert [(d.index, d.label, d.num_classes) for d in resp.data] == [(0, "travel", 3), (1, "travel", 3)]
    assert resp.data[0].probs == pytest.approx([0.2, 0.7, 0.1]) and resp.usage.prompt_tokens > 0


def test_both_shapes_on_one_route(api):
    """A body with "text" is this API's request even when it also carries "input" (refused there as unknown)."""
    c, _, _ = api
    assert c.post("/classify", json={"text": "hi"}).json()["label"] == "travel"
    error_of(c.post("/classify", json={"text": "hi", "input": "hi"}), 422)


def test_v1_models_lists_the_classifiers(api):
    c, clf, _ = api
    body = c.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "clf" and card["object"] == "model" and card["owned_by"] == "textclf"
    assert card["max_model_len"] == clf.plan.max_model_len and isinstance(card["created"], int)


def test_errors_are_in_openai_shape_with_retry_after(tokenizer):
    c, _, engine = client_for(tokenizer)
    engine.errored = True
    r = c.post("/classify", json={"input": "hi"})
    err = error_of(r, 503)
    assert err["type"] == "ServiceUnavailableError" and r.headers["retry-after"] == "1"
    err = error_of(c.post("/classify", json={"text": "x" * 5001}), 413)
    assert err["type"] == "RequestEntityTooLargeError" and err["detail"] == {"indices": [0]}


def test_metrics_count_by_route(api):
    c, _, _ = api
    c.post("/classify", json={"text": "hi"})
    c.post("/classify", json={"text": ""})
    c.get("/docs")
    c.get("/not/a/route")
    c.get("/metrics")  # no route: the metrics are Ray's, scraped from each node
    m = c.metrics
    assert m.requests.totals("endpoint", "status") == {
        ("/classify", "200"): 1,
        ("/classify", "422"): 1,
        ("/docs", "200"): 1,
        ("other", "404"): 2,
    }
    assert m.latency.counts("endpoint") == {("/classify",): 2, ("/docs",): 1, ("other",): 2}
    assert all(0 < seconds < 10 for _, seconds in m.latency.records)
    assert m.latency.name == "textclf_request_latency_seconds" and m.latency.boundaries[0] == 0.005


def test_metrics_are_rays_with_the_apps_names_and_tags():
    # Ray's Serve metric classes, outside a replica (no Serve tags) and without a cluster; in a subprocess, as
    # importing ray.serve here would change the logging and Serve settings of later tests
    code = (
        "import json; from serve_app.metrics import serve_metrics; m = serve_metrics(); "
        "print(json.dumps([x.info for x in (m.requests, m.latency, m.predictions, m.truncated, m.admission_limit)]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [[i["name"], i["tag_keys"]] for i in infos] == [
        ["textclf_requests", ["endpoint", "status"]],
        ["textclf_request_latency_seconds", ["endpoint"]],
        ["textclf_predictions", ["model", "label"]],
        ["textclf_truncated_texts", ["model"]],
        ["textclf_admission_limit", []],
    ]
    assert infos[1]["boundaries"][-1] == 60


def test_metrics_count_predictions_by_label_and_truncated_texts(api):
    c, _, _ = api
    assert c.post("/classify/batch", json={"texts": ["a", "b", "word " * 200]}).status_code == 200
    assert c.post("/classify", json={"text": "hi", "abstain_threshold": 0.9}).json()["label"] is None
    assert c.post("/classify", json={"input": ["x", "y"]}).status_code == 200
    m = c.metrics
    assert m.predictions.totals("model", "label") == {("clf", "travel"): 5, ("clf", ""): 1}
    assert len(m.predictions.records) == 3  # one record per label of an answer, not one per text
    assert m.truncated.totals("model") == {("clf",): 1}
    assert c.post("/classify/batch", json={"texts": ["a", "missing-model"], "model": "nope"}).status_code == 404
    assert len(m.predictions.records) == 3  # refused requests predict nothing
