"""Multi-label classification (--task multi_label): label sets from one column or 0/1 columns, BCE, exact metrics
under DDP, tuned thresholds saved with the model and used by predict and evaluate."""
import json
import os
import random

import numpy as np
import pandas as pd
import pytest

from conftest import FILLER, python_m, run_train, torchrun, train_args, write_csv

# each label is told by its own words; a text has any number of them, none included
CUES = {"taste": ["good", "great"], "delivery": ["bad", "awful"], "price": ["boring", "dull"]}


def multi_label_rows(n: int, seed: int, p: float = 0.4) -> list:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = [name for name in CUES if rng.random() < p]
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
        for name in labels:
            words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[name]))
        rows.append({"labels": "|".join(labels), "review": " ".join(words)})
    return rows


def ml_args(model, train_file, out, *extra):
    return train_args(model, train_file, out, "--task", "multi_label", "--label-column", "labels", *extra)
