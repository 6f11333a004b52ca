"""Metrics from a confusion matrix (rows: true label, columns: predicted), and multi-label metrics and thresholds
from per-label counts. Pure numpy.

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
    return new < old if metric in LOWER_IS_BETTER else new > old


# ---------------------------------------------------------------- multi-label: counts, metrics, thresholds
#
# Every figure below comes from sums over examples: per-label true/false positives and false negatives, the
# per-example precision/recall/F1 (samples averages) and the exact-match count. Each rank sums its shard; the
# sums added over ranks give scikit-learn's numbers (zero_division=0) on all predictions gathered in one place.

LOWER_IS_BETTER = ("loss", "hamming_loss")
THRESHOLD_BINS = 1000  # tuned thresholds are multiples of 1/1000
# the summary reported for the other thresholds too (0.5 beside tuned ones, tuned beside a fixed one)
SUMMARY = ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "hamming_loss")


def predicted(probs: np.ndarray, thresholds) -> np.ndarray:
    """Which labels each example gets: probability at or over its label's threshold."""
    return np.asarray(probs) >= np.asarray(thresholds, dtype=np.float32)


def multi_label_sums(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """This shard's sums, one float64 vector to all-reduce: tp, fp, fn per label, then the per-example
    precision, recall and F1 summed, the exact matches and the example count."""
    y, pred = np.asarray(y, dtype=bool), np.asarray(pred, dtype=bool)
    tp, fp, fn = (y & pred), (~y & pred), (y & ~pred)
    tp_i, pred_i, true_i = tp.sum(1), pred.sum(1), y.sum(1)
    per_example = [_divide(tp_i, pred_i).sum(), _divide(tp_i, true_i).sum(), _divide(2 * tp_i, pred_i + true_i).sum(),
                   float((y == pred).all(1).sum()), float(len(y))]
    return np.concatenate([tp.sum(0), fp.sum(0), fn.sum(0), per_example]).astype(np.float64)


def from_multi_label_sums(sums: np.ndarray, num_labels: int) -> tuple[dict, dict]:
    """(metrics, per-label arrays) from summed multi_label_sums(): micro/macro/weighted/samples precision, recall
    and F1, subset accuracy (also as accuracy, as scikit-learn's accuracy_score names it) and Hamming loss;
    per label precision, recall, f1, support and the counts tp, fp, fn, tn."""
    sums = np.asarray(sums, dtype=np.float64)
    tp, fp, fn = (sums[i * num_labels:(i + 1) * num_labels] for i in range(3))
    p_sum, r_sum, f1_sum, exact, n = sums[3 * num_labels:]
    support = tp + fn
    per = {"precision": _divide(tp, tp + fp), "recall": _divide(tp, support), "f1": _divide(2 * tp, 2 * tp + fp + fn),
           "support": support.astype(np.int64), "tp": tp.astype(np.int64), "fp": fp.astype(np.int64),
           "fn": fn.astype(np.int64), "tn": (n - tp - fp - fn).astype(np.int64)}
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    out = {"micro_precision": float(_divide(TP, TP + FP)), "micro_recall": float(_divide(TP, TP + FN)),
           "micro_f1": float(_divide(2 * TP, 2 * TP + FP + FN))}
    for name in ("precision", "recall", "f1"):
        out[f"macro_{name}"] = float(per[name].mean())
        out[f"weighted_{name}"] = float(np.average(per[name], weights=support)) if support.sum() else 0.0
    out.update({"samples_precision": float(_divide(p_sum, n)), "samples_recall": float(_divide(r_sum, n)),
                "samples_f1": float(_divide(f1_sum, n)), "subset_accuracy": float(_divide(exact, n)),
                "hamming_loss": float(_divide(FP + FN, n * num_labels))})
    out["accuracy"] = out["subset_accuracy"]
    return out, per


def score_histograms(probs: np.ndarray, y: np.ndarray, bins: int = THRESHOLD_BINS) -> np.ndarray:
    """[2, labels, bins] int64: how many negative (0) and positive (1) examples of each label have a probability
    in each 1/bins-wide bin; summed over ranks they give every candidate threshold's counts exactly."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=bool)
    num_labels = probs.shape[1]
    which = np.clip(np.floor(probs * bins), 0, bins - 1).astype(np.int64) + bins * np.arange(num_labels)
    out = np.zeros((2, num_labels * bins), dtype=np.int64)
    for positive in (0, 1):
        mask = y == bool(positive)
        out[positive] = np.bincount(which[mask], minlength=num_labels * bins)
    return out.reshape(2, num_labels, bins)


def tuned_thresholds(histograms: np.ndarray) -> np.ndarray:
    """Per label, the threshold k/bins (0 < k < bins) that maximises the label's F1 on the scored examples; where
    a range of thresholds ties, the middle of the widest such range, away from either side's nearest example. A
    label with no positive example keeps 0.5."""
    negatives, positives = np.asarray(histograms, dtype=np.int64)
    bins = negatives.shape[1]
    out = np.full(negatives.shape[0], 0.5)
    for label in range(len(out)):
        # at threshold k/bins the examples in bins k and above are predicted positive
        tp = np.cumsum(positives[label][::-1])[::-1][1:]
        fp = np.cumsum(negatives[label][::-1])[::-1][1:]
        fn = positives[label].sum() - tp
        f1 = _divide(2 * tp, 2 * tp + fp + fn)
        if f1.max() <= 0:
            continue
        best = np.flatnonzero(f1 == f1.max())
        runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
        widest = max(runs, key=len)
        out[label] = (widest[(len(widest) - 1) // 2] + 1) / bins
    return out
