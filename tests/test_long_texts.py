"""A data set whose texts are 25 times longer than the bundled ones (about 250 tokens, a third of them over the
cap) trains on the defaults' fitted max_length, and the run says how many rows it cut (issue: any labelled data set
trains on the defaults)."""

import json
import re
from pathlib import Path

import pytest
from support import ROOT, SMALL, run_step

pytestmark = pytest.mark.e2e


def longer(src: Path, dst: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in src.read_text().splitlines()[:n]]
    texts = [" ".join([r["text"]] * 25) for r in rows]
    dst.write_text("".join(json.dumps({"text": t, "label": r["label"]}) + "\n" for t, r in zip(texts, rows)))
    return texts


def test_long_texts_train_and_report_what_was_cut(tmp_path, tokenizer):
    data = ROOT / "data" / "clinc150"
    texts = longer(data / "train.jsonl", tmp_path / "train.jsonl", 40)
    texts += longer(data / "validation.jsonl", tmp_path / "validation.jsonl", 10)
    # The text budget is capped by max_text_tokens (256 by default): rows over it must be cut, and reported.
    over_cap = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > 256 for t in texts)
    assert over_cap > 0
    # One worker and two steps: the run only has to finish on the fitted length (the slowest e2e test otherwise).
    args = [a for a in SMALL if a not in ("--max-train-examples", "--max-eval-examples", "40", "30")]
    args += ["--num-workers", "1", "--max-steps", "2"]
    proc = run_step(
        "train",
        *("--runs-dir", str(tmp_path / "runs"), "--name", "long"),
        *("--train-file", str(tmp_path / "train.jsonl"), "--validation-file", str(tmp_path / "validation.jsonl")),
        *args,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    plan = re.search(r"\[plan\] max_length (\d+) \(from the data.*?\); (\d+) train/validation rows cut", out)
    assert plan, out[-6000:]
    max_length, cut = int(plan.group(1)), int(plan.group(2))
    assert over_cap <= cut < len(texts) and max_length > 256
    assert "step 2/2" in out
