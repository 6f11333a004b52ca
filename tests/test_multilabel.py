"""Multi-label classification (--task multi_label): label sets from one column or 0/1 columns, BCE, exact metrics
under DDP, tuned thresholds saved with the model and used by predict and evaluate."""
import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from bert_finetune import config, metrics, multilabel, reading
from bert_finetune.errors import UserError
from bert_finetune.inference import Predictor
from conftest import FILLER, ROOT, build_tiny_model, env, python_m, run_train, torchrun, train_args, write_csv
from test_resume import assert_bitwise_equal, kill_job, start, train_cmd, wait_for_checkpoints

# each label is told by its own words; a text has any number of them, none included
CUES = {"taste": ["good", "great"], "delivery": ["bad", "awful"], "price": ["boring", "dull"]}
NAMES = sorted(CUES)


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


def as_columns(rows) -> list:
    """The same rows with one 0/1 column per label instead of the joined label column."""
    return [{"review": r["review"], **{n: int(n in r["labels"].split("|")) for n in NAMES}} for r in rows]


def indicator(rows) -> np.ndarray:
    return np.array([[n in r["labels"].split("|") for n in NAMES] for r in rows], dtype=int)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def ml_args(model, train_file, out, *extra):
    # a tiny model of width 64: width 32 learns three keywords at once too slowly for a short test
    return train_args(model, train_file, out, "--task", "multi_label", "--label-column", "labels", "--lr", "2e-3",
                      "--batch-size", 16, *extra)


def transformers_multi_label(model_dir, texts):
    """transformers' own sigmoid probabilities for the saved folder, and the saved thresholds."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        enc = tok(list(texts), truncation=True, max_length=32, padding=True, return_tensors="pt")
        probs = model(**enc).logits.sigmoid().numpy()
    with open(os.path.join(model_dir, "bert_finetune.json")) as f:
        chosen = json.load(f)["thresholds"]
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return probs, np.array([chosen[n] for n in names]), names


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    model = build_tiny_model(str(root / "init"), num_labels=3, hidden=64, heads=4)
    train_rows, held_rows = multi_label_rows(320, 0), multi_label_rows(61, 1)  # an odd held-out size
    return root, model, train_rows, held_rows


@pytest.fixture(scope="module")
def trained(setup):
    root, model, train_rows, held_rows = setup
    train, held = write_csv(root / "train.csv", train_rows), write_csv(root / "held.csv", held_rows)
    out = root / "one"
    r = run_train(ml_args(model, train, out, "--eval-file", held, "--epochs", 10, "--logging-dir", root / "runs",
                          "--run-name", "one"))
    return root, out, r, train, held, held_rows


def test_learns_keywords_with_tuned_thresholds_and_writes_them(trained):
    root, out, r, _, _, held_rows = trained
    assert r["best"]["micro_f1"] >= 0.9, [e["micro_f1"] for e in r["evaluations"]]
    assert any(not row["labels"] for row in held_rows)  # texts with no label are examples too
    # both the metrics at the chosen (tuned) thresholds and at 0.5, every evaluation
    assert all("micro_f1_at_0.5" in e and set(e["thresholds"]) == set(NAMES) for e in r["evaluations"])
    saved = read_json(out / "best" / "bert_finetune.json")
    assert saved["thresholds"] == r["best"]["thresholds"] and saved["task"] == "multi_label"
    config_json = read_json(out / "best" / "config.json")
    assert config_json["problem_type"] == "multi_label_classification"
    assert sorted(config_json["id2label"].values()) == NAMES
    # TensorBoard: per-label PR curves, F1 and thresholds, micro/macro F1 per evaluation
    acc = EventAccumulator(str(root / "runs" / "one"), size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    acc.Reload()
    steps = [e["step"] for e in r["evaluations"]]
    for tag in ["eval/micro_f1", "eval/macro_f1", *(f"eval_label_f1/{n}" for n in NAMES),
                *(f"eval_threshold/{n}" for n in NAMES)]:
        assert [s.step for s in acc.Scalars(tag)] == steps, tag
    assert acc.Scalars("eval_threshold/taste")[-1].value == pytest.approx(r["final"]["thresholds"]["taste"])
    assert set(acc.PluginTagToContent("pr_curves")) == {f"eval_pr/{n}" for n in NAMES}
    assert [i.step for i in acc.Images("eval/confusion_per_label")] == steps


def test_pipeline_predict_and_evaluate_use_the_saved_model_and_thresholds(trained):
    root, out, r, _, held, held_rows = trained
    best = str(out / "best")
    texts = [row["review"] for row in held_rows]
    # transformers' pipeline reads the folder and applies a sigmoid per label: our probabilities
    scored = pipeline("text-classification", model=best, top_k=None, device="cpu")(texts[:5])
    ours = Predictor(best, device=torch.device("cpu")).probabilities(texts[:5])
    theirs = np.array([[{d["label"]: d["score"] for d in row}[n] for n in NAMES] for row in scored])
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    # predict: the labels over the saved thresholds, and every label's probability
    p = python_m("bert_finetune.predict", ["--model", best, "--input", held, "--output", "-"])
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    thresholds = r["best"]["thresholds"]
    for row in rows:
        assert set(row["probabilities"]) == set(NAMES)
        assert row["prediction"] == [n for n in NAMES if row["probabilities"][n] >= round(thresholds[n], 6)]
    # evaluate on the held-out file: the best evaluation's numbers, at the saved thresholds
    p = python_m("bert_finetune.evaluate", ["--model", best, "--data", held, "--output-dir", root / "ev"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "micro avg" in p.stdout and "samples avg" in p.stdout and "Hamming loss" in p.stdout
    judged = read_json(root / "ev" / "eval_results.json")
    for key in ("micro_f1", "macro_f1", "samples_f1", "hamming_loss", "subset_accuracy"):
        assert judged["metrics"][key] == pytest.approx(r["best"][key], abs=1e-12), key
    assert os.path.getsize(root / "ev" / "confusion_per_label.png") > 1000


def test_two_processes_metrics_equal_sklearn_on_transformers_predictions(setup, tmp_path):
    """0/1 label columns, DDP on 2 processes, an odd held-out size, --metric-for-best micro_f1."""
    _, model, train_rows, held_rows = setup
    train = write_csv(tmp_path / "train.csv", as_columns(train_rows))
    held = write_csv(tmp_path / "held.csv", as_columns(held_rows))
    out = tmp_path / "ddp"
    args = train_args(model, train, out, "--task", "multi_label", "--label-columns", ",".join(NAMES),
                      "--eval-file", held, "--epochs", 2, "--metric-for-best", "micro_f1", "--class-weights", "balanced")
    p = torchrun(2, args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = read_json(out / "results.json")
    assert r["world_size"] == 2 and r["best_step"] == max(r["evaluations"], key=lambda e: e["micro_f1"])["step"]
    # --class-weights balanced: negatives / positives per label, from the training labels
    y_train = indicator(train_rows)
    expected = (len(y_train) - y_train.sum(0)) / y_train.sum(0)
    assert r["pos_weights"] == pytest.approx(dict(zip(NAMES, expected.tolist())))
    probs, thresholds, names = transformers_multi_label(str(out / "last"), [row["review"] for row in held_rows])
    assert names == NAMES
    pred = probs >= thresholds.astype(np.float32)
    y = indicator(held_rows)
    final = r["final"]
    for avg in ("micro", "macro", "samples", "weighted"):
        assert final[f"{avg}_f1"] == pytest.approx(sk.f1_score(y, pred, average=avg, zero_division=0), abs=1e-12)
    assert final["hamming_loss"] == pytest.approx(sk.hamming_loss(y, pred), abs=1e-12)
    assert final["subset_accuracy"] == pytest.approx(sk.accuracy_score(y, pred), abs=1e-12)
    at_half = probs >= 0.5
    assert final["micro_f1_at_0.5"] == pytest.approx(sk.f1_score(y, at_half, average="micro", zero_division=0),
                                                     abs=1e-12)


def test_sigkill_then_resume_is_bitwise_equal(setup, tmp_path):
    """With gradient accumulation and head+tail truncation; the evaluations (thresholds included) match too."""
    _, model, train_rows, _ = setup
    csv = write_csv(tmp_path / "train.csv", train_rows[:200])

    def args(out, *extra):
        return ml_args(model, csv, out, "--epochs", 3, "--save-steps", 2, "--seed", 11, "--eval-split", 0.25,
                       "--grad-accum", 2, "--truncation", "head_tail", *extra)
    straight = tmp_path / "straight"
    run_train(args(straight))  # in this process: the same one thread and the same numbers as a subprocess
    out = tmp_path / "broken"
    proc = start(train_cmd(args(out)))
    wait_for_checkpoints(proc, out, 2)
    kill_job(proc)
    assert not os.path.exists(out / "last"), "killed too late"
    p = subprocess.run(train_cmd(args(out, "--resume", "auto")), env=env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "resumed from" in p.stdout
    assert_bitwise_equal(straight, out)
    a, b = (read_json(d / "results.json") for d in (straight, out))
    assert a["evaluations"] == b["evaluations"]  # thresholds and metrics too
    assert read_json(straight / "best" / "bert_finetune.json")["thresholds"] == \
        read_json(out / "best" / "bert_finetune.json")["thresholds"]


# ---------------------------------------------------------------- no training

def test_metrics_from_summed_shards_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random((57, 5)) < 0.3
    y[:, 4] = False  # a label with no positive: counted in the macro average as 0, as scikit-learn does
    y[3] = False  # an example with no label
    probs = rng.random((57, 5)).astype(np.float32)
    pred = metrics.predicted(probs, metrics.tuned_thresholds(metrics.score_histograms(probs, y)))
    sums = sum(metrics.multi_label_sums(y[i::3], pred[i::3]) for i in range(3))  # three "ranks"
    m, per = metrics.from_multi_label_sums(sums, 5)
    for avg in ("micro", "macro", "samples", "weighted"):
        for name, fn in (("precision", sk.precision_score), ("recall", sk.recall_score), ("f1", sk.f1_score)):
            assert m[f"{avg}_{name}"] == pytest.approx(fn(y, pred, average=avg, zero_division=0), abs=1e-12)
    assert m["hamming_loss"] == pytest.approx(sk.hamming_loss(y, pred))
    assert m["subset_accuracy"] == m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert metrics.better("hamming_loss", 0.1, 0.2) and not metrics.better("hamming_loss", 0.2, 0.1)
    np.testing.assert_array_equal(np.stack([[per["tn"], per["fp"]], [per["fn"], per["tp"]]]).transpose(2, 0, 1),
                                  sk.multilabel_confusion_matrix(y, pred))


def test_tuned_thresholds_beat_half_where_half_is_wrong():
    """A model that is right about the order but sure of nothing: every positive scores 0.2-0.45, every
    negative 0-0.25 (some overlap). At 0.5 nothing is predicted; the tuned thresholds find the gap."""
    rng = np.random.default_rng(1)
    y = rng.random((300, 3)) < 0.3
    probs = np.where(y, rng.uniform(0.2, 0.45, y.shape), rng.uniform(0.0, 0.25, y.shape)).astype(np.float32)
    hist = metrics.score_histograms(probs[:150], y[:150]) + metrics.score_histograms(probs[150:], y[150:])
    tuned = metrics.tuned_thresholds(hist)
    f1 = [sk.f1_score(y[:, i], probs[:, i] >= tuned[i]) for i in range(3)]
    assert all(t < 0.3 for t in tuned) and min(f1) > 0.8
    assert sk.f1_score(y, probs >= 0.5, average="micro", zero_division=0) == 0.0
    for i in range(3):  # no threshold on the grid does better
        best = max(sk.f1_score(y[:, i], probs[:, i] >= k / 1000, zero_division=0) for k in range(1, 1000, 7))
        assert f1[i] >= best - 1e-12
    # no positive example: 0.5 is kept
    assert metrics.tuned_thresholds(metrics.score_histograms(probs, np.zeros_like(y)))[0] == 0.5


def test_iterative_split_keeps_every_label_on_both_sides():
    rng = np.random.default_rng(2)
    y = rng.random((200, 6)) < [0.5, 0.3, 0.1, 0.05, 0.03, 0.0]
    y[:5, 5] = True  # five rows of a rare label
    held = multilabel.iterative_split(y, 0.2, seed=42)
    assert abs(held.sum() - 40) <= 2
    share = y[held].sum(0) / y.sum(0)
    assert np.all(np.abs(share - 0.2) <= 0.1), share  # every label near its 20%, the rarest included
    np.testing.assert_array_equal(held, multilabel.iterative_split(y, 0.2, seed=42))  # seeded


def test_label_input_and_its_errors(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"review": "good", "labels": "taste | price|taste"},
                                          {"review": "dog", "labels": ""}, {"review": "bad", "labels": "delivery"}])
    table = reading.read_table(path, "review", "labels", label_sep="|")
    assert list(table["label"]) == [("taste", "price"), (), ("delivery",)]  # an empty cell: no label, kept
    cols = write_csv(tmp_path / "c.csv", [{"review": "good", "a": "1", "b": "0"}, {"review": "bad", "a": "yes", "b": "2"}])
    with pytest.raises(UserError, match=r"c\.csv: line 3, column 'b' \(--label-columns\): '2' is not 0 or 1"):
        reading.read_table(cols, "review", None, label_columns=["a", "b"])
    with pytest.raises(UserError, match="--metric-for-best micro_f1 needs --task multi_label"):
        config.parse(["--metric-for-best", "micro_f1"])
    with pytest.raises(UserError, match="--threshold must be tuned or a number"):
        config.parse(["--task", "multi_label", "--threshold", "1.5"])
    table.attrs["row_unit"] = "line"
    with pytest.raises(UserError, match="line 2: label 'price' is not one the model knows"):
        multilabel.indicators(table.iloc[:1].assign(row=[2]), {"taste": 0, "delivery": 1}, "x.csv")
