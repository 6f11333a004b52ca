"""Multi-label data (--task multi_label): label sets <-> 0/1 rows, the seeded iteratively stratified split, and
the per-label positive weights of --class-weights balanced. The metrics and thresholds are metrics.py's.

A table's `label` column holds one tuple of label names per row (reading.read_table with label_sep or
label_columns); the empty tuple is a text with no label, every label negative.
"""
import numpy as np
import pandas as pd

from . import reading
from .errors import UserError


def label_names(sets, columns: list | None = None) -> list:
    """The labels: --label-columns in their order, else every label seen, sorted (numbers as numbers)."""
    if columns:
        return list(columns)
    seen = {name for s in sets for name in s}
    try:
        return sorted(seen, key=int)
    except ValueError:
        return sorted(seen)


def indicators(table: pd.DataFrame, ids: dict, path: str) -> np.ndarray:
    """[rows, labels] of 0/1 (int64); a label the model does not know is one UserError naming its row."""
    out = np.zeros((len(table), len(ids)), dtype=np.int64)
    for row, labels in enumerate(table["label"]):
        for name in labels:
            if name not in ids:
                raise UserError(f"{path}: {reading.row_unit(table)} {table['row'].iloc[row]}: label '{name}' is not "
                                f"one the model knows ({', '.join(ids)})")
            out[row, ids[name]] = 1
    return out


def iterative_split(y: np.ndarray, eval_fraction: float, seed: int) -> np.ndarray:
    """Which rows go to the held-out set (bool), by iterative stratification (Sechidis, Tsoumakas and Vlahavas,
    ECML 2011): the rarest label's rows are placed first, each where that label still lacks the most rows, so
    every label's share of the held-out set is near eval_fraction, which a random split misses for rare labels.
    Written here (40 lines, seeded by --seed through numpy) rather than taken from iterative-stratification,
    which would be a required dependency for this one function."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y, dtype=bool)
    n = len(y)
    n_eval = int(np.ceil(n * eval_fraction))
    want = np.array([n - n_eval, n_eval], dtype=np.float64)  # rows each side still needs: train, held-out
    per_label = np.outer(want / n, y.sum(axis=0))  # [2, labels]: each label's rows each side still needs
    side = np.full(n, -1)
    left = y.copy()  # labels of rows not placed yet
    while left.any():
        counts = left.sum(axis=0).astype(np.float64)
        counts[counts == 0] = np.inf
        rarest = np.flatnonzero(counts == counts.min())
        label = rng.choice(rarest)
        for row in rng.permutation(np.flatnonzero(left[:, label])):
            need = per_label[:, label]
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:  # tie: the side that needs more rows overall, then chance
                best = best[want[best] == want[best].max()]
            s = best[0] if len(best) == 1 else rng.choice(best)
            side[row] = s
            want[s] -= 1
            per_label[s, y[row]] -= 1
            left[row] = False
    for row in rng.permutation(np.flatnonzero(side < 0)):  # rows with no label: where rows are still needed
        s = int(np.argmax(want)) if want[0] != want[1] else int(rng.integers(2))
        side[row] = s
        want[s] -= 1
    return side == 1


def split(table: pd.DataFrame, y: np.ndarray, eval_fraction: float, seed: int, path: str, names: list):
    """(train table, held-out table): seeded, identical on every rank; a label too rare to be on both sides is
    an error, as a class is for single-label data."""
    held = iterative_split(y, eval_fraction, seed)
    if held.all() or not held.any():
        raise UserError(f"{path}: {len(table)} rows are too few for a {1 - eval_fraction:.0%}/{eval_fraction:.0%} "
                        f"split; add rows or pass --eval-file")
    one_side = [n for n, train_has, eval_has in zip(names, y[~held].any(0), y[held].any(0))
                if not (train_has and eval_has)]
    if one_side:
        raise UserError(f"{path}: label(s) {', '.join(one_side[:10])} have too few rows to be on both sides of the "
                        f"{1 - eval_fraction:.0%}/{eval_fraction:.0%} split (each needs at least two); add rows "
                        f"or pass --eval-file")
    return table[~held].reset_index(drop=True), table[held].reset_index(drop=True)


def positive_weights(y: np.ndarray) -> np.ndarray:
    """--class-weights balanced for multi-label data: per label, negatives / positives among the training rows
    (BCE's pos_weight), so that each label's positives weigh as much as its negatives; a label with no positive
    row gets 1."""
    y = np.asarray(y, dtype=np.float64)
    positives = y.sum(axis=0)
    return np.where(positives > 0, (len(y) - positives) / np.maximum(positives, 1), 1.0)
