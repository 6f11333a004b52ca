"""The fine-tuning recipes: head/tail truncation, layer-wise learning rates, balanced class weights, sentence
pairs, evaluation every N steps with early stopping (one process and two)."""
import json
import os
import random
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import FILLER, NEGATIVE, POSITIVE, python_m, run_train, synthetic_rows, torchrun, train_args, write_csv

from bert_finetune import checkpoint, data, modeling, optim
from bert_finetune.errors import UserError


# ---------------------------------------------------------------- truncation

def test_truncate_keeps_head_tail_or_both():
    ids = np.arange(100)
    assert data.truncate(ids, 10, "head").tolist() == list(range(10))
    assert data.truncate(ids, 10, "tail").tolist() == list(range(90, 100))
    assert data.truncate(ids, 10, "head_tail", 3).tolist() == [0, 1, 2] + list(range(93, 100))
    assert data.truncate(ids, 10, "head_tail", 10).tolist() == list(range(10))
    assert data.truncate(ids[:7], 10, "head_tail", 3).tolist() == list(range(7))  # short texts are kept whole
    # the default head is a quarter of the budget: the paper's 128 + 382 of 510
    assert data.default_head_tokens(510) == 128 and data.default_head_tokens(254) == 64
    assert data.truncate(ids, 20, "head_tail").tolist() == list(range(5)) + list(range(85, 100))


def test_head_tail_keeps_first_k_and_last_tokens_around_the_special_tokens(tiny_model):
    tok = modeling.load_tokenizer(tiny_model)
    words = (FILLER * 3)[:50]
    body = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(body) == 50
    cls, sep = tok.cls_token_id, tok.sep_token_id
    ht = data.tokenize(tok, [" ".join(words)], 12, "head_tail", 3)[0].tolist()
    assert ht == [cls] + body[:3] + body[-7:] + [sep]  # 12 = [CLS] + 3 + 7 + [SEP]
    tail = data.tokenize(tok, [" ".join(words)], 12, "tail")[0].tolist()
    assert tail == [cls] + body[-10:] + [sep]
    # head is the tokenizer's own truncation; slicing gives the same ids
    assert data.tokenize(tok, [" ".join(words)], 12)[0].tolist() == [cls] + body[:10] + [sep]
    # short and empty texts are untouched
    assert data.tokenize(tok, ["good movie", ""], 12, "head_tail", 3)[0].tolist() == \
        tok(["good movie"])["input_ids"][0]
    assert data.tokenize(tok, [""], 12, "head_tail", 3)[0].tolist() == [cls, sep]


def test_token_cache_key_includes_the_truncation(tiny_model, tmp_path):
    tok = modeling.load_tokenizer(tiny_model)
    texts = [" ".join(FILLER * 2), "good movie"]
    head = data.tokenize_cached(tok, texts, 12, str(tmp_path))
    ht = data.tokenize_cached(tok, texts, 12, str(tmp_path), "head_tail", 3)
    ht4 = data.tokenize_cached(tok, texts, 12, str(tmp_path), "head_tail", 4)
    assert len(os.listdir(tmp_path)) == 3
    assert [x.tolist() for x in ht] == [x.tolist() for x in data.tokenize(tok, texts, 12, "head_tail", 3)]
    assert head[0].tolist() != ht[0].tolist() != ht4[0].tolist()
    again = data.tokenize_cached(tok, texts, 12, str(tmp_path), "head_tail", 3)  # read back from the cache
    assert [x.tolist() for x in again] == [x.tolist() for x in ht]


def long_rows(n, seed):
    """Long texts whose label is told only by their LAST word: head truncation cannot see it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(40, 60))] + [rng.choice(POSITIVE if y else NEGATIVE)]
        rows.append({"label": "pos" if y else "neg", "review": " ".join(words)})
    return rows


def test_head_tail_learns_the_end_and_predict_applies_it(tiny_model, tmp_path):
    from bert_finetune.predict import Predictor
    train = write_csv(tmp_path / "train.csv", long_rows(300, 1))
    held = write_csv(tmp_path / "eval.csv", long_rows(100, 2))
    common = ("--eval-file", held, "--epochs", 3)
    head = run_train(train_args(tiny_model, train, tmp_path / "head", *common))
    ht = run_train(train_args(tiny_model, train, tmp_path / "ht", *common, "--truncation", "head_tail",
                              "--head-tokens", 8))
    assert head["best"]["accuracy"] < 0.7 < 0.9 < ht["best"]["accuracy"], (head["best"], ht["best"])
    saved = json.load(open(tmp_path / "ht" / "best" / "bert_finetune.json"))
    assert saved["truncation"] == "head_tail" and saved["head_tokens"] == 8
    predictor = Predictor(str(tmp_path / "ht" / "best"))
    texts = pd.read_csv(held)["review"].tolist()
    ids, _ = predictor.tokenize(texts)
    truncated = predictor.truncated(ids, texts)
    expected = data.tokenize(predictor.tokenizer, texts, 32, "head_tail", 8)
    assert [x.tolist() for x in ids] == [x.tolist() for x in expected]
    assert truncated.all()
    probs = predictor.probabilities(texts)
    assert (np.array(predictor.labels.names)[probs.argmax(1)] == pd.read_csv(held)["label"]).mean() > 0.9
    p = python_m("bert_finetune.evaluate", ["--model", tmp_path / "ht" / "best", "--data", held,
                                            "--output-dir", tmp_path / "ev"])
    assert p.returncode == 0, p.stderr
    assert json.load(open(tmp_path / "ev" / "eval_results.json"))["metrics"]["accuracy"] == pytest.approx(
        ht["best"]["accuracy"], abs=1e-12)


# ---------------------------------------------------------------- layer-wise learning rates

def test_each_group_learning_rate_equals_the_formula(tiny_model):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)  # 2 encoder layers
    lr, x = 1e-3, 0.5
    expected_depth = {"classifier": 0, "pooler": 0, "encoder.layer.1.": 1, "encoder.layer.0.": 2, "embeddings": 3}
    opt = optim.build_optimizer(model, lr, 0.01, layer_decay=x)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            depth = next(d for key, d in expected_depth.items() if key in name)
            assert group["lr"] == pytest.approx(lr * x ** depth), name
            assert group["weight_decay"] == (0.0 if optim.is_no_decay(name, p) else 0.01), name
            seen.append(name)
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    assert opt.param_groups[0]["lr"] == lr  # the head comes first: the logged lr is the head's
    # the schedule scales every group by the same factor
    scheduler = optim.build_scheduler(opt, 2, 10)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * optim.lr_factor(0, 2, 10))
    opt.step(), scheduler.step()
    assert [g["lr"] / g["initial_lr"] for g in opt.param_groups] == pytest.approx(
        [optim.lr_factor(1, 2, 10)] * len(opt.param_groups))
    # off (1.0): the two no-decay groups at one lr, as before
    assert [g["name"] for g in optim.param_groups(model, 0.01, lr, 1.0)] == ["decay", "no_decay"]


def test_layer_depth_counts_from_the_top():
    assert optim.count_layers(["bert.encoder.layer.0.x", "bert.encoder.layer.11.y", "classifier.weight"]) == 12
    assert optim.layer_depth("bert.encoder.layer.11.attention.self.query.weight", 12) == 1
    assert optim.layer_depth("bert.encoder.layer.0.output.dense.bias", 12) == 12
    assert optim.layer_depth("bert.embeddings.word_embeddings.weight", 12) == 13
    assert optim.layer_depth("distilbert.transformer.layer.5.ffn.lin1.weight", 6) == 1
    assert optim.layer_depth("classifier.weight", 12) == optim.layer_depth("bert.pooler.dense.weight", 12) == 0
    assert optim.layer_lr(2e-5, 0.95, 3) == pytest.approx(2e-5 * 0.95 ** 3)


# ---------------------------------------------------------------- class weights

def test_balanced_weights_equal_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight
    rng = np.random.default_rng(0)
    y = rng.choice(4, size=997, p=[0.6, 0.25, 0.1, 0.05])
    ours = data.balanced_class_weights(y, 4)
    np.testing.assert_allclose(ours, compute_class_weight("balanced", classes=np.arange(4), y=y), rtol=1e-15)
    np.testing.assert_allclose(data.balanced_class_weights([0] * 180 + [1] * 20, 2), [200 / 360, 5.0])


def test_class_weights_and_layer_decay_in_a_run(tiny_model, tmp_path, capsys, monkeypatch):
    from sklearn.utils.class_weight import compute_class_weight
    rows = synthetic_rows(300, seed=5)
    rows = [r for r in rows if r["label"] == "neg"] + [r for r in rows if r["label"] == "pos"][:50]  # 150:50
    train = write_csv(tmp_path / "imb.csv", rows)
    held = write_csv(tmp_path / "eval.csv", synthetic_rows(60, seed=6))
    calls, cross_entropy = [], torch.nn.functional.cross_entropy

    def recorded(logits, targets, weight=None, reduction="mean", **kw):
        loss = cross_entropy(logits, targets, weight=weight, reduction=reduction, **kw)
        calls.append((logits.detach().clone(), targets.clone(), weight, reduction, loss.detach()))
        return loss
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recorded)
    r = run_train(train_args(tiny_model, train, tmp_path / "o", "--eval-file", held, "--epochs", 1,
                             "--class-weights", "balanced", "--layer-lr-decay", 0.8))
    monkeypatch.undo()
    # every training step's loss is the weighted mean, computed here independently; held-out losses are not weighted
    training = [c for c in calls if c[3] == "mean"]
    held_out = [c for c in calls if c[3] == "sum"]
    assert len(training) == 25 and held_out and all(c[2] is None for c in held_out)
    w = torch.tensor([200 / (2 * 150), 200 / (2 * 50)])  # n / (classes x count)
    for logits, y, weight, _, loss in training:
        assert torch.allclose(weight.cpu(), w)
        picked = -torch.log_softmax(logits.float(), -1).gather(1, y[:, None])[:, 0]
        assert torch.allclose(loss, (w[y] * picked).sum() / w[y].sum(), rtol=1e-5)
    y = pd.read_csv(train)["label"]
    expected = compute_class_weight("balanced", classes=np.array(["neg", "pos"]), y=y)
    assert r["class_weights"] == pytest.approx(dict(zip(["neg", "pos"], expected)), rel=1e-12)
    assert r["class_weights"]["pos"] == pytest.approx(2.0)
    out = capsys.readouterr().out
    assert "class weights (balanced): neg 0.6667, pos 2.0000" in out
    assert f"learning rates: head {2e-3:.2e}, layer 1 {2e-3 * 0.8:.2e}, layer 0 {2e-3 * 0.64:.2e}, " \
           f"embeddings {2e-3 * 0.512:.2e}" in out


# ---------------------------------------------------------------- sentence pairs

def pair_rows(n, seed):
    """The label sits only in the second text (`hypothesis`); the first is filler."""
    rows = []
    for row in synthetic_rows(n, seed):
        rng = random.Random(row["review"])
        cue = rng.choice(POSITIVE if row["label"] == "pos" else NEGATIVE)
        rows.append({"label": row["label"], "review": " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 15))),
                     "hypothesis": f"the {cue} film"})
    return rows


def test_text_pair_run_trains_and_predicts(tiny_model, tmp_path, capsys):
    from bert_finetune.predict import Predictor
    train = write_csv(tmp_path / "train.csv", pair_rows(300, 1))
    held = write_csv(tmp_path / "eval.csv", pair_rows(100, 2))
    # the collate carries the token type ids: 0 for [CLS] a [SEP], 1 for b [SEP]
    tok = modeling.load_tokenizer(tiny_model)
    ids, types = data.tokenize_pairs(tok, ["the movie"], ["good film"], 32)
    batch = data.Collator(0)([data.EncodedDataset(ids, [1], None, types)[0]])
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]

    r = run_train(train_args(tiny_model, train, tmp_path / "o", "--eval-file", held, "--epochs", 3,
                             "--text-pair-column", "hypothesis"))
    assert r["best"]["accuracy"] > 0.9, r["evaluations"]  # chance is 0.5: the pair was read
    best = tmp_path / "o" / "best"
    assert json.load(open(best / "bert_finetune.json"))["text_pair_column"] == "hypothesis"
    df = pd.read_csv(held)
    probs = Predictor(str(best)).probabilities(df["review"].tolist(), pairs=df["hypothesis"].tolist())
    assert (np.array(["neg", "pos"])[probs.argmax(1)] == df["label"]).mean() > 0.9
    with pytest.raises(UserError, match="sentence pairs"):
        Predictor(str(best)).probabilities(df["review"].tolist())

    from bert_finetune import predict
    capsys.readouterr()
    predict.main(["--model", str(best), "--text", "the city night", "--text-pair", "a superb film",
                  "--text", "the road", "--text-pair", "an awful film"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["pos", "neg"] and lines[0].endswith("the city night\ta superb film")
    predict.main(["--model", str(best), "--input", held, "--output", str(tmp_path / "p.csv")])  # pair column from json
    got = pd.read_csv(tmp_path / "p.csv")
    assert (got["prediction"] == got["label"]).mean() > 0.9
    with pytest.raises(SystemExit) as e:
        predict.main(["--model", str(best), "--text", "a superb film"])
    assert e.value.code == 2 and "--text-pair" in capsys.readouterr().err
    p = python_m("bert_finetune.evaluate", ["--model", best, "--data", held, "--output-dir", tmp_path / "ev"])
    assert p.returncode == 0, p.stderr
    assert json.load(open(tmp_path / "ev" / "eval_results.json"))["metrics"]["accuracy"] == pytest.approx(
        r["best"]["accuracy"], abs=1e-12)


# ---------------------------------------------------------------- evaluation every N steps, early stopping

def test_early_stopping_under_two_processes_stops_both_ranks_at_one_step(tiny_model, make_csv, tmp_path):
    out = tmp_path / "es"
    # a learning rate this small cannot move the metric: after the first evaluation nothing improves
    p = torchrun(2, train_args(tiny_model, make_csv(n=400), out, "--epochs", 5, "--lr", 1e-12, "--eval-steps", 2,
                               "--early-stopping-patience", 2, "--dist-timeout", 30, "--save-total-limit", 100))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.load(open(out / "results.json"))
    assert r["world_size"] == 2 and r["steps"] == 6  # of 5 x 20 planned
    assert r["stopped"]["step"] == 6 and r["stopped"]["reason"] == "early_stopping"
    assert "has not improved for 2 evaluations" in r["stopped"]["message"]
    assert [e["step"] for e in r["evaluations"]] == [2, 4, 6] and r["best_step"] == 2
    assert "early stopping: accuracy has not improved for 2 evaluations" in p.stdout
    # the last checkpoint was written at step 6 with both ranks' RNG states: both ranks were there
    newest = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-step"))[-1]
    assert newest == "checkpoint-step000006"
    state = torch.load(out / newest / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["train_state"]["evals_without_improvement"] == 2
    assert os.path.isfile(out / "best" / "model.safetensors") and os.path.isfile(out / "last" / "model.safetensors")


def test_early_stopping_resumes_bitwise_with_its_patience_counter(tiny_model, make_csv, tmp_path):
    csv = make_csv(n=200)
    # a learning rate far too high: the held-out loss rises within a few evaluations on any CPU's numerics
    args = ("--epochs", 6, "--eval-steps", 3, "--early-stopping-patience", 2, "--metric-for-best", "loss",
            "--save-total-limit", 1000, "--seed", 3, "--lr", 0.02)
    straight = tmp_path / "straight"
    r = run_train(train_args(tiny_model, csv, straight, *args))
    assert r["stopped"]["reason"] == "early_stopping" and r["steps"] < 6 * 20, r["evaluations"]
    losses = [e["loss"] for e in r["evaluations"]]
    assert r["best"]["loss"] == min(losses) and losses[-1] > r["best"]["loss"] and losses[-2] > r["best"]["loss"]
    assert r["best_step"] == r["best"]["step"]
    # resume from the checkpoint of the evaluation before the stop: the counter (1) comes back with it
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    before = f"checkpoint-step{r['evaluations'][-2]['step']:06d}"
    shutil.copytree(straight / before, resumed / before)
    saved = torch.load(resumed / before / "training_state.pt", weights_only=True)
    assert saved["train_state"]["evals_without_improvement"] == 1
    # written as checkpoints were before TrainState (its dict under "progress", the evaluations under "epochs"):
    # it still resumes exactly
    progress = saved.pop("train_state")
    saved["progress"] = {**progress, "epochs": progress.pop("evaluations")}
    torch.save(saved, resumed / before / "training_state.pt")
    with open(resumed / before / "manifest.json", "w") as f:
        json.dump(checkpoint._manifest(str(resumed / before)), f)
    again = run_train(train_args(tiny_model, csv, resumed, *args, "--resume", "auto"))
    assert again["stopped"] == r["stopped"] and again["evaluations"] == r["evaluations"]
    a, b = load_file(straight / "last" / "model.safetensors"), load_file(resumed / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- settings

def test_head_tokens_beyond_the_budget_is_one_line(tiny_model, make_csv, tmp_path):
    args = train_args(tiny_model, make_csv(n=40), tmp_path / "o", "--truncation", "head_tail", "--head-tokens", 30)
    p = python_m("bert_finetune.train", ["--single-gpu", *args])
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --head-tokens 30 leaves no room for head and tail: --max-length 32 keeps 30 tokens besides the "
        "special ones"]
    assert not os.path.exists(tmp_path / "o")
