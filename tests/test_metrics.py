import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from bert_finetune import metrics


@pytest.mark.parametrize("num_labels,seed", [(2, 0), (3, 1), (5, 2), (4, 3)])
def test_confusion_metrics_equal_sklearn(num_labels, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_labels, 301)
    # a class never predicted and, for 5 labels, one never present: zero-division paths
    p = np.where(rng.random(301) < 0.7, y, rng.integers(0, num_labels, 301))
    p[p == 1] = 0
    if num_labels == 5:
        y[y == 4] = 3
    got = metrics.from_confusion(metrics.confusion_matrix(y, p, num_labels))
    assert got["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
    for avg in ("weighted", "macro"):
        pr, rc, f1, _ = precision_recall_fscore_support(y, p, average=avg, zero_division=0)
        assert got[f"{avg}_precision"] == pytest.approx(pr, abs=1e-12)
        assert got[f"{avg}_recall"] == pytest.approx(rc, abs=1e-12)
        assert got[f"{avg}_f1"] == pytest.approx(f1, abs=1e-12)


def test_summed_shard_matrices_equal_the_whole():
    rng = np.random.default_rng(7)
    y, p = rng.integers(0, 3, 101), rng.integers(0, 3, 101)
    parts = [metrics.confusion_matrix(y[i::2], p[i::2], 3) for i in range(2)]
    assert (sum(parts) == metrics.confusion_matrix(y, p, 3)).all()


def test_better_respects_direction():
    assert metrics.better("accuracy", 0.9, 0.8) and not metrics.better("accuracy", 0.8, 0.8)
    assert metrics.better("loss", 0.1, 0.2) and not metrics.better("loss", 0.3, 0.2)
    assert metrics.better("loss", 5.0, None)
