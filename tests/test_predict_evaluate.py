"""predict and evaluate on a really trained tiny model: round trips, sklearn's numbers, transformers' pipeline."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support

from conftest import ROOT, build_tiny_model, env, run_train, synthetic_rows, train_args, write_csv

LINE = re.compile(r"^(neg|pos)\t(\d\.\d{4})\t(.*)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT fine-tuned for real on the synthetic neg/pos reviews; its best/ folder."""
    root = tmp_path_factory.mktemp("trained")
    model = build_tiny_model(str(root / "init"))
    train = write_csv(root / "train.csv", synthetic_rows(300, seed=0))
    run_train(train_args(model, train, root / "out", "--epochs", 3))
    return str(root / "out" / "best")


def predict(argv, capsys, stdin: bytes | None = None, monkeypatch=None):
    from bert_finetune import predict as p
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    p.main(list(map(str, argv)))
    return capsys.readouterr()


def test_text_prints_label_probability_text_and_keeps_empty_rows(trained, capsys):
    out = predict(["--model", trained, "--text", "the movie was good", "--text", "  ", "--text", "an awful plot"],
                  capsys)
    lines = out.out.splitlines()
    assert len(lines) == 3  # one line per --text, the empty one included, in order
    first, third = LINE.match(lines[0]), LINE.match(lines[2])
    assert first and first.group(1) == "pos" and first.group(3) == "the movie was good"
    assert third and third.group(1) == "neg" and third.group(3) == "an awful plot"
    assert lines[1].startswith("\t\t")
    assert "1 empty example(s) (--text #2)" in out.err


def test_csv_round_trip_keeps_columns_order_and_matches_predictor(trained, tmp_path, capsys):
    from bert_finetune.predict import Predictor
    rows = synthetic_rows(50, seed=7)
    rows[3]["review"] = 'a "quoted", multi-line\nreview, good'
    rows[10]["review"] = ""
    df = pd.DataFrame(rows)
    df.insert(0, "id", [f"r{i}" for i in range(len(df))])
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    df.to_csv(src, index=False)
    err = predict(["--model", trained, "--input", src, "--output", dst], capsys).err
    assert "line 12" in err  # the empty review (header = line 1)
    got = pd.read_csv(dst, dtype={"id": str, "review": str}, keep_default_na=False)
    assert list(got.columns) == ["id", "label", "review", "prediction", "probability", "prob_neg", "prob_pos"]
    assert got["id"].tolist() == df["id"].tolist() and got["review"].tolist() == df["review"].tolist()
    assert got.loc[10, "prediction"] == "" and got.loc[10, "prob_pos"] == ""
    full = got.drop(index=10)
    probs = full[["prob_neg", "prob_pos"]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=2e-6)
    assert full["prediction"].tolist() == [["neg", "pos"][i] for i in probs.argmax(1)]
    direct = Predictor(trained).probabilities(full["review"].tolist(), batch_size=7)
    np.testing.assert_allclose(probs, direct, atol=1e-6)  # batching and sorting kept the input order
    assert (full["prediction"] == full["label"]).mean() > 0.8  # it learned (chance: 0.5)


def test_jsonl_round_trip(trained, tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    records = [{"review": "good story", "id": 1}, {"review": "a dull film", "id": 2, "extra": [1, 2]}]
    src.write_text("\n".join([json.dumps(records[0]), '"boring night"', "", json.dumps(records[1])]) + "\n")
    predict(["--model", trained, "--input", src, "--output", dst], capsys)
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(got) == 4
    assert {k: got[0][k] for k in ("review", "id")} == records[0] and got[3]["extra"] == [1, 2]
    assert got[1]["review"] == "boring night" and got[2]["prediction"] is None
    assert [g["prediction"] for g in got] == ["pos", "neg", None, "neg"]
    for g in (got[0], got[1], got[3]):
        assert set(g["probabilities"]) == {"neg", "pos"}
        assert g["probability"] == max(g["probabilities"].values())
        assert sum(g["probabilities"].values()) == pytest.approx(1, abs=2e-6)


@pytest.mark.parametrize("source", ["csv", "jsonl", "txt", "parquet"])
def test_streamed_output_equals_the_whole_input_at_once(trained, tmp_path, capsys, source):
    """Read, scored and written 7 examples at a time, the output files and the warnings are those of one chunk
    holding everything, in CSV and in JSON Lines: the same rows, fields and labels, the probabilities equal up
    to float rounding (other batches pad to other lengths)."""
    if source == "parquet":
        pytest.importorskip("pyarrow")
    rows = synthetic_rows(40, seed=11)
    rows[5]["review"], rows[20]["review"] = "", "good " * 40  # an empty example; a truncated one
    src = tmp_path / f"in.{source}"
    if source == "csv":
        pd.DataFrame(rows).to_csv(src, index=False)
    elif source == "parquet":
        pd.DataFrame(rows).to_parquet(src)
    elif source == "jsonl":
        src.write_text("".join(json.dumps({**r, "n": i if i % 3 else None}) + "\n" for i, r in enumerate(rows)))
    else:
        src.write_text("".join(r["review"] + "\r\n" for r in rows))
    for out in ("out.csv", "out.jsonl"):
        whole = predict(["--model", trained, "--input", src, "--output", tmp_path / f"whole-{out}"], capsys)
        streamed = predict(["--model", trained, "--input", src, "--output", tmp_path / f"chunks-{out}",
                            "--chunk-size", 7], capsys)
        a, b = (read_output(tmp_path / f"{how}-{out}") for how in ("chunks", "whole"))
        probs = [c for c in a.columns if c.startswith("prob")]
        assert list(a.columns) == list(b.columns) and a.drop(columns=probs).equals(b.drop(columns=probs))
        assert np.allclose(*(x[probs].apply(pd.to_numeric) for x in (a, b)), atol=2e-6, equal_nan=True)
        warnings = [[line[9:] for line in run.err.splitlines()[:-1]] for run in (streamed, whole)]  # no time
        assert warnings[0] == warnings[1]  # (the last line names the file written)
        assert "1 empty example(s)" in whole.err and "1 of 39 example(s) are longer" in whole.err
    assert len((tmp_path / "chunks-out.jsonl").read_text().splitlines()) == 40


def read_output(path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return pd.DataFrame([{k: v for k, v in r.items() if k != "probabilities"}
                         | {f"prob_{k}": v for k, v in (r["probabilities"] or {}).items()} for r in rows])


def test_stream_lines_decodes_across_blocks_as_the_whole_file(monkeypatch):
    """A character cut between two blocks, \r\n endings, a last line without an ending: the same lines as
    decoding the whole file."""
    from bert_finetune import reading
    text = "第一行\r\nzweite Zeile ü\n\n第四行没有换行"
    for codec in ("utf-8", "gb18030", "utf-16"):
        raw = text.encode(codec)
        monkeypatch.setattr(reading, "SAMPLE_BYTES", 3)
        got = list(reading.stream_lines(io.BytesIO(raw), "f", codec, block=2))
        want = [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), 1)]
        assert got == want, codec


def test_stdin_lines_in_order_to_jsonl_on_stdout(trained, capsys, monkeypatch):
    out = predict(["--model", trained, "--input", "-", "--output", "-"], capsys,
                  stdin="\ufeffa good film\n\r\nbad movie\r\nsuperb\n".encode(), monkeypatch=monkeypatch)
    got = [json.loads(line) for line in out.out.splitlines()]
    assert [g["text"] for g in got] == ["a good film", "", "bad movie", "superb"]
    assert [g["prediction"] for g in got] == ["pos", None, "neg", "pos"]


def test_stdin_through_a_real_pipe(trained, tmp_path):
    """The CLI as a user runs it: text piped in, TSV lines out, logs on stderr only."""
    p = subprocess.run([sys.executable, "-m", "bert_finetune.predict", "--model", trained, "--input", "-"],
                       input="great\n\nawful\n", capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [LINE.match(lines[0]).group(1), lines[1], LINE.match(lines[2]).group(1)] == ["pos", "\t\t", "neg"]


def test_overlong_texts_truncate_and_say_so_once(trained, capsys):
    long_text = " ".join(["good"] + ["film"] * 40)
    out = predict(["--model", trained, "--max-length", 8, "--text", long_text, "--text", "bad", "--text", long_text],
                  capsys)
    assert out.err.count("truncated") == 1 and "2 of 3 example(s) are longer than 8 tokens" in out.err
    assert len(out.out.splitlines()) == 3


def test_predict_user_errors_are_one_line(trained, tmp_path, capsys):
    csv = write_csv(tmp_path / "x.csv", synthetic_rows(4, seed=1))
    for argv in (["--input", csv, "--text-column", "nope"], ["--input", csv, "--output", tmp_path / "o.txt"],
                 ["--input", tmp_path / "missing.csv"], ["--text", "x", "--max-length", 1000]):
        with pytest.raises(SystemExit) as e:
            predict(["--model", trained, *argv], capsys)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_transformers_pipeline_agrees_with_predict(trained):
    from transformers import pipeline
    from bert_finetune.predict import Predictor
    texts = ["the movie was good", "an awful plot", "a dull boring night", "superb music", "the cat"]
    pipe = pipeline("text-classification", model=trained, tokenizer=trained, device="cpu", top_k=None)
    theirs = pipe(texts)
    ours = Predictor(trained, device=torch.device("cpu")).probabilities(texts)
    names = ["neg", "pos"]
    for row, p in zip(theirs, ours):
        scores = {d["label"]: d["score"] for d in row}
        np.testing.assert_allclose([scores[n] for n in names], p, atol=1e-5)
        assert row[0]["label"] == names[int(p.argmax())]


# ---------------------------------------------------------------- evaluate

def run_evaluate(*argv):
    from bert_finetune import evaluate
    evaluate.main(list(map(str, argv)))


def independent_predictions(model_dir, texts, max_length=32):
    """transformers alone, one padded batch: not our loader, collate or sharding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        enc = tok(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return model(**enc).logits.argmax(-1).numpy(), model.config


def test_evaluate_numbers_equal_sklearn(trained, tmp_path, capsys):
    rows = synthetic_rows(83, seed=5)
    for row in rows[::4]:  # wrong labels, so that the model errs both ways and every number is non-trivial
        row["label"] = "pos" if row["label"] == "neg" else "neg"
    data = write_csv(tmp_path / "test.csv", rows)
    out = tmp_path / "eval"
    run_evaluate("--model", trained, "--data", data, "--output-dir", out)
    printed = capsys.readouterr().out
    r = json.load(open(out / "eval_results.json"))
    df = pd.read_csv(data)
    preds, config = independent_predictions(trained, df.review)
    y = df.label.map(config.label2id).to_numpy()
    names = [config.id2label[i] for i in range(config.num_labels)]
    assert r["examples"] == len(df) and r["labels"] == names
    cm = confusion_matrix(y, preds, labels=range(len(names)))
    assert r["confusion_matrix"] == cm.tolist() and cm[0, 1] > 0 and cm[1, 0] > 0
    m = r["metrics"]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, preds), abs=1e-12)
    for avg in ("weighted", "macro"):
        p, rc, f, _ = precision_recall_fscore_support(y, preds, average=avg, zero_division=0)
        assert (m[f"{avg}_precision"], m[f"{avg}_recall"], m[f"{avg}_f1"]) == pytest.approx((p, rc, f), abs=1e-12)
    report = classification_report(y, preds, target_names=names, output_dict=True, zero_division=0)
    for name in names:
        got = r["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (report[name]["precision"], report[name]["recall"], report[name]["f1-score"], report[name]["support"]))
    assert f"accuracy {m['accuracy']:.4f}" in printed and "weighted avg" in printed and "true \\ pred" in printed
    from PIL import Image
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.width > 100 and png.height > 100


def test_evaluate_unknown_label_is_a_one_line_error(trained, tmp_path, capsys):
    rows = synthetic_rows(10, seed=3)
    rows[4]["label"] = "maybe"
    data = write_csv(tmp_path / "test.csv", rows)
    with pytest.raises(SystemExit) as e:
        run_evaluate("--model", trained, "--data", data, "--output-dir", tmp_path / "e")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "'maybe'" in err and "line 6" in err and "neg, pos" in err
    assert not os.path.exists(tmp_path / "e" / "eval_results.json")


def test_evaluate_under_torchrun_equals_one_process(trained, tmp_path, capsys):
    data = write_csv(tmp_path / "test.csv", synthetic_rows(61, seed=9))  # odd: the shards differ in size
    run_evaluate("--model", trained, "--data", data, "--output-dir", tmp_path / "one", "--batch-size", 8)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "bert_finetune.evaluate", "--model", trained, "--data", data,
                        "--output-dir", str(tmp_path / "two"), "--batch-size", "8"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    one, two = (json.load(open(tmp_path / d / "eval_results.json")) for d in ("one", "two"))
    assert two["examples"] == one["examples"] == 61 and two["confusion_matrix"] == one["confusion_matrix"]
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-5), key
    assert p.stdout.count("weighted avg") == 1  # rank 0 reports, once


# ---------------------------------------------------------------- the seed's use case

ZH_POSITIVE, ZH_NEGATIVE = list("好快香赞"), list("差慢冷糟")
ZH_FILLER = list("送餐外卖味道饭菜米面汤肉鸡今天的了很还是")


def tiny_chinese_model(path) -> str:
    """A tiny BERT with a character vocabulary, as bert-base-chinese tokenizes (one token per character)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "，", "。"] + ZH_POSITIVE + ZH_NEGATIVE + ZH_FILLER
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab=os.path.join(path, "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=256)).save_pretrained(path)
    return str(path)


def chinese_reviews(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        chars = list(rng.choice(ZH_FILLER, rng.integers(4, 30)))
        chars.insert(int(rng.integers(len(chars) + 1)), str(rng.choice(ZH_POSITIVE if y else ZH_NEGATIVE)))
        rows.append({"label": y, "review": "".join(chars) + "。"})
    return rows


def test_bert_base_chinese_config_with_a_local_model_folder(tmp_path, capsys):
    """configs/bert-base-chinese.yaml as a user runs it: --model and --train-file point at local files."""
    model = tiny_chinese_model(tmp_path / "bert-base-chinese")
    data = write_csv(tmp_path / "waimai.csv", chinese_reviews(240, seed=0))
    out = tmp_path / "out"
    config = os.path.join(ROOT, "configs", "bert-base-chinese.yaml")
    r = run_train([str(a) for a in ("--config", config, "--model", model, "--train-file", data, "--output-dir", out,
                                    "--logging-dir", out / "runs", "--batch-size", 8, "--lr", 2e-3)])
    assert r["labels"] == ["0", "1"] and r["config"]["max_length"] == 256
    assert r["best"]["macro_f1"] > 0.8  # it learned (chance: 0.5)
    capsys.readouterr()  # the training's log
    lines = predict(["--model", out / "best", "--text", "送餐很快，味道很好。", "--text", "饭菜冷了，太差。"],
                    capsys).out.splitlines()
    run_evaluate("--model", out / "best", "--data", write_csv(tmp_path / "test.csv", chinese_reviews(40, seed=1)),
                 "--output-dir", tmp_path / "eval")
    assert re.match(r"^1\t\d\.\d{4}\t送餐很快，味道很好。$", lines[0]) and lines[1].startswith("0\t")
    assert json.load(open(tmp_path / "eval" / "eval_results.json"))["metrics"]["accuracy"] > 0.8


def test_report_tables_line_up_with_chinese_labels():
    """A Chinese character takes two terminal columns: the columns of evaluate's tables stay aligned."""
    from bert_finetune.evaluate import confusion_text, display_width, report_text
    from bert_finetune import metrics
    names = ["正面", "负面", "neutral"]
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 3]])
    for text in (confusion_text(cm, names), report_text(cm, names, metrics.from_confusion(cm))):
        rows = [line for line in text.splitlines() if line and not line.startswith("(")]
        ends = {display_width(line) for line in rows}
        assert len(ends) == 1, text  # every row ends in the same column
