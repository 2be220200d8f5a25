import os
from pathlib import Path

import pytest
from support import SMALL, run_step

from serve_app.local import LocalServe

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _console_back():
    """A step's main() run in the test process takes over stdout/stderr (ray_jobs/console.py): give them back."""
    yield
    from ray_jobs import console

    console.detach()


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


@pytest.fixture(scope="module")
def cluster():
    """A local Ray + Serve of the test module's own (own temp dir, free ports); on exit no vLLM process of it may be
    left (LocalServe waits for them and raises)."""
    with LocalServe(env={}) as local:
        yield local
