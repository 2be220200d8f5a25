"""The inline engine (serve_app/inline_engine.py, the serving default on CPU) with a real vLLM CPU engine on the
session's tiny run, outside Serve: it answers; a request whose deadline passes is aborted in the engine, which goes on
answering; a fault inside the engine thread (injected: its step raises) fails the request in flight, marks the
engine errored and fails the health check, so Serve would replace the replica. In a subprocess, as vLLM in-process
sets process-wide state."""

import json
import subprocess
import sys
import textwrap

import pytest
from support import ROOT

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from serve_app.inline_engine import InlineEngine
    from textclf.serving import Classifiers, EngineUnavailable, ServeConfig, resolve_plan

    engine = {"kv_cache_gib": 0.25, "max_num_seqs": 8, "stats": False}
    args = {"model_dir": sys.argv[1], "max_batch": 16, "abstain_threshold": 0.0, "engine": engine}
    cfg = ServeConfig.model_validate(args)
    plan = resolve_plan(cfg)
    engine = InlineEngine(plan, cfg)
    clf = Classifiers(cfg, plan, engine)
    hasty = Classifiers(ServeConfig.model_validate({**args, "request_timeout_s": 0.001}), plan, engine)
    texts = ["how much is left in my checking account", "book a flight to rome"]
    out = {}

    async def main():
        out["labels"] = [r["label"] for r in await clf.classify(texts)]
        try:
            await hasty.classify(texts * 8)
        except EngineUnavailable as exc:
            out["hasty"] = exc.message
        for _ in range(50):  # the aborts reach the engine thread between its steps
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.1)
        out["left_in_engine"] = engine.engine.get_num_unfinished_requests()
        out["labels_after"] = [r["label"] for r in await clf.classify(texts)]

        def boom():
            raise RuntimeError("injected step failure")

        engine.engine.step = boom
        try:
            await clf.classify(texts)
        except EngineUnavailable as exc:
            out["failed"] = exc.message
        out["errored"] = engine.errored
        try:
            await clf.check_health()
        except EngineUnavailable as exc:
            out["health"] = exc.message

    asyncio.run(main())
    engine.shutdown()
    out["thread_alive"] = engine._thread.is_alive()
    print("RESULT " + json.dumps(out))
    """
)


def test_inline_engine_answers_aborts_and_fails_loudly(tiny_run):
    merged = tiny_run / "merged"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(merged)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    labels = json.loads((merged / "classifier.json").read_text())["labels"]
    assert len(out["labels"]) == 2 and set(out["labels"]) <= set(labels), out
    assert "did not answer within" in out["hasty"], out
    assert out["left_in_engine"] == 0, out
    assert out["labels_after"] == out["labels"], out
    assert "injected step failure" in out["failed"], out
    assert out["errored"] is True and out["health"] == "the engine is not running", out
    assert out["thread_alive"] is False, out
