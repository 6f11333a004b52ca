"""Real (tiny) training runs in one process: outputs, learning, metrics against sklearn."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import run_train, train_args


def transformers_predictions(model_dir, texts, max_length=32):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        enc = tok(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return model(**enc).logits.argmax(-1).numpy(), model.config


def test_tiny_model_learns_and_writes_every_output(tiny_model, make_csv, tmp_path):
    out = tmp_path / "out"
    r = run_train(train_args(tiny_model, make_csv(n=400), out, "--epochs", 3, "--save-total-limit", 2))
    assert r["best"]["accuracy"] > 0.9, r["evaluations"]  # chance is 0.5
    assert r["world_size"] == 1 and len(r["evaluations"]) == 3
    assert r["train_samples_per_s"] > 0 and r["train_tokens_per_s"] > r["train_samples_per_s"]
    for d in ("best", "last"):
        assert os.path.isfile(out / d / "model.safetensors") and os.path.isfile(out / d / "tokenizer_config.json")
    # the label names live in the saved config
    config = json.load(open(out / "best" / "config.json"))
    assert set(config["id2label"].values()) == {"neg", "pos"}
    checkpoints = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert len(checkpoints) == 2  # rotated to --save-total-limit
    assert any(os.path.isfile(os.path.join(out, "runs", r_, f)) for r_ in os.listdir(out / "runs")
               for f in os.listdir(out / "runs" / r_) if f.startswith("events.out.tfevents"))


def test_final_metrics_equal_sklearn_on_transformers_predictions(tiny_model, make_csv, tmp_path):
    out = tmp_path / "out"
    train, held = make_csv("train.csv", n=300, seed=1), make_csv("eval.csv", n=101, seed=2)
    r = run_train(train_args(tiny_model, train, out, "--eval-file", held, "--epochs", 1))
    df = pd.read_csv(held)
    preds, config = transformers_predictions(out / "last", df.review)
    y = df.label.map(config.label2id).to_numpy()
    assert r["final"]["accuracy"] == pytest.approx(accuracy_score(y, preds), abs=1e-12)
    assert r["final"]["weighted_f1"] == pytest.approx(f1_score(y, preds, average="weighted"), abs=1e-12)
    assert r["final"]["macro_f1"] == pytest.approx(f1_score(y, preds, average="macro"), abs=1e-12)


def test_best_is_the_best_epoch_and_last_the_final_weights(tiny_model, make_csv, tmp_path):
    out = tmp_path / "out"
    r = run_train(train_args(tiny_model, make_csv(n=200), out, "--epochs", 3, "--metric-for-best", "loss"))
    losses = [e["loss"] for e in r["evaluations"]]
    assert r["best"]["loss"] == min(losses) and r["final"] == r["evaluations"][-1]
    best, last = load_file(out / "best" / "model.safetensors"), load_file(out / "last" / "model.safetensors")
    same = all(torch.equal(best[k], last[k]) for k in best)
    assert same == (r["best"]["step"] == r["final"]["step"])


def scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "runs" / os.listdir(out / "runs")[0]))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_grad_accumulation_matches_a_larger_batch(tiny_model, make_csv, tmp_path):
    """2 x 4 accumulated = one batch of 8, the short last group included (9 micro-batches: the last group has
    one, scaled by 1, as the last batch of 4 is), with clipping on: the logged loss and gradient norm of every
    step and the final weights agree (random sampler order is the same; dropout off)."""
    csv = make_csv(n=48)  # 36 training rows
    cfg = tmp_path / "nodrop"
    from conftest import build_tiny_model
    model = build_tiny_model(str(cfg))
    c = json.load(open(cfg / "config.json"))
    c["hidden_dropout_prob"] = c["attention_probs_dropout_prob"] = 0.0
    json.dump(c, open(cfg / "config.json", "w"))
    common = ["--epochs", 1, "--sampler", "random", "--max-grad-norm", 0.0005, "--eval-split", 0.25, "--log-steps", 1]
    a = train_args(model, csv, tmp_path / "a", *common)
    b = train_args(model, csv, tmp_path / "b", *common, "--grad-accum", 2)
    b[b.index("--batch-size") + 1] = "4"
    ra, rb = run_train(a), run_train(b)
    assert ra["steps"] == rb["steps"] == 5
    for tag in ("train/loss", "train/grad_norm"):
        (steps, want), (_, got) = zip(*scalars(tmp_path / "a", tag)), zip(*scalars(tmp_path / "b", tag))
        assert list(steps) == [1, 2, 3, 4, 5]
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=tag)
    assert min(v for _, v in scalars(tmp_path / "a", "train/grad_norm")) > 0.0005  # clipping was at work
    wa, wb = (load_file(tmp_path / d / "last" / "model.safetensors") for d in ("a", "b"))
    w0 = load_file(os.path.join(model, "model.safetensors"))
    moved = max((wa[k] - w0[k]).abs().max().item() for k in wa if k in w0)
    # equal up to float noise from the two batch shapes (Adam magnifies it in early steps), far below the move
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < moved / 20


def test_fp16_grad_scaler_path_on_cpu(tiny_model, make_csv, tmp_path):
    r = run_train(train_args(tiny_model, make_csv(n=400), tmp_path / "o", "--epochs", 3, "--precision", "fp16"))
    assert r["precision"] == "fp16" and np.isfinite(r["final"]["loss"])
    assert r["best"]["accuracy"] > 0.8  # it learns through the scaler (chance: 0.5)


def test_split_is_seeded_and_stratified(tiny_model, make_csv, tmp_path):
    from bert_finetune import data, reading
    table = reading.read_table(make_csv(n=101), "review", "label")
    a, b = data.split(table, 0.2, 3, "x"), data.split(table, 0.2, 3, "x")
    assert a[1]["row"].tolist() == b[1]["row"].tolist()
    assert abs(a[1]["label"].value_counts()["pos"] - a[1]["label"].value_counts()["neg"]) <= 1
    assert not set(a[0]["row"]) & set(a[1]["row"])


def test_predict_cli_prints_label_and_probability(tiny_model, make_csv, tmp_path):
    from conftest import python_m
    out = tmp_path / "out"
    run_train(train_args(tiny_model, make_csv(n=300), out, "--epochs", 3))
    p = python_m("bert_finetune.predict", ["--model", out / "best", "--text", "the movie was good",
                                           "--text", "an awful plot"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["pos", "neg"]
    assert all(0.5 < float(ln.split("\t")[1]) <= 1 for ln in lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision(tiny_model, make_csv, tmp_path, precision):
    r = run_train(train_args(tiny_model, make_csv(n=200), tmp_path / "o", "--epochs", 2, "--precision", precision))
    assert r["precision"] == precision and r["best"]["accuracy"] > 0.6


def test_freeze_embeddings_trains_everything_but_the_word_embeddings(tiny_model, make_csv, tmp_path):
    r = run_train(train_args(tiny_model, make_csv(n=80), tmp_path / "o", "--epochs", 1, "--freeze-embeddings"))
    before = load_file(os.path.join(tiny_model, "model.safetensors"))
    after = load_file(str(tmp_path / "o" / "last" / "model.safetensors"))
    word = next(k for k in after if k.endswith("word_embeddings.weight"))
    assert torch.equal(before[word], after[word])
    assert not torch.equal(before["bert.embeddings.position_embeddings.weight"],
                           after["bert.embeddings.position_embeddings.weight"])
    assert r["config"]["freeze_embeddings"] is True


def test_a_fine_tuned_model_trains_on_for_another_number_of_labels(tmp_path):
    """A folder whose head has 2 labels fine-tunes on 3: the head is new, the encoder is kept."""
    from safetensors.torch import load_file

    from conftest import build_tiny_model, synthetic_rows, write_csv
    model = build_tiny_model(str(tmp_path / "two-labels"), num_labels=2)
    csv = write_csv(tmp_path / "train.csv", synthetic_rows(60, 0, labels=("neg", "neu", "pos")))
    r = run_train(train_args(model, csv, tmp_path / "out", "--epochs", 1, "--lr", 1e-9))
    assert r["labels"] == ["neg", "neu", "pos"]
    before, after = load_file(f"{model}/model.safetensors"), load_file(tmp_path / "out" / "last" / "model.safetensors")
    assert after["classifier.weight"].shape[0] == 3
    key = "bert.encoder.layer.0.output.dense.weight"  # a tiny lr: the encoder as loaded, not drawn anew
    assert torch.allclose(before[key], after[key], atol=1e-6)
