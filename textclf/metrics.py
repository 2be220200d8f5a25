"""Classification metrics and the evaluation report (metrics.json, report.md, confusion_matrix.png,
reliability.png): per-class scores, calibration (ECE), and the out-of-scope / abstention figures of Larson et al.
2019 (CLINC150), where a prediction below the abstain threshold counts as out of scope."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


def compute_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy over every row; per-class, macro and support-weighted precision/recall/F1 and the confusion matrix
    (rows gold, columns predicted) over `labels`, as scikit-learn computes them with zero_division=0. Not with
    scikit-learn: installed, it and SciPy are imported by transformers in every vLLM process, ~3 s of each start
    (bench/results/engine-start.md)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no predictions to score")
    labels = list(labels)
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    g = np.asarray([index.get(x, k) for x in gold])  # k: a label outside the list
    q = np.asarray([index.get(x, k) for x in pred])
    cm = np.zeros((k + 1, k + 1), dtype=np.int64)
    np.add.at(cm, (g, q), 1)
    tp = np.diag(cm)[:k].astype(float)
    support = cm[:k, :].sum(axis=1)
    p = _ratio(tp, cm[:, :k].sum(axis=0))
    r = _ratio(tp, support)
    f = _ratio(2 * p * r, p + r)
    weights = support / support.sum() if support.sum() else np.zeros(k)
    return {
        "n": len(gold),
        "accuracy": float(np.mean([g == q for g, q in zip(gold, pred)])),
        "macro_f1": float(f.mean()),
        "macro_precision": float(p.mean()),
        "macro_recall": float(r.mean()),
        "weighted_f1": float((f * weights).sum()),
        "per_class": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "labels": labels,
        "confusion_matrix": cm[:k, :k].tolist(),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    den = np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(den), where=den > 0)


ECE_BINS = 15


def calibration(
    gold: Sequence[str], pred: Sequence[str], prob: Sequence[float], bins: int = ECE_BINS
) -> dict[str, Any]:
    """Expected calibration error over equal-width bins of the top probability (bin i holds (i/bins, (i+1)/bins],
    the first also 0): the count-weighted mean of |accuracy - mean confidence|. Rows without a finite probability
    are left out."""
    p = np.asarray(prob, dtype=float)
    correct = np.asarray([g == q for g, q in zip(gold, pred)], dtype=bool)
    keep = np.isfinite(p)
    p, correct = np.clip(p[keep], 0.0, 1.0), correct[keep]
    idx = np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        acc = float(correct[m].mean()) if n else None
        conf = float(p[m].mean()) if n else None
        if n:
            ece += n / len(p) * abs(acc - conf)
        out.append({"lower": b / bins, "upper": (b + 1) / bins, "count": n, "accuracy": acc, "confidence": conf})
    return {"ece": float(ece) if len(p) else None, "n": int(len(p)), "bins": out}


def abstained(prob: float, threshold: Optional[float]) -> bool:
    """As the server decides: below the threshold the prediction is withheld (a NaN probability never passes)."""
    return threshold is not None and not (prob >= threshold)


def abstain_figures(
    gold: Sequence[str],
    pred: Sequence[str],
    prob: Sequence[float],
    threshold: Optional[float],
    oos_label: Optional[str] = None,
) -> dict[str, Any]:
    """Figures at one abstain threshold (None: never abstain). in_scope_accuracy: gold in-scope rows predicted
    correctly and not abstained; oos_recall: gold out-of-scope rows predicted out of scope or abstained (None
    without an oos label or oos rows); abstain_rate: rows below the threshold; answered_accuracy: accuracy of
    the rows not abstained (None when none is answered)."""
    g, q = np.asarray(gold, dtype=object), np.asarray(pred, dtype=object)
    p = np.asarray(prob, dtype=float)
    held = ~(p >= threshold) if threshold is not None else np.zeros(len(p), dtype=bool)
    correct = g == q
    is_oos = g == oos_label if oos_label is not None else np.zeros(len(g), dtype=bool)
    n_in, n_oos, n_answered = int((~is_oos).sum()), int(is_oos.sum()), int((~held).sum())

    def share(num: int, den: int) -> Optional[float]:
        return num / den if den else None

    return {
        "n": len(g),
        "in_scope_accuracy": share(int((correct & ~held & ~is_oos).sum()), n_in),
        "oos_recall": share(int((is_oos & ((q == oos_label) | held)).sum()), n_oos) if oos_label is not None else None,
        "abstain_rate": share(int(held.sum()), len(g)),
        "answered_accuracy": share(int((correct & ~held).sum()), n_answered),
        "answered": n_answered,
    }


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def abstain_markdown(metrics: dict[str, Any]) -> list[str]:
    """The report's section on calibration and abstention (empty when the metrics have neither)."""
    lines: list[str] = []
    if "ece" in metrics:
        lines += [
            "",
            "## Calibration",
            "",
            f"ECE ({len(metrics.get('calibration', [])) or ECE_BINS} equal-width bins of the top probability) "
            f"= {_fmt(metrics['ece'])}; reliability diagram: reliability.png",
        ]
    a = metrics.get("abstain")
    if a is None:
        return lines
    t = a.get("threshold")
    lines += [
        "",
        "## Out of scope and abstention",
        "",
        f"oos label: {a.get('oos_label') or 'none'}; target: {a.get('target')}; "
        f"threshold: {'none' if t is None else f'{t:.6g}'}" + (f" ({a['note']})" if a.get("note") else ""),
        "",
        "| split | in-scope accuracy | oos recall | abstain rate | answered accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    v = a.get("validation")
    if v:
        lines.append(
            f"| validation ({v['n']}) | {_fmt(v['in_scope_accuracy'])} | {_fmt(v['oos_recall'])} | "
            f"{_fmt(v['abstain_rate'])} | {_fmt(v['answered_accuracy'])} |"
        )
    if "abstain_rate" in metrics:
        lines.append(
            f"| test ({metrics['n']}) | {_fmt(metrics.get('in_scope_accuracy'))} | "
            f"{_fmt(metrics.get('oos_recall'))} | {_fmt(metrics['abstain_rate'])} | "
            f"{_fmt(metrics.get('answered_accuracy'))} |"
        )
    return lines


def report_markdown(metrics: dict[str, Any], title: str = "Evaluation") -> str:
    labels = metrics["labels"]
    lines = [
        f"# {title}",
        "",
        f"n = {metrics['n']}, accuracy = {metrics['accuracy']:.4f}, macro-F1 = {metrics['macro_f1']:.4f}, "
        f"weighted-F1 = {metrics['weighted_f1']:.4f}",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in labels:
        c = metrics["per_class"][label]
        lines.append(f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines += [
        f"| **macro avg** | {metrics['macro_precision']:.4f} | {metrics['macro_recall']:.4f} | "
        f"{metrics['macro_f1']:.4f} | {metrics['n']} |",
        "",
        "## Confusion matrix (rows: gold, columns: predicted)",
        "",
        "| gold \\ pred | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for label, row in zip(labels, metrics["confusion_matrix"]):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    lines += abstain_markdown(metrics)
    return "\n".join(lines) + "\n"


def plot_confusion_matrix(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = metrics["labels"]
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"macro-F1 {metrics['macro_f1']:.3f}, n = {metrics['n']}")
    if len(labels) <= 30:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="row share")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(cal: dict[str, Any], path: Path) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with each bin's row count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = cal["bins"]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 1.0
    full = [b for b in bins if b["count"]]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(
        [b["lower"] for b in full],
        [b["accuracy"] for b in full],
        width=width,
        align="edge",
        edgecolor="black",
        color="tab:blue",
        label="accuracy",
    )
    ax.bar(
        [b["lower"] for b in full],
        [b["confidence"] - b["accuracy"] for b in full],
        bottom=[b["accuracy"] for b in full],
        width=width,
        align="edge",
        color="none",
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
        zorder=3,
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ece = cal.get("ece")
    ax.set_title(f"ECE {ece:.3f}, n = {cal.get('n')}" if ece is not None else "no rows")
    ax.legend(loc="upper left", fontsize=8)
    hx.bar(
        [b["lower"] for b in bins],
        [b["count"] for b in bins],
        width=width,
        align="edge",
        color="gray",
        edgecolor="black",
    )
    hx.set_xlabel("top probability")
    hx.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    metrics: dict[str, Any], predictions: list[dict[str, Any]], out_dir: Path, extra: dict | None = None
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    full = {**metrics, **(extra or {})}
    (out_dir / "metrics.json").write_text(json.dumps(full, indent=2))
    (out_dir / "report.md").write_text(report_markdown(full))
    plot_confusion_matrix(metrics, out_dir / "confusion_matrix.png")
    if full.get("calibration"):
        bins = full["calibration"]
        plot_reliability(
            {"ece": full.get("ece"), "n": sum(b["count"] for b in bins), "bins": bins}, out_dir / "reliability.png"
        )
    with (out_dir / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
