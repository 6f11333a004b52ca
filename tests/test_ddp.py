"""Real 2-process torchrun runs on CPU (gloo)."""
import json

import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from conftest import torchrun, train_args
from test_train import transformers_predictions


def test_two_processes_metrics_equal_sklearn_and_single_process(tiny_model, make_csv, tmp_path):
    train, held = make_csv("train.csv", n=240, seed=3), make_csv("eval.csv", n=101, seed=4)  # odd eval size
    out = tmp_path / "ddp"
    # a token cache of its own: the first rank of the node tokenizes, the other one reads what it wrote
    p = torchrun(2, train_args(tiny_model, train, out, "--eval-file", held, "--epochs", 2,
                               "--cache-dir", tmp_path / "tokens"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.load(open(out / "results.json"))
    assert r["world_size"] == 2
    assert [s["tokenized"] for s in r["setup"]] == [240 + 101, 0], r["setup"]
    assert all(s["peak_rss_mb"] > 50 for s in r["setup"]) and len(r["peak_rss_mb"]) == 2
    df = pd.read_csv(held)
    preds, config = transformers_predictions(out / "last", df.review)
    y = df.label.map(config.label2id).to_numpy()
    assert r["final"]["accuracy"] == pytest.approx(accuracy_score(y, preds), abs=1e-12)
    assert r["final"]["weighted_f1"] == pytest.approx(f1_score(y, preds, average="weighted"), abs=1e-12)
    # one process evaluating the same weights reports the same numbers
    single = evaluate_in_one_process(out / "last", held)
    for key in ("accuracy", "weighted_precision", "weighted_recall", "weighted_f1", "macro_f1"):
        assert single[key] == pytest.approx(r["final"][key], abs=1e-12), key
    assert single["loss"] == pytest.approx(r["final"]["loss"], rel=1e-5)


def evaluate_in_one_process(model_dir, csv):
    import torch
    from bert_finetune import Predictor, data, inference, reading
    from bert_finetune.evaluate import evaluate
    cpu = torch.device("cpu")
    trained = Predictor(str(model_dir), device=cpu)
    table = reading.read_table(csv, "review", "label")
    ids, _ = trained.tokenize(table.text.tolist())
    ds = data.EncodedDataset(ids, trained.labels.encode(table, csv))
    collate = inference.collator(trained.tokenizer, cpu, trained.model.config)
    loader = inference.length_sorted_loader(ds, 16, collate, cpu)
    return evaluate(trained.model, loader, len(trained.labels), cpu).metrics
