"""Out-of-scope detection and the abstain threshold chosen on hand-made validation predictions (no Ray, no vLLM)."""

import math

import pytest

from textclf.abstain import Target, choose_threshold, oos_label, parse_target
from textclf.config import load_config

# (gold, predicted, top probability); candidates 0, .3, .4, .45, .5, .6, .7, .8, .9
VAL = [
    ("a", "a", 0.9),
    ("a", "a", 0.8),
    ("b", "b", 0.6),
    ("b", "a", 0.4),  # wrong, low
    ("oos", "a", 0.3),  # out of scope taken for a, low
    ("oos", "oos", 0.7),  # always an oos hit
    ("oos", "b", 0.5),
    ("a", "a", 0.45),
]


def cols(rows):
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


# -- the out-of-scope label -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, want",
    [
        (["a", "oos"], "oos"),
        (["out_of_scope", "a"], "out_of_scope"),
        (["a", "out-of-scope"], "out-of-scope"),
        (["a", "b"], None),
        (["a", "OOS"], None),
        (["a", "oos_extra"], None),  # exact names only
    ],
)
def test_oos_label_auto(labels, want):
    assert oos_label(labels) == want


def test_oos_label_configured():
    assert oos_label(["a", "oos"], "none") is None and oos_label(["a", "oos"], "") is None  # there is none
    assert oos_label(["a", "other"], "other") == "other"
    with pytest.raises(ValueError, match="not one of"):
        oos_label(["a", "b"], "oos")
    with pytest.raises(ValueError, match="data.oos_label"):
        oos_label(["oos", "out_of_scope"])  # two candidates: ambiguous


def test_config_keys():
    cfg = load_config()
    assert cfg.data.oos_label is None and cfg.eval.abstain_target == "auto"
    assert load_config(overrides={"oos_label": "none"}).data.oos_label == "none"  # kept: it means "there is none"
    assert load_config(overrides={"oos_label": ""}).data.oos_label == ""
    assert load_config(overrides={"data.oos_label": "other"}).data.oos_label == "other"
    assert load_config(overrides={"abstain_target": "oos_recall:0.7"}).eval.abstain_target == "oos_recall:0.7"
    with pytest.raises(ValueError, match="abstain_target"):
        load_config(overrides={"abstain_target": "recall:0.7"})


# -- targets ----------------------------------------------------------------------------------------------------


def test_parse_target():
    assert parse_target("auto") == Target("auto") and parse_target(" None ") == Target("none")
    assert parse_target("oos_recall:0.7") == Target("oos_recall", 0.7)
    assert parse_target("precision:1") == Target("precision", 1.0)
    assert parse_target("in_scope_drop:0.02") == Target("in_scope_drop", 0.02)
    assert parse_target("balanced") == Target("balanced")
    assert str(parse_target("precision:0.95")) == "precision:0.95"
    for bad in ("precision", "precision:", "precision:0", "precision:1.5", "precision:x", "recall:0.5", "0.9"):
        with pytest.raises(ValueError, match="abstain_target"):
            parse_target(bad)


def test_balanced_maximises_mean_of_in_scope_accuracy_and_oos_recall():
    c = choose_threshold(*cols(VAL), "balanced", "oos")
    # at 0.6: in-scope 3/5 correct and answered, oos 3/3 (two abstained), mean 0.8, the best of all candidates
    assert c["threshold"] == 0.6 and c["target"] == "balanced" and c["oos_label"] == "oos" and c["note"] is None
    v = c["validation"]
    assert v["in_scope_accuracy"] == pytest.approx(0.6) and v["oos_recall"] == 1.0
    assert v["abstain_rate"] == 0.5 and v["answered_accuracy"] == 1.0 and v["n"] == 8 and v["answered"] == 4


def test_balanced_ties_go_to_the_lower_threshold():
    rows = [("a", "a", 0.9), ("a", "b", 0.6), ("oos", "a", 0.4), ("oos", "a", 0.95)]
    # mean 0.5 at both 0.6 (abstains the oos row at 0.4) and 0.9 (also the wrong in-scope row at 0.6)
    assert choose_threshold(*cols(rows), "balanced", "oos")["threshold"] == 0.6


@pytest.mark.parametrize(
    "target, want, oos_recall",
    [
        # in-scope 4/5 without a threshold and up to 0.45; 3/5 from 0.5 (the right row at 0.45 abstains) to 0.6
        ("auto", 0.45, 2 / 3),  # in_scope_drop:0.01: the highest threshold still at 4/5
        ("in_scope_drop:0.01", 0.45, 2 / 3),
        ("in_scope_drop:0.2", 0.6, 1.0),  # 3/5 is 0.2 below
    ],
)
def test_auto_gives_up_at_most_a_point_of_in_scope_accuracy(target, want, oos_recall):
    c = choose_threshold(*cols(VAL), target, "oos")
    assert c["threshold"] == want and c["validation"]["oos_recall"] == pytest.approx(oos_recall)
    assert "in_scope_accuracy" in c["rule"] and c["note"] is None


def test_targets_that_weigh_oos_need_both_kinds_of_rows():
    in_scope = [("a", "a", 0.9), ("a", "b", 0.4)]
    for target in ("balanced", "in_scope_drop:0.05"):
        c = choose_threshold(*cols(in_scope), target, "oos")
        assert c["threshold"] is None and "lacks" in c["note"]
        with pytest.raises(ValueError, match="out-of-scope label"):
            choose_threshold(*cols(in_scope), target, None)


@pytest.mark.parametrize(
    "target, want",
    [
        ("oos_recall:0.3", 0.0),  # 1/3 already
        ("oos_recall:0.6", 0.4),  # 2/3 once the row at 0.3 abstains
        ("oos_recall:1", 0.6),
        ("precision:0.8", 0.45),  # 5/6; 0.5 gives 4/5 too, but 0.45 is lower
        ("precision:0.95", 0.6),  # 4/4
    ],
)
def test_lowest_threshold_reaching_the_target(target, want):
    c = choose_threshold(*cols(VAL), target, "oos")
    assert c["threshold"] == want and c["reached"] is True and c["target"] == target


def test_target_not_reached_gives_no_threshold():
    rows = [("a", "a", 0.9), ("oos", "a", 0.95)]  # the most confident row is an oos miss
    c = choose_threshold(*cols(rows), "oos_recall:1", "oos")
    assert c["threshold"] is None and c["reached"] is False and "not reached" in c["note"]
    assert c["validation"]["abstain_rate"] == 0.0  # the figures without a threshold


def test_none_target():
    c = choose_threshold(*cols(VAL), "none", "oos")
    assert c["threshold"] is None and c["validation"]["abstain_rate"] == 0.0
    assert c["validation"]["oos_recall"] == pytest.approx(1 / 3)


def test_no_validation_rows():
    c = choose_threshold([], [], [], "auto", "oos")
    assert c["threshold"] is None and c["validation"] is None and "no validation rows" in c["note"]


def test_no_oos_label_auto_is_precision_095():
    rows = [("a", "a", 0.9), ("b", "b", 0.8), ("a", "b", 0.7), ("b", "b", 0.6)]
    c = choose_threshold(*cols(rows), "auto", None)
    assert c["threshold"] == 0.8 and c["oos_label"] is None and c["validation"]["answered_accuracy"] == 1.0
    assert c["validation"]["oos_recall"] is None and c["validation"]["in_scope_accuracy"] == 0.5
    right = [("a", "a", 0.9), ("b", "b", 0.3)]
    assert choose_threshold(*cols(right), "auto", None)["threshold"] == 0.0  # already precise: answer everything


def test_oos_targets_need_an_oos_label_and_oos_rows():
    with pytest.raises(ValueError, match="out-of-scope label"):
        choose_threshold(*cols(VAL), "oos_recall:0.5", None)
    in_scope = [r for r in VAL if r[0] != "oos"]
    c = choose_threshold(*cols(in_scope), "oos_recall:0.5", "oos")
    assert c["threshold"] is None and "no out-of-scope rows" in c["note"]
    c = choose_threshold(*cols(in_scope), "auto", "oos")  # auto falls back to precision 0.95 and says so
    assert c["threshold"] == 0.45 and "auto used precision" in c["note"]  # abstains the wrong row at 0.4


def test_nan_probability_always_abstains():
    rows = [("a", "a", 0.9), ("a", "a", math.nan)]
    c = choose_threshold(*cols(rows), "precision:0.5", None)
    assert c["threshold"] == 0.0 and c["validation"]["abstain_rate"] == 0.5  # as the server: NaN never passes


def test_sweep_matches_figures_at_each_threshold():
    import random

    import numpy as np

    from textclf.abstain import figures_by_threshold
    from textclf.metrics import abstain_figures

    rng = random.Random(0)
    labels = ["a", "b", "oos"]
    rows = [
        (rng.choice(labels), rng.choice(labels), rng.choice([0.2, 0.5, 0.5, 0.9, rng.random(), math.nan]))
        for _ in range(200)
    ]
    g, q, p = (np.asarray(c, dtype=object if i < 2 else float) for i, c in enumerate(cols(rows)))
    thresholds = np.array([0.0, 0.2, 0.3, 0.5, 0.9, 1.0])
    for oos in ("oos", None):
        sweep = figures_by_threshold(g, q, p, thresholds, oos)
        for i, t in enumerate(thresholds):
            f = abstain_figures(g, q, p, float(t), oos)
            for key, values in sweep.items():
                want = f[key] if f[key] is not None else math.nan
                assert values[i] == pytest.approx(want, nan_ok=True), (oos, t, key)
