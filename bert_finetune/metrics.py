"""Metrics from a confusion matrix (rows: true label, columns: predicted). Pure numpy.

The formulas are scikit-learn's (zero_division=0, labels = those present in truth or
predictions), so that a confusion matrix summed over ranks gives the numbers sklearn gives on
the same predictions gathered in one place.
"""
import numpy as np


def confusion_matrix(labels, preds, num_labels: int) -> np.ndarray:
    flat = np.asarray(labels, dtype=np.int64) * num_labels + np.asarray(preds, dtype=np.int64)
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _divide(num, den):
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def per_class(cm: np.ndarray) -> dict:
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    return {
        "precision": _divide(tp, predicted),
        "recall": _divide(tp, support),
        "f1": _divide(2 * tp, 2 * tp + (predicted - tp) + (support - tp)),
        "support": support,
        "present": (support + predicted) > 0,
    }


def from_confusion(cm: np.ndarray) -> dict:
    """accuracy, weighted_* and macro_* precision/recall/F1 as plain floats."""
    cm = np.asarray(cm, dtype=np.int64)
    total = cm.sum()
    c = per_class(cm)
    out = {"accuracy": float(np.trace(cm) / total) if total else 0.0}
    present, support = c["present"], c["support"]
    for name in ("precision", "recall", "f1"):
        values = c[name]
        out[f"weighted_{name}"] = float(np.average(values, weights=support)) if support.sum() else 0.0
        out[f"macro_{name}"] = float(values[present].mean()) if present.any() else 0.0
    return out


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether `new` beats `old` (lower loss, else higher); a nan or infinite value never does."""
    if not np.isfinite(new):
        return False
    if old is None:
        return True
    return new < old if metric == "loss" else new > old
