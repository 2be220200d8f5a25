"""A label set larger than the token ids vLLM scores in one request (its MAX_LOGPROB_TOKEN_IDS, 128): the evaluation's
batch classifier on a real vLLM CPU engine gives every one of 200 labels a probability (the tiny random Llama, so only
the plumbing is checked, not the answers). CLINC150's 151 labels failed here before the requests were split."""

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
    from textclf.config import load_config
    from textclf.export import base_classifier, read_meta
    from textclf.inference import BatchClassifier, EngineSettings
    from textclf.kinds import get_kind
    from textclf.models import resolve_model
    from textclf.prompts import PromptFormat

    labels = tuple(f"intent {w} {i}" for i, w in enumerate(["open", "close", "move", "check"] * 50))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-random-llama"))
    fmt, _ = get_kind("generative").fit_format(PromptFormat(labels=labels), tokenizer, ["hi"], load_config().model)
    folder = base_classifier("tiny-random-llama", fmt)
    clf = BatchClassifier(str(folder), read_meta(folder), EngineSettings(16, 0.25, 0.5))
    print("RESULT " + json.dumps(clf.classify(["what is my balance", "book a flight to rome"])))
    """
)


def test_every_label_of_a_large_label_set_gets_a_probability_from_the_engine():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for r in results:
        assert len(r["scores"]) == 200 and abs(sum(r["scores"].values()) - 1) < 1e-4
        assert r["label"] == max(r["scores"], key=r["scores"].get) and r["confidence"] == r["scores"][r["label"]]
