"""The Ray-free serving core: request validation, abstain and top-k, the classifier registry, error mapping and
configuration, with a fake engine (no Ray, no vLLM engine)."""

import asyncio
import json
import os

import pytest
from pydantic import ValidationError
from serving_fakes import LABELS, make_classifiers

from textclf.export import read_meta, update_meta, write_meta
from textclf.prompts import PromptFormat
from textclf.serving import (
    BatchRequest,
    ClassifyRequest,
    EngineUnavailable,
    ServeConfig,
    TooLarge,
    UnknownClassifier,
    apply_abstain,
    resolve_plan,
)

# -- request models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"text": ""},
        {"text": "   \n\t"},
        {"text": 3},
        {"text": None},
        {"text": ["a"]},
        {},
        {"text": "ok", "model_path": "/etc/passwd"},  # unknown fields are refused: no request names a path
        {"text": "ok", "abstain_threshold": 1.5},
        {"text": "ok", "model": 7},
        {"text": "\u200b"},
        {"text": "\x00"},
        {"text": "\u2060"},
        {"text": " \ufeff\u200b\n"},
        {"text": "\u3164"},
        {"text": "\ud800"},
        {"text": "ok \udc00"},  # lone surrogates: not Unicode text
        {"text": "ok", "abstain_threshold": "0.5"},
        {"text": "ok", "abstain_threshold": True},  # strict floats
    ],
)
def test_classify_request_rejects(body):
    with pytest.raises(ValidationError):
        ClassifyRequest.model_validate(body)


def test_classify_request_accepts():
    r = ClassifyRequest.model_validate({"text": " hi ", "model": "tickets", "abstain_threshold": 0.4})
    assert r.text == " hi " and r.model == "tickets" and r.abstain_threshold == 0.4
    for ok in ("\u200bhi", "é", "🚀", "中", "\u0301a"):  # a visible character anywhere is enough
        assert ClassifyRequest.model_validate({"text": ok}).text == ok
    assert ClassifyRequest.model_validate({"text": "x", "abstain_threshold": 1}).abstain_threshold == 1.0


@pytest.mark.parametrize(
    "body",
    [
        {"texts": []},
        {"texts": "abc"},
        {"texts": ["a", ""]},
        {"texts": ["a", 1]},
        {"texts": ["a", "\u200b"]},
        {"texts": ["\ud800"]},
        {"texts": ["a"], "abstain_threshold": "0.5"},
    ],
)
def test_batch_request_rejects(body):
    with pytest.raises(ValidationError):
        BatchRequest.model_validate(body)


# -- abstain / top-k --------------------------------------------------------------------------------------------


def test_abstain():
    r = {"label": "travel", "confidence": 0.4, "scores": {"travel": 0.4, "banking": 0.35}}
    assert apply_abstain(r, None) == {**r, "needs_review": False}
    assert apply_abstain(r, 0.3)["label"] == "travel"
    held = apply_abstain(r, 0.5)
    assert held["label"] is None and held["needs_review"] and held["scores"] == r["scores"]
    assert apply_abstain({**r, "confidence": float("nan")}, 0.1)["needs_review"]  # NaN never passes


# -- the classify core with a fake engine -----------------------------------------------------------------------


def _core(tokenizer, meta=None, **cfg):
    return make_classifiers(tokenizer, meta, **cfg)


@pytest.fixture
def core(tokenizer):
    return _core(tokenizer)


def test_classify_core(core, tokenizer):
    clf, engine, fmt = core
    (r,) = asyncio.run(clf.classify(["book me a flight"]))
    assert r["label"] == "travel" and r["model"] == "clf" and not r["truncated"] and not r["needs_review"]
    assert r["confidence"] == pytest.approx(0.7)
    assert list(r["scores"]) == ["travel", "banking"]  # top-2, best first
    assert engine.calls[0][0] == fmt.encode(tokenizer, "book me a flight").input_ids  # the training prompt tokens
    (r,) = asyncio.run(clf.classify(["x"], abstain_threshold=0.9))
    assert r["label"] is None and r["needs_review"] and r["scores"]


def test_threshold_falls_back_to_the_classifiers_own(tmp_path, tokenizer):
    """The evaluation's threshold (update_meta into classifier.json) is the default; the server's and the
    request's override it, in that order."""
    write_meta(tmp_path, "x", PromptFormat(labels=LABELS, max_length=64), kind="merged")
    before = (tmp_path / "classifier.json").stat().st_mtime_ns
    update_meta(tmp_path, abstain_threshold=0.9, oos_label=None)
    assert (tmp_path / "classifier.json").stat().st_mtime_ns == before  # latest_run's order stays the export's
    assert [f.name for f in tmp_path.iterdir()] == ["classifier.json"]  # no temporary file left
    meta = read_meta(tmp_path)
    assert meta["abstain_threshold"] == 0.9 and meta["labels"] == list(LABELS)

    def one(clf, **kw):
        (r,) = asyncio.run(clf.classify(["book me a flight"], **kw))  # travel at 0.7
        return r["label"], r["needs_review"]

    clf, _, _ = _core(tokenizer, meta)
    assert clf.thresholds() == {"clf": 0.9}
    assert one(clf) == (None, True)  # the classifier's own 0.9
    assert one(clf, abstain_threshold=0.5) == ("travel", False)  # the request's
    assert one(clf, abstain_threshold=0.0) == ("travel", False)  # 0: answer every text
    served, _, _ = _core(tokenizer, meta, abstain_threshold=0.6)
    assert one(served) == ("travel", False) and served.thresholds() == {"clf": 0.6}  # the server's
    assert one(served, abstain_threshold=0.8) == (None, True)
    clf, _, _ = _core(tokenizer, {**meta, "abstain_threshold": None})  # none chosen: never abstains
    assert one(clf) == ("travel", False) and clf.thresholds() == {"clf": None}


def test_classify_core_truncates_long_text(core):
    clf, _, _ = core
    (r,) = asyncio.run(clf.classify(["word " * 200]))
    assert r["truncated"] and r["label"] == "travel"


def test_classify_core_errors(core):
    clf, engine, _ = core
    with pytest.raises(UnknownClassifier) as e:
        asyncio.run(clf.classify(["x"], model="../../etc/passwd"))
    assert e.value.status == 404 and e.value.detail == {"valid": ["clf"]}
    with pytest.raises(TooLarge):
        asyncio.run(clf.classify(["x"] * 5))
    with pytest.raises(TooLarge):
        asyncio.run(clf.classify(["x" * 5001]))
    assert asyncio.run(clf.ready()) == (True, "ok")
    engine.errored = True
    with pytest.raises(EngineUnavailable) as e:
        asyncio.run(clf.classify(["x"]))
    assert e.value.status == 503
    ok, reason = asyncio.run(clf.ready())
    assert not ok and reason


# -- configuration and registry ---------------------------------------------------------------------------------


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError):
        ServeConfig(adapters={"../x": "runs/x"})
    with pytest.raises(ValidationError):
        ServeConfig(abstain_threshold=2)
    with pytest.raises(ValidationError):
        ServeConfig(unknown_key=1)


def _fake_run(root, name, base, labels, merged=True):
    fmt = PromptFormat(labels=tuple(labels))
    adapter = root / name / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    write_meta(adapter, base, fmt, kind="adapter")
    if merged:
        (root / name / "merged").mkdir()
        write_meta(root / name / "merged", base, fmt, kind="merged")
    return root / name


def test_resolve_plan(tmp_path, smollm2_path):
    a = _fake_run(tmp_path, "tickets", smollm2_path, ["a", "b"])
    b = _fake_run(tmp_path, "legal", smollm2_path, ["x", "y", "z"], merged=False)
    p = resolve_plan(ServeConfig(run=str(a)))
    assert p.engine_model == str(a / "merged") and not p.enable_lora and list(p.classifiers) == ["tickets"]
    assert p.max_model_len == 256 + 32  # room for the label after a prompt cut to max_length
    p = resolve_plan(ServeConfig(runs_dir=str(tmp_path)))  # the latest run: legal (adapter only) -> base + LoRA
    assert list(p.classifiers) == ["legal"] and p.enable_lora and p.engine_model == smollm2_path
    p = resolve_plan(ServeConfig(adapters={"tickets": str(a), "legal": str(b / "adapter")}, default_classifier="legal"))
    assert p.enable_lora and p.max_loras == 2 and p.max_lora_rank == 16 and p.default == "legal"
    assert [s.lora_id for s in p.classifiers.values()] == [1, 2]
    assert p.classifiers["legal"].labels == ["x", "y", "z"]
    other = _fake_run(tmp_path, "other", "some/other-base", ["a", "b"])
    with pytest.raises(ValueError, match="one base model"):
        resolve_plan(ServeConfig(adapters={"tickets": str(a), "o": str(other)}))
    with pytest.raises(FileNotFoundError):
        resolve_plan(ServeConfig(run=str(tmp_path / "missing")))


def test_yaml_config_is_valid():
    import yaml

    from serve_app.app import DEFAULT_CONFIG, DEPLOYMENT

    conf = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert conf["http_options"]["host"] == "127.0.0.1"
    app = conf["applications"][0]
    assert app["import_path"] == "serve_app.app:build_app"
    ServeConfig.model_validate(app["args"])
    (dep,) = app["deployments"]
    assert dep["name"] == DEPLOYMENT and dep["max_ongoing_requests"] >= 1
    auto = dep["autoscaling_config"]
    assert auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0


def test_yaml_limits_overload_and_health_check():
    """Serve's own schema takes the file; its queue is bounded and refuses with Retry-After; its deadline is a
    backstop behind the app's; the health probe answers within Serve's health-check timeout."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import DEFAULT_CONFIG

    conf = yaml.safe_load(DEFAULT_CONFIG.read_text())
    ServeDeploySchema.model_validate(conf)
    (app,) = conf["applications"]
    cfg = ServeConfig.model_validate(app["args"])
    (dep,) = app["deployments"]
    assert dep["max_queued_requests"] >= 1 and dep["backpressure_config"]["retry_after_s"] >= 1
    assert conf["http_options"]["request_timeout_s"] > cfg.request_timeout_s
    assert cfg.health_probe_timeout_s < dep["health_check_timeout_s"]
    assert cfg.inflight_limit >= cfg.max_batch


def test_cores_of_a_bind_list():
    from textclf.inference import cores_of

    assert cores_of("0") == {0} and cores_of("0,2") == {0, 2} and cores_of("1-3") == {1, 2, 3}
    assert cores_of("0-1|4-5") == {0, 1, 4, 5}
    assert cores_of("auto") == cores_of("nobind") == cores_of(None) == cores_of("0,x") == set()


@pytest.mark.parametrize("value, disabled", [(None, True), ("", True), ("0", False), ("1", True)])
def test_no_compile_on_cpu_unless_the_user_says_so(monkeypatch, value, disabled):
    import torch._dynamo.config

    from textclf.inference import no_compile_on_cpu

    if value is None:
        monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TORCH_COMPILE_DISABLE", value)
    before = torch._dynamo.config.disable  # torch's config module: monkeypatch's undo would delete the entry
    try:
        no_compile_on_cpu()
        assert torch._dynamo.config.disable is disabled
        assert os.environ["TORCH_COMPILE_DISABLE"] == ("1" if disabled else "0")
    finally:
        torch._dynamo.config.disable = before


def test_bound_engine_gets_a_thread_per_core(monkeypatch):
    """Ray's OMP_NUM_THREADS=1 (an actor's one reserved CPU) must not leave an engine bound to two cores on one
    thread; a binding without a core list ("nobind") leaves the count alone. That the evaluation actor's engine gets
    them is test_e2e's test_the_evaluation_engine_computes_on_every_core."""
    from textclf.inference import bind_engine_cores

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    bind_engine_cores("0-1")
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and os.environ["OMP_NUM_THREADS"] == "2"
    bind_engine_cores("nobind")
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and os.environ["OMP_NUM_THREADS"] == "2"


def test_engine_processes_start_on_the_engine_cores_and_the_replica_leaves_them():
    """What the engine spawns inherits the engine's cores; afterwards every thread of this process is on the rest
    (run in a child process, so the test runner's own affinity is left alone)."""
    import multiprocessing as mp
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_affinity_probe, args=(q,))
    p.start()
    p.join(60)
    engine_core, child, threads_after, allowed = q.get(timeout=5)
    assert child == {engine_core}  # a process started inside the block: the engine's core only
    assert threads_after == [allowed - {engine_core}] * len(threads_after)  # every thread of the replica: the rest


def _affinity_probe(q) -> None:
    import os
    import subprocess
    import sys
    import threading

    from serve_app.cpu_placement import engine_on_its_cores

    allowed = os.sched_getaffinity(0)
    core = min(allowed)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)  # a thread that was there before, like Ray's own
    t.start()
    with engine_on_its_cores(str(core)):
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    threads_after = [os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")]
    stop.set()
    t.join()
    q.put((core, set(json.loads(out)), threads_after, allowed))


def test_evaluation_and_serving_build_engine_arguments_through_one_path():
    """Both configurations keep their own keys and defaults and become vLLM's arguments through engine_kwargs."""
    from textclf.config import EvalConfig
    from textclf.inference import engine_kwargs, on_gpu

    if on_gpu():
        pytest.skip("the CPU arguments are checked")
    ev = engine_kwargs("m", 64, EvalConfig().engine_settings())
    sv = engine_kwargs("m", 64, ServeConfig().engine.settings())
    assert (ev["max_num_seqs"], ev["kv_cache_memory_bytes"]) == (256, 1 << 30)
    assert (sv["max_num_seqs"], sv["kv_cache_memory_bytes"]) == (64, 1 << 29)
    assert set(ev) == set(sv)
    assert "skip_tokenizer_init" not in ev  # vLLM's default: it loads the tokenizer
    assert engine_kwargs("m", 64, ServeConfig().engine.settings(), tokenizer=False)["skip_tokenizer_init"] is True
    head = engine_kwargs("m", 64, ServeConfig().engine.settings(), runner="pooling", pooling="MEAN")
    assert head["runner"] == "pooling" and head["pooler_config"].seq_pooling_type == "MEAN"
    assert "pooler_config" not in engine_kwargs("m", 64, ServeConfig().engine.settings(), runner="pooling")


def test_the_cpu_kv_cache_is_what_the_longest_batch_can_fill_at_most_the_configured_size(tmp_path):
    """SmolLM2-135M's shape: 30 layers, 3 KV heads of 64, bf16: 23,040 bytes a token."""
    from transformers import GPT2Config, JambaConfig, LlamaConfig

    from textclf.inference import EngineSettings, kv_bytes_per_token, kv_cache_bytes

    llama = tmp_path / "llama"
    LlamaConfig(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576
    ).save_pretrained(llama)
    assert kv_bytes_per_token(str(llama), 2) == 2 * 30 * 3 * 64 * 2
    # 256 sequences of 120 tokens: 4 blocks of 32 each, and the block vLLM holds back
    assert kv_cache_bytes(str(llama), 120, EngineSettings(256, 1.0, 0.85), 2) == (256 * 4 + 1) * 32 * 23_040
    assert kv_cache_bytes(str(llama), 120, EngineSettings(64, 0.5, 0.85), 2) == (64 * 4 + 1) * 32 * 23_040
    assert kv_cache_bytes(str(llama), 2048, EngineSettings(256, 1.0, 0.85), 2) == 1 << 30  # the cap
    gpt2 = tmp_path / "gpt2"  # other names for the same fields (n_layer, n_head, n_embd), no KV-head count
    GPT2Config(n_layer=2, n_head=4, n_embd=64).save_pretrained(gpt2)
    assert kv_bytes_per_token(str(gpt2), 4) == 2 * 2 * 4 * 16 * 4
    assert kv_cache_bytes(str(tmp_path / "missing"), 120, EngineSettings(8, 0.25, 0.85), 2) == 1 << 28
    hybrid = tmp_path / "hybrid"  # linear-attention (or Mamba) layers keep per-sequence state: not estimated
    LlamaConfig(num_hidden_layers=4, layer_types=["full_attention", "linear_attention"] * 2).save_pretrained(hybrid)
    assert kv_bytes_per_token(str(hybrid), 2) is None
    JambaConfig().save_pretrained(tmp_path / "jamba")
    assert kv_bytes_per_token(str(tmp_path / "jamba"), 2) is None
