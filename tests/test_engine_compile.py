"""The CPU engine answers without torch.compile: vLLM compiles small sampler helpers on a first request even with
enforce_eager, seconds of every engine's start (bench/results/engine-start.md). A real vLLM CPU engine on the tiny
random Llama (the plumbing, not the answers), each in a fresh process, since torch reads the setting at import."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from support import ROOT

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent(
    """
    import json
    import torch._dynamo.utils
    from transformers import AutoTokenizer
    from textclf.config import load_config
    from textclf.export import base_classifier, read_meta
    from textclf.inference import BatchClassifier, EngineSettings
    from textclf.kinds import get_kind
    from textclf.models import resolve_model
    from textclf.prompts import PromptFormat

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-random-llama"))
    labels = PromptFormat(labels=("billing", "other"))
    fmt, _ = get_kind("generative").fit_format(labels, tokenizer, ["hi"], load_config().model)
    folder = base_classifier("tiny-random-llama", fmt)
    clf = BatchClassifier(str(folder), read_meta(folder), EngineSettings(16, 0.25, 0.5))
    out = clf.classify(["what is my balance", "hello"])
    print("RESULT " + json.dumps({"out": out, "frames": dict(torch._dynamo.utils.counters["frames"])}))
    """
)


def classify(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "TORCH_COMPILE_DISABLE"} | env
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def test_the_cpu_engine_compiles_nothing_and_gives_the_compiled_engines_answers():
    eager = classify()
    assert eager["frames"] == {}, eager["frames"]
    # the user's setting wins; it also shows that the counter sees the sampler's compile
    compiled = classify(TORCH_COMPILE_DISABLE="0")
    assert compiled["frames"].get("ok", 0) >= 1, compiled["frames"]
    assert eager["out"] == compiled["out"]
