import json
import math

import pytest

from textclf.inference import ScoringPlan, parse_output, top_k
from textclf.metrics import abstain_figures, abstained, calibration, compute_metrics, plot_reliability, write_report


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


def test_metrics_with_labels_outside_the_list_and_an_unseen_class():
    # "?" (an unparsed answer) is outside the list; "c" is never gold nor predicted
    gold = ["a", "a", "a", "b", "?"]
    pred = ["a", "a", "?", "a", "b"]
    m = compute_metrics(gold, pred, ["a", "b", "c"])
    # a: tp 2, predicted 3, support 3 -> p=2/3 r=2/3 f=2/3; b: tp 0 -> 0s, support 1; c: 0s, support 0
    assert math.isclose(m["per_class"]["a"]["f1"], 2 / 3)
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert math.isclose(m["macro_f1"], (2 / 3) / 3)
    assert math.isclose(m["macro_precision"], (2 / 3) / 3)
    assert math.isclose(m["weighted_f1"], (2 / 3) * 3 / 4)  # weights: supports 3, 1, 0
    assert math.isclose(m["accuracy"], 2 / 5)  # every row counts, "?" rows too
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 0, 0], [0, 0, 0]]  # rows and columns outside the list dropped


def test_metrics_refuse_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        compute_metrics(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics([], [], ["a"])


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
    out = parse_output(plan, [_Completion(logprobs=[{11: _Lp(-3.0), 22: _Lp(-1.0), 33: _Lp(-2.0), 99: _Lp(-0.1)}])])
    assert out["label"] == "y"
    assert math.isclose(sum(out["scores"].values()), 1.0)
    assert math.isclose(out["confidence"], math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    assert list(top_k(out["scores"], 2)) == ["y", "z"]


def test_choice_output_probability_and_refusal():
    plan = ScoringPlan(("credit_cards", "credit_score"), None)
    out = parse_output(plan, [_Completion(text="credit_score", cumulative_logprob=math.log(0.25))])
    assert out["label"] == "credit_score" and math.isclose(out["confidence"], 0.25)
    try:
        parse_output(plan, [_Completion(text="general", cumulative_logprob=0.0)])
    except RuntimeError as e:
        assert "not a label" in str(e)
    else:
        raise AssertionError("a non-label answer must not pass")


# -- calibration and abstention ---------------------------------------------------------------------------------


def test_ece_of_a_calibrated_toy_case_is_zero():
    # ten rows at 0.8 with eight right, ten at 0.3 with three right: accuracy equals confidence in both bins
    gold = ["a"] * 20
    pred = ["a"] * 8 + ["b"] * 2 + ["a"] * 3 + ["b"] * 7
    cal = calibration(gold, pred, [0.8] * 10 + [0.3] * 10)
    assert cal["ece"] == pytest.approx(0.0, abs=1e-12) and cal["n"] == 20 and len(cal["bins"]) == 15
    assert sum(b["count"] for b in cal["bins"]) == 20


def test_ece_of_an_over_confident_case():
    # four rows at 0.95 with two right (gap 0.45), two at 0.55 with one right (gap 0.05)
    gold = ["a"] * 6
    pred = ["a", "a", "b", "b", "a", "b"]
    cal = calibration(gold, pred, [0.95] * 4 + [0.55] * 2)
    assert cal["ece"] == pytest.approx(4 / 6 * 0.45 + 2 / 6 * 0.05)
    top, mid = cal["bins"][14], cal["bins"][8]  # (14/15, 1] and (8/15, 9/15]
    assert (top["count"], top["accuracy"], top["confidence"]) == (4, 0.5, pytest.approx(0.95))
    assert (mid["count"], mid["accuracy"], mid["confidence"]) == (2, 0.5, pytest.approx(0.55))
    assert cal["bins"][0]["count"] == 0 and cal["bins"][0]["accuracy"] is None
    assert calibration(["a", "a"], ["a", "a"], [0.0, float("nan")])["bins"][0]["count"] == 1  # 0 in bin 0, NaN out


def test_abstain_figures_by_hand():
    gold = ["a", "a", "b", "b", "oos", "oos", "oos", "a"]
    pred = ["a", "a", "b", "a", "a", "oos", "b", "a"]
    prob = [0.9, 0.8, 0.6, 0.4, 0.3, 0.7, 0.5, 0.45]
    f = abstain_figures(gold, pred, prob, 0.45, "oos")  # abstains the rows at 0.3 and 0.4
    assert f["in_scope_accuracy"] == 4 / 5  # the four right in-scope rows are all answered
    assert f["oos_recall"] == 2 / 3  # 0.3 abstained, 0.7 predicted oos; 0.5 answered b
    assert f["abstain_rate"] == 2 / 8 and f["answered_accuracy"] == 5 / 6 and f["answered"] == 6
    f = abstain_figures(gold, pred, prob, None, "oos")
    assert f["abstain_rate"] == 0 and f["oos_recall"] == 1 / 3 and f["answered_accuracy"] == 5 / 8
    f = abstain_figures(gold, pred, prob, 0.45, None)  # no oos label: every row is in scope
    assert f["oos_recall"] is None and f["in_scope_accuracy"] == 5 / 8  # "oos" is just a label here: one more right
    assert abstain_figures(["a"], ["a"], [0.2], 0.5)["answered_accuracy"] is None  # nothing answered
    assert abstained(float("nan"), 0.0) and abstained(0.4, 0.5) and not abstained(0.5, 0.5) and not abstained(0.1, None)


def test_reliability_plot_and_report_sections(tmp_path):
    gold, pred, prob = ["a", "b", "a"], ["a", "b", "b"], [0.9, 0.7, 0.6]
    cal = calibration(gold, pred, prob)
    plot_reliability(cal, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    m = compute_metrics(gold, pred, ["a", "b"])
    choice = {
        "threshold": 0.65,
        "target": "auto",
        "oos_label": None,
        "note": None,
        "validation": abstain_figures(gold, pred, prob, 0.65),
    }
    write_report(
        m,
        [],
        tmp_path,
        {"ece": cal["ece"], "calibration": cal["bins"], "abstain": choice, **abstain_figures(gold, pred, prob, 0.65)},
    )
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report.md").read_text()
    assert "## Calibration" in report and "## Out of scope and abstention" in report and "threshold: 0.65" in report
    assert json.loads((tmp_path / "metrics.json").read_text())["abstain"]["threshold"] == 0.65


def test_batch_classifier_passes_row_tags_through():
    """The evaluation tags each row with its split and index; the classifier's output keeps them (no engine)."""
    import numpy as np

    from textclf.inference import BatchClassifier

    clf = object.__new__(BatchClassifier)
    clf.classify = lambda texts: [{"label": "a", "confidence": 0.5, "truncated": False} for _ in texts]
    batch = {
        "text": np.array(["x", "y"]),
        "label": np.array(["a", "b"]),
        "split": np.array(["validation", "test"]),
        "row": np.array([3, 0]),
    }
    out = clf(batch)
    assert out["split"] == ["validation", "test"] and out["row"] == [3, 0] and out["gold"] == ["a", "b"]
    assert out["predicted"] == ["a", "a"] and "label" not in out
