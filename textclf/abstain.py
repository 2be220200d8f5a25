"""Out of scope and abstention: which label of a label set means "none of these", and the abstain threshold
chosen on the validation split's predictions for a stated target (`eval.abstain_target`).

A prediction whose top probability is below the threshold is withheld (the server answers label null,
needs_review true) and, as in Larson et al. 2019 (CLINC150), counts as out of scope. Ray-free: the evaluation
job calls `choose_threshold` on its validation predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .metrics import abstain_figures

OOS_NAMES = ("oos", "out_of_scope", "out-of-scope")  # auto-detected only under exactly these names
NO_OOS = ("", "none")  # data.oos_label values that say the label set has no out-of-scope label
AUTO_PRECISION = 0.95  # auto without an oos label: the answered rows' accuracy to reach
# auto with an oos label: the in-scope accuracy the threshold may cost (the published BERT threshold on CLINC150 cost
# 0.7 points: 96.9 -> 96.2)
AUTO_IN_SCOPE_DROP = 0.01
_EPS = 1e-12  # a share equal to the target in exact arithmetic counts as reaching it


def oos_label(labels: Sequence[str], configured: Optional[str] = None) -> Optional[str]:
    """The out-of-scope label: `configured` when given ("" or "none": there is none), else the one label named
    exactly like OOS_NAMES, else None."""
    if configured is None:
        found = [label for label in labels if label in OOS_NAMES]
        if len(found) > 1:
            raise ValueError(f"labels {found} all look out of scope: set data.oos_label to one of them (or none)")
        return found[0] if found else None
    if configured.strip().lower() in NO_OOS:
        return None
    if configured not in labels:
        raise ValueError(f"data.oos_label {configured!r} is not one of the classifier's labels")
    return configured


@dataclass(frozen=True)
class Target:
    kind: str  # auto, none, balanced, oos_recall, precision or in_scope_drop
    value: Optional[float] = None  # the share to reach (oos_recall, precision) or to give up (in_scope_drop)

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def parse_target(text: str) -> Target:
    """`auto`, `none`, `balanced`, `oos_recall:<share>`, `precision:<share>` or `in_scope_drop:<share>`, a share in
    (0, 1]."""
    s = str(text).strip().lower()
    if s in ("auto", "none", "balanced"):
        return Target(s)
    kind, sep, value = s.partition(":")
    if kind in ("oos_recall", "precision", "in_scope_drop") and sep:
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if 0 < v <= 1:
            return Target(kind, v)
    raise ValueError(
        f"eval.abstain_target must be auto, none, balanced, oos_recall:<share>, precision:<share> or "
        f"in_scope_drop:<share> (a share in (0, 1]), not {text!r}"
    )


def check_target(target: Target, oos: Optional[str]) -> None:
    """Refuse a target the label set cannot have, before any inference runs."""
    if target.kind in ("oos_recall", "balanced", "in_scope_drop") and oos is None:
        raise ValueError(
            f"eval.abstain_target {target} needs an out-of-scope label, and this label set has none "
            f"(set data.oos_label, or use precision:<share>)"
        )


def choose_threshold(
    gold: Sequence[str], pred: Sequence[str], prob: Sequence[float], target: str | Target, oos: Optional[str] = None
) -> dict[str, Any]:
    """The abstain threshold for `target` on validation predictions, and the validation figures at it.

    Candidates are 0 and the distinct finite probabilities. auto: with an oos label (and validation rows both in
    and out of scope), as in_scope_drop:0.01; otherwise as precision:0.95. in_scope_drop:x: the highest candidate
    whose in-scope accuracy is at most x below the one without a threshold (the most oos caught for that cost).
    balanced: the candidate maximising the mean of in-scope accuracy and oos recall, ties to the lower.
    oos_recall:x / precision:x: the lowest candidate whose oos recall / answered accuracy reaches x; none reached
    gives no threshold (None), with `reached` false. none: no threshold.
    """
    target = parse_target(target) if isinstance(target, str) else target
    check_target(target, oos)
    out: dict[str, Any] = {
        "threshold": None,
        "target": str(target),
        "oos_label": oos,
        "rule": None,
        "reached": None,
        "note": None,
        "validation": None,
    }
    if not len(gold):
        out["note"] = "no validation rows: no threshold chosen"
        return out
    g, q, p = np.asarray(gold, dtype=object), np.asarray(pred, dtype=object), np.asarray(prob, dtype=float)
    p_finite = p[np.isfinite(p)]
    candidates = np.unique(np.concatenate([[0.0], p_finite[(p_finite > 0) & (p_finite <= 1)]]))
    sweep = figures_by_threshold(g, q, p, candidates, oos)
    rule, t, note = _rule(target, oos, g), None, None
    if rule == "none":
        out["rule"], note = "none", "no threshold asked for"
    elif rule == "unweighable":
        note = "validation lacks in-scope or out-of-scope rows: no threshold chosen"
    elif rule == "balanced":
        out["rule"] = "max mean(in_scope_accuracy, oos_recall)"
        t = float(candidates[_first_best((sweep["in_scope_accuracy"] + sweep["oos_recall"]) / 2)])
    elif rule == "in_scope_drop":
        drop = target.value if target.value is not None else AUTO_IN_SCOPE_DROP
        out["rule"] = f"highest with in_scope_accuracy at most {drop:g} below no threshold's"
        kept = sweep["in_scope_accuracy"] >= sweep["in_scope_accuracy"][0] - drop - _EPS  # candidates[0] is 0
        t = float(candidates[np.flatnonzero(kept)[-1]])
    else:
        key = "oos_recall" if rule == "oos_recall" else "answered_accuracy"
        share = target.value if target.value is not None else AUTO_PRECISION
        out["rule"] = f"lowest with {key} >= {share:g}"
        if key == "oos_recall" and not (g == oos).any():
            note = "no out-of-scope rows in validation: no threshold chosen"
        else:
            values = np.nan_to_num(sweep[key], nan=0.0)  # nothing answered: no accuracy to reach the target with
            hits = np.flatnonzero(values >= share - _EPS)
            t = float(candidates[hits[0]]) if len(hits) else None
            out["reached"] = t is not None
            if t is None:
                best = _first_best(values)
                note = (
                    f"{key} {share:g} not reached on validation (best {values[best]:.4f} "
                    f"at threshold {candidates[best]:.6g}): no threshold chosen"
                )
        if target.kind == "auto" and oos is not None:  # the oos label is there, but validation cannot weigh it
            fallback = "validation lacks in-scope or out-of-scope rows: auto used precision"
            note = f"{fallback}; {note}" if note else fallback
    out.update(threshold=t, note=note, validation=abstain_figures(g, q, p, t, oos))
    return out


def figures_by_threshold(
    gold: np.ndarray, pred: np.ndarray, prob: np.ndarray, thresholds: np.ndarray, oos: Optional[str]
) -> dict[str, np.ndarray]:
    """`abstain_figures`' shares at every threshold at once (NaN where undefined), from sorted probabilities:
    one pass instead of one per candidate, which would be quadratic in the validation rows."""
    p = np.where(np.isnan(prob), -np.inf, prob)  # no probability: below every threshold, as the server treats it
    correct = gold == pred
    is_oos = gold == oos if oos is not None else np.zeros(len(gold), dtype=bool)

    def below(mask: np.ndarray) -> np.ndarray:  # rows of `mask` with a probability under each threshold
        return np.searchsorted(np.sort(p[mask]), thresholds, side="left")

    def share(num: np.ndarray, den: Any) -> np.ndarray:
        den = np.broadcast_to(np.asarray(den, dtype=float), num.shape)
        return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)

    in_right = correct & ~is_oos
    oos_miss = is_oos & (pred != oos)  # a hit only once abstained
    held = below(np.ones(len(p), dtype=bool))
    return {
        "in_scope_accuracy": share(in_right.sum() - below(in_right), (~is_oos).sum()),
        "oos_recall": share((is_oos & ~oos_miss).sum() + below(oos_miss), is_oos.sum()),
        "abstain_rate": share(held, len(p)),
        "answered_accuracy": share(correct.sum() - below(correct), len(p) - held),
    }


def _rule(target: Target, oos: Optional[str], gold: np.ndarray) -> str:
    both = oos is not None and (gold == oos).any() and (gold != oos).any()
    if target.kind == "auto":
        return "in_scope_drop" if both else "precision"
    if target.kind in ("balanced", "in_scope_drop") and not both:
        return "unweighable"
    return target.kind


def _first_best(values: np.ndarray) -> int:
    """Index of the highest value, the first (the lowest threshold) among ties."""
    return int(np.flatnonzero(values >= np.nanmax(values) - _EPS)[0])
