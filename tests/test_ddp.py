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
    p = torchrun(2, train_args(tiny_model, train, out, "--eval-file", held, "--epochs", 2))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.load(open(out / "results.json"))
    assert r["world_size"] == 2
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
    from bert_finetune import data, distributed, modeling
    from bert_finetune.evaluate import eval_loader, evaluate
    tok = modeling.load_tokenizer(str(model_dir))
    model = modeling.load_classifier(str(model_dir), modeling.load_config(str(model_dir)))
    labels = data.LabelMap.from_config(model.config)
    table = data.read_table(csv, "review", "label")
    ds = data.EncodedDataset(data.tokenize(tok, table.text.tolist(), 32), labels.encode(table, csv))
    loader = eval_loader(ds, 16, distributed.Dist(), data.Collator(tok.pad_token_id))
    return evaluate(model, loader, len(labels), distributed.Dist().device).metrics
