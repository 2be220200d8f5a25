"""vLLM loads a tokenizer of its own only where a classifier's requests need one: one-step scoring reads label token
ids (no text out) and prompts go in as token ids, so that engine starts without it and must answer as one with it;
labels that share a first token are decoded under a grammar, which needs it. A real vLLM CPU engine on the tiny
random Llama (the plumbing, not the answers), in a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest
from support import ROOT

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent(
    """
    import json
    from transformers import AutoTokenizer
    import textclf.inference as inference
    from textclf.config import load_config
    from textclf.export import base_classifier, read_meta
    from textclf.inference import BatchClassifier, EngineSettings
    from textclf.kinds import get_kind
    from textclf.models import resolve_model
    from textclf.prompts import PromptFormat

    texts = ["what is my balance", "hello", "book a flight to rome"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-random-llama"))

    def run(fmt):
        folder = base_classifier("tiny-random-llama", fmt)
        clf = BatchClassifier(str(folder), read_meta(folder), EngineSettings(16, 0.25, 0.5))
        return {"skipped": clf.llm.llm_engine.vllm_config.model_config.skip_tokenizer_init, "out": clf.classify(texts)}

    kind = get_kind("generative")
    one_step, _ = kind.fit_format(PromptFormat(labels=("billing", "other")), tokenizer, ["hi"], load_config().model)
    shared = PromptFormat(labels=("credit_cards", "credit_score", "home"))
    assert one_step.first_tokens_distinct(tokenizer) and not shared.first_tokens_distinct(tokenizer)
    result = {"one_step": run(one_step), "grammar": run(shared)}
    inference.needs_engine_tokenizer = lambda params: True  # the same one-step classifier, vLLM's tokenizer loaded
    result["one_step_with_tokenizer"] = run(one_step)
    print("RESULT " + json.dumps(result))
    """
)


def test_the_engine_loads_a_tokenizer_only_for_requests_that_need_one():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    r = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert r["one_step"]["skipped"] and not r["one_step_with_tokenizer"]["skipped"]
    without, with_ = r["one_step"]["out"], r["one_step_with_tokenizer"]["out"]
    assert [o["label"] for o in without] == [o["label"] for o in with_]
    for a, b in zip(without, with_):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    assert not r["grammar"]["skipped"]
    assert all(o["label"] in ("credit_cards", "credit_score", "home") for o in r["grammar"]["out"])
