"""Export to ONNX (fp32 and int8) and scoring on ONNX Runtime: the embedded default model and a tiny BERT trained
on sentence pairs, checked against torch on random and real texts; predict's onnx backend against its torch
backend; Predictor.predict; and the one line that says what to install when the export extra is missing."""
import json
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_train, synthetic_rows, train_args, write_csv
from test_recipes import pair_rows

from bert_finetune import data, export, predict
from bert_finetune.inference import Predictor

CPU = torch.device("cpu")


def needs_export_extra():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


def run_export(*argv):
    export.main([str(a) for a in argv])


def random_texts(predictor, n, seed):
    """Texts of random tokens (pieces and special tokens included), one to past max length tokens long."""
    rng = np.random.default_rng(seed)
    vocab = list(predictor.tokenizer.get_vocab())
    return [" ".join(rng.choice(vocab, size=k)) for k in np.linspace(1, predictor.max_length + 20, n).astype(int)]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    """The embedded default model (MiniLM-L6) with a seeded two-label head, saved as training saves best/."""
    from transformers import AutoModelForSequenceClassification
    root = tmp_path_factory.mktemp("default")
    path = data.embedded_model_dir()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model.save_pretrained(root / "best")
    Predictor(path, device=CPU, backend="torch").tokenizer.save_pretrained(root / "best")
    (root / "best" / "bert_finetune.json").write_text(json.dumps({"max_length": 128, "text_column": "text",
                                                                  "label_column": "label"}))
    held_out = data.embedded_table().iloc[:120]  # real Rotten Tomatoes sentences
    held_out[["label", "text"]].to_csv(root / "held_out.csv", index=False)
    return root


def test_default_model_exports_and_onnx_predict_equals_torch(default_model, tmp_path, capsys):
    needs_export_extra()
    best, held_out, exported = default_model / "best", default_model / "held_out.csv", tmp_path / "exported"
    run_export("--model", best, "--output-dir", exported, "--data", held_out, "--samples", 40)
    out = capsys.readouterr().out  # the log, as training's
    assert "verified on 40 rows of" in out and "accuracy torch fp32" in out
    assert sorted(os.listdir(exported)) == ["bert_finetune.json", "config.json", "model.onnx", "tokenizer.json",
                                            "tokenizer_config.json"]
    saved = json.loads((exported / "bert_finetune.json").read_text())
    assert saved["text_column"] == "text" and saved["export"]["quantize"] is None
    assert saved["export"]["verified"]["max_abs_difference"] <= export.FP32_TOLERANCE

    torch_side = Predictor(str(best), device=CPU)
    onnx_side = Predictor(str(exported))  # auto: the folder holds model.onnx
    assert onnx_side.backend == "onnx" and torch_side.backend == "torch" and onnx_side.max_length == 128
    texts = random_texts(torch_side, 24, seed=1) + pd.read_csv(held_out)["text"].tolist()[:40]
    np.testing.assert_allclose(onnx_side.probabilities(texts, batch_size=16),
                               torch_side.probabilities(texts, batch_size=16), atol=export.FP32_TOLERANCE)

    # predict: the same output file from either backend (a few empty rows kept in place)
    table = pd.read_csv(held_out)
    table.loc[[3, 50], "text"] = ""
    table.to_csv(tmp_path / "in.csv", index=False)
    outputs = {}
    for backend, folder in (("torch", best), ("onnx", exported)):
        predict.main(["--model", str(folder), "--input", str(tmp_path / "in.csv"), "--output",
                      str(tmp_path / f"{backend}.csv"), "--batch-size", "32"])
        outputs[backend] = pd.read_csv(tmp_path / f"{backend}.csv", keep_default_na=False)
        assert "2 empty example(s) (lines 5, 52)" in capsys.readouterr().err
    assert list(outputs["onnx"].columns) == list(outputs["torch"].columns)
    assert outputs["onnx"]["prediction"].tolist() == outputs["torch"]["prediction"].tolist()
    assert outputs["onnx"].loc[3, "prediction"] == ""
    for column in ("prob_negative", "prob_positive"):
        got, expected = (pd.to_numeric(outputs[b][column]).to_numpy() for b in ("onnx", "torch"))
        np.testing.assert_allclose(got, expected, atol=2e-6)  # the CSV's 6 decimals

    # the Python API gives the CLI's answers
    answers = onnx_side.predict(table["text"].tolist()[:8])
    assert [a["label"] or "" for a in answers] == outputs["torch"]["prediction"].tolist()[:8]
    assert answers[3] == {"label": None, "probability": None, "probabilities": None}
    assert answers[0]["probability"] == pytest.approx(max(answers[0]["probabilities"].values()))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A tiny BERT fine-tuned for real on sentence pairs whose label is in the second text; its best/."""
    from conftest import build_tiny_model
    root = tmp_path_factory.mktemp("pairs")
    model = build_tiny_model(str(root / "init"))
    train = write_csv(root / "train.csv", pair_rows(200, 1))
    write_csv(root / "held_out.csv", pair_rows(60, 2))
    run_train(train_args(model, train, root / "out", "--epochs", 2, "--text-pair-column", "hypothesis"))
    return root


def test_pairs_export_in_fp32_and_int8(pairs, tmp_path, capsys):
    needs_export_extra()
    best, held_out = pairs / "out" / "best", pairs / "held_out.csv"
    run_export("--model", best, "--output-dir", tmp_path / "fp32")
    run_export("--model", best, "--output-dir", tmp_path / "int8", "--quantize", "int8", "--data", held_out)
    out = capsys.readouterr().out
    assert "verified on 64 vocabulary texts" in out and "ONNX int8" in out
    torch_side = Predictor(str(best), device=CPU)
    df = pd.read_csv(held_out)
    texts, second = df["review"].tolist(), df["hypothesis"].tolist()
    texts += random_texts(torch_side, 10, seed=2)
    second += random_texts(torch_side, 10, seed=3)
    expected = torch_side.probabilities(texts, pairs=second)
    fp32 = Predictor(str(tmp_path / "fp32"))
    np.testing.assert_allclose(fp32.probabilities(texts, pairs=second), expected, atol=export.FP32_TOLERANCE)
    # past the max length it was trained and exported with (32), up to the position limit (64)
    longer = [Predictor(str(folder), device=CPU, max_length=64).probabilities(texts[-5:], pairs=second[-5:])
              for folder in (best, tmp_path / "fp32")]
    np.testing.assert_allclose(longer[1], longer[0], atol=export.FP32_TOLERANCE)
    int8 = Predictor(str(tmp_path / "int8"))
    assert int8.precision == "int8"
    got = int8.probabilities(texts, pairs=second)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9
    assert os.path.getsize(tmp_path / "int8" / "model.onnx") < os.path.getsize(tmp_path / "fp32" / "model.onnx")
    answers = int8.predict(["the city night"], pairs=["a superb film"])
    assert answers[0]["label"] == "pos" and set(answers[0]["probabilities"]) == {"neg", "pos"}

    # errors are the torch backend's: a pair model given single texts
    for folder in (best, tmp_path / "fp32"):
        with pytest.raises(SystemExit) as e:
            predict.main(["--model", str(folder), "--text", "a superb film"])
        assert e.value.code == 2 and "trained on sentence pairs" in capsys.readouterr().err

    # nothing is overwritten, and an export is not exported again
    for argv, message in ((["--model", best, "--output-dir", tmp_path / "fp32"], "not an empty folder"),
                          (["--model", tmp_path / "fp32", "--output-dir", tmp_path / "again"], "is an export")):
        with pytest.raises(SystemExit):
            run_export(*argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["--model", str(best), "--backend", "onnx", "--text", "x", "--text-pair", "y"])
    assert "holds no model.onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["--model", str(tmp_path / "fp32"), "--backend", "torch", "--text", "x", "--text-pair", "y"])
    assert "is an ONNX export, without torch weights" in capsys.readouterr().err


def test_missing_export_extra_is_one_line(tmp_path, capsys, monkeypatch):
    """Without onnx/onnxruntime (None in sys.modules makes `import` fail, as when they are not installed)."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)
    model = tmp_path / "model"
    from conftest import build_tiny_model
    build_tiny_model(str(model))
    install = 'pip install -e ".[export]"'
    with pytest.raises(SystemExit) as e:
        run_export("--model", model, "--output-dir", tmp_path / "out")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "needs the package onnx" in err and install in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        predict.main(["--model", str(model), "--backend", "onnx", "--text", "good"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--backend onnx needs the package onnxruntime" in err
    # a folder that holds model.onnx picks the onnx backend by itself, and says the same
    shutil.copytree(model, tmp_path / "exported")
    (tmp_path / "exported" / "model.onnx").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        predict.main(["--model", str(tmp_path / "exported"), "--text", "good"])
    assert e.value.code == 2 and install in capsys.readouterr().err


def test_predict_api_on_the_torch_backend(tmp_path):
    """Predictor.predict without any export: labels and probabilities per text, a str alone, pairs checked."""
    from conftest import build_tiny_model
    model = build_tiny_model(str(tmp_path / "m"))
    p = Predictor(model, device=CPU)
    rows = synthetic_rows(5, seed=3)
    answers = p.predict([r["review"] for r in rows])
    probs = p.probabilities([r["review"] for r in rows])
    assert [a["label"] for a in answers] == [p.labels.names[i] for i in probs.argmax(1)]
    assert answers[1]["probabilities"] == pytest.approx(dict(zip(p.labels.names, probs[1].tolist())))
    assert p.predict("good") == p.predict(["good"])
    with pytest.raises(Exception, match="2 texts but 1 pairs"):
        p.predict(["a", "b"], pairs=["c"])
