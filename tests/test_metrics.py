import json
import math

from textclf.inference import ScoringPlan, parse_output, top_k
from textclf.metrics import compute_metrics, write_report


def test_metrics_match_hand_computed_values():
    gold = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", "b", "b", "b", "c", "a"]
    m = compute_metrics(gold, pred, ["a", "b", "c"])
    # a: p=1/2 r=1/2 f=1/2; b: p=2/3 r=1 f=0.8; c: p=1 r=1/2 f=2/3
    assert math.isclose(m["macro_f1"], (0.5 + 0.8 + 2 / 3) / 3)
    assert math.isclose(m["weighted_f1"], (0.5 + 0.8 + 2 / 3) / 3)  # equal supports
    assert math.isclose(m["accuracy"], 4 / 6)
    assert m["per_class"]["b"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_report_files(tmp_path):
    m = compute_metrics(["a", "b"], ["a", "a"], ["a", "b"])
    write_report(m, [{"text": "t", "gold": "a", "predicted": "a", "probability": 0.9}], tmp_path, {"n_extra": 1})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["macro_f1"] == m["macro_f1"] and saved["n_extra"] == 1
    report = (tmp_path / "report.md").read_text()
    assert "| b | 0.0000 | 0.0000 | 0.0000 | 1 |" in report and "Confusion matrix" in report
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 1


class _Lp:
    def __init__(self, logprob):
        self.logprob = logprob


class _Completion:
    def __init__(self, logprobs=None, text="", cumulative_logprob=None):
        self.logprobs, self.text, self.cumulative_logprob = logprobs, text, cumulative_logprob


def test_one_step_scores_are_a_softmax_over_labels():
    plan = ScoringPlan(("x", "y", "z"), (11, 22, 33))
    out = parse_output(plan, _Completion(logprobs=[{11: _Lp(-3.0), 22: _Lp(-1.0), 33: _Lp(-2.0), 99: _Lp(-0.1)}]))
    assert out["label"] == "y"
    assert math.isclose(sum(out["scores"].values()), 1.0)
    assert math.isclose(out["confidence"], math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    assert list(top_k(out["scores"], 2)) == ["y", "z"]


def test_choice_output_probability_and_refusal():
    plan = ScoringPlan(("credit_cards", "credit_score"), None)
    out = parse_output(plan, _Completion(text="credit_score", cumulative_logprob=math.log(0.25)))
    assert out["label"] == "credit_score" and math.isclose(out["confidence"], 0.25)
    try:
        parse_output(plan, _Completion(text="general", cumulative_logprob=0.0))
    except RuntimeError as e:
        assert "not a label" in str(e)
    else:
        raise AssertionError("a non-label answer must not pass")
