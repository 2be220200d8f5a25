import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOMAINS = ["auto_and_commute", "banking", "credit_cards", "home", "kitchen_and_dining", "meta", "small_talk",
           "travel", "utility", "work"]


@pytest.fixture(scope="session")
def smollm2_path():
    from textclf.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


# A small run of the real pipeline (2 Ray Train workers, 4 steps, vLLM evaluation), trained once per session and
# shared by the pipeline tests and the serving tests. TEXTCLF_TEST_RUN=<run folder> reuses an existing one.
SMALL = [
    "--max-train-examples", "40", "--max-eval-examples", "30",
    "--num-workers", "2", "--per-device-batch-size", "2", "--max-steps", "4",
    "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1", "--warmup-steps", "1",
    "--kv-cache-gib", "0.25", "--max-num-seqs", "32",
]


def run_step(step, *args, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", f"ray_jobs.{step}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """(runs dir, run dir, the pipeline's output)."""
    given = os.environ.get("TEXTCLF_TEST_RUN")
    if given:
        run = Path(given).resolve()
        return run.parent, run, (run / "pipeline.log").read_text() if (run / "pipeline.log").exists() else ""
    runs = tmp_path_factory.mktemp("runs")
    proc = run_step("pipeline", "--runs-dir", str(runs), "--name", "tiny", *SMALL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    (runs / "tiny" / "pipeline.log").write_text(out)
    return runs, runs / "tiny", out


@pytest.fixture(scope="session")
def tiny_run(tiny_pipeline):
    return tiny_pipeline[1]
