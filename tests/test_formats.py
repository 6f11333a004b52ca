"""Files as they come: GBK, GB18030, UTF-16 and UTF-8 with a byte-order mark read without flags, --encoding to
force one, bytes that do not decode reported by line; CSV, TSV, JSON Lines, JSON and Parquet read to one table."""
import importlib.util
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, env

from bert_finetune import data, reading
from bert_finetune.errors import UserError

ZH_WORDS = ["送餐很快", "味道很好", "饭菜冷了", "太差了", "今天的外卖", "还是不错", "米饭很香", "汤太咸了", "服务态度好",
            "包装破了", "下次还点", "等了一个小时"]


def chinese_rows(n=40, seed=0, extra=""):
    """label,review rows in Chinese with Chinese label names; `extra` goes into a few reviews."""
    rng = random.Random(seed)
    rows = [{"label": ["正面", "负面"][i % 2], "review": "，".join(rng.choices(ZH_WORDS, k=rng.randint(2, 6))) + "。"}
            for i in range(n)]
    for row in rows[::7]:
        row["review"] += extra
    return rows


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    """The bert_finetune logger's messages during the test (whatever setup_logging() did to it before)."""
    log, handler = logging.getLogger("bert_finetune"), Records()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield handler.lines
    log.removeHandler(handler)
    log.setLevel(level)


def write(path, rows, encoding) -> str:
    pd.DataFrame(rows).to_csv(path, index=False, encoding=encoding)
    return str(path)


# ---------------------------------------------------------------- encodings

# GB18030-only: 𠮷 (U+20BB7, outside the BMP) and ᠮ (Mongolian); neither exists in GBK
GB18030_ONLY = "𠮷ᠮ"
ENCODINGS = [  # (what the file is written in, what it must be read as, text added to some reviews)
    ("gbk", "GB18030", ""),  # GB18030 extends GBK: the same bytes, the same text
    ("gb18030", "GB18030", GB18030_ONLY),
    ("utf-16", "UTF-16", GB18030_ONLY + "😀"),
    ("utf-8-sig", "UTF-8", GB18030_ONLY + "😀"),
    ("utf-8", "UTF-8", "😀"),
]


@pytest.mark.parametrize("written,read_as,extra", ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_chinese_files_read_back_exactly_without_flags(tmp_path, log_lines, written, read_as, extra):
    rows = chinese_rows(extra=extra)
    path = write(tmp_path / f"{written}.csv", rows, written)
    raw = Path(path).read_bytes()
    if written in ("gbk", "gb18030"):
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")  # really not UTF-8
    if written == "gb18030":
        with pytest.raises(UnicodeEncodeError):
            GB18030_ONLY.encode("gbk")  # really beyond GBK
    table = reading.read_table(path, "review", "label")
    assert table["text"].tolist() == [r["review"] for r in rows]
    assert table["label"].tolist() == [r["label"] for r in rows]
    assert table["row"].tolist() == list(range(2, len(rows) + 2))
    how = reading.detect_encoding(raw)[1]
    assert [line for line in log_lines if " read as " in line] == [f"{path}: read as {read_as} text ({how})"]


def test_a_short_gbk_file_with_chinese_labels_is_gb18030_not_korean():
    # three lines decode as well in Korean (cp949): the tie goes to GB18030
    raw = "label,review\n正面,很好\n负面,太差了\n".encode("gbk")
    assert reading.detect_encoding(raw)[0] == "gb18030"


@pytest.mark.parametrize("raw,codec", [
    (b"label,review\n1,plain ascii\n", "utf-8"),
    ("label,review\n1,caf\u00e9 \u6b63\u9762\n".encode(), "utf-8"),
    ("label,review\n1,\u6b63\u9762\n".encode("utf-16-le"), "utf-16-le"),  # no byte-order mark: its NUL bytes
    (b"\xff\xfe" + "a,b\n".encode("utf-16-le"), "utf-16"),
    (b"\xef\xbb\xbfa,b\n", "utf-8-sig"),
])
def test_detection(raw, codec):
    assert reading.detect_encoding(raw)[0] == codec


def test_a_multi_byte_character_cut_by_the_sample_end_is_still_utf8():
    raw = ("a" * (reading.SAMPLE_BYTES - 1) + "正").encode()  # 正 is 3 bytes: the sample ends inside it
    assert reading.detect_encoding(raw[:reading.SAMPLE_BYTES], whole=False)[0] == "utf-8"


def test_forcing_an_encoding(tmp_path):
    rows = chinese_rows()
    path = write(tmp_path / "gbk.csv", rows, "gbk")
    table = reading.read_table(path, "review", "label", encoding="gbk")
    assert table["text"].tolist() == [r["review"] for r in rows]
    # a wrong one: one line naming the file, the line and the encoding, and what the file looks like
    with pytest.raises(UserError) as e:
        reading.read_table(path, "review", "label", encoding="utf-8")
    message = str(e.value)
    assert message.startswith(f"{path}: line 2 is not valid UTF-8 text (--encoding utf-8; it looks like GB18030")
    assert "\n" not in message
    with pytest.raises(UserError, match=rf"^{path}: --encoding foo: not a text encoding") as e:
        reading.read_table(path, "review", "label", encoding="foo")
    assert "\n" not in str(e.value)


def test_a_bad_byte_after_the_first_megabyte_is_reported_by_line(tmp_path):
    line = "1,送餐很快，味道很好，还是不错的一家店。\n".encode()
    n = reading.SAMPLE_BYTES // len(line) + 500  # well past the detection sample
    raw = b"label,review\n" + line * n + b"0,\xff\xfe broken\n" + line * 10
    assert len(raw) > reading.SAMPLE_BYTES + 10_000
    for name in ("late.csv", "late.tsv"):
        path = tmp_path / name
        path.write_bytes(raw if name.endswith(".csv") else raw.replace(b",", b"\t"))
        with pytest.raises(UserError) as e:
            reading.read_table(str(path), "review", "label")
        assert str(e.value) == (f"{path}: line {n + 2} is not valid UTF-8 text (detected from the first 1 MB; "
                                f"pass --encoding to force one)")
    records = b"".join(json.dumps({"label": 1, "review": "送餐很快"}, ensure_ascii=False).encode() + b"\n"
                       for _ in range(60_000))
    path = tmp_path / "late.jsonl"
    path.write_bytes(records + b'{"label": 0, "review": "\xff"}\n')
    assert len(records) > reading.SAMPLE_BYTES
    with pytest.raises(UserError, match=r"late\.jsonl: line 60001 is not valid UTF-8 text"):
        reading.read_table(str(path), "review", "label")


# ---------------------------------------------------------------- formats

def formats_rows():
    rows = chinese_rows(12, seed=3)
    rows[2]["label"] = "NA"  # a label cell NA is no label, in every format
    rows[5]["review"] = 'a "quoted", comma\tand tab'
    return rows


def write_all(folder, rows) -> dict:
    """The same rows as .csv, .tsv, .jsonl, .json and .parquet."""
    folder.mkdir(exist_ok=True)
    df = pd.DataFrame(rows)
    paths = {kind: str(folder / f"data.{kind}") for kind in ("csv", "tsv", "jsonl", "json", "parquet")}
    df.to_csv(paths["csv"], index=False)
    df.to_csv(paths["tsv"], index=False, sep="\t")
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" + ("\n" if i == 3 else "") for i, r in enumerate(rows)))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    df.to_parquet(paths["parquet"], index=False)
    return paths


def test_every_format_reads_to_the_same_table(tmp_path, log_lines):
    rows = formats_rows()
    paths = write_all(tmp_path / "formats", rows)
    csv = reading.read_table(paths["csv"], "review", "label")
    assert len(csv) == len(rows) - 1 and csv["text"].tolist()[4] == rows[5]["review"]
    for kind, path in paths.items():
        table = reading.read_table(path, "review", "label")
        assert table[["text", "label"]].to_dict("list") == csv[["text", "label"]].to_dict("list"), kind
        loaded = reading.load_table(path, "'label,review'")
        assert loaded.frame["label"].tolist()[2] == "NA", kind  # read as written; read_table() reports it
    # where each row is: CSV and TSV lines (header = 1), JSON Lines lines (a blank line 5 skipped), records
    rows_of = {kind: reading.read_table(path, "review", "label")["row"].tolist()[:5] for kind, path in paths.items()}
    assert rows_of == {"csv": [2, 3, 5, 6, 7], "tsv": [2, 3, 5, 6, 7], "jsonl": [1, 2, 4, 6, 7],
                       "json": [1, 2, 4, 5, 6], "parquet": [1, 2, 4, 5, 6]}
    skipped = [line for line in log_lines if "no label" in line]
    assert any(line.endswith("lines 4") for line in skipped) and any(line.endswith("records 3") for line in skipped)


def test_json_and_parquet_values_become_the_strings_a_csv_holds(tmp_path):
    records = [{"label": 1, "review": "good", "score": 0.5, "ok": True, "tags": ["a", "b"]},
               {"label": 0, "review": "bad", "score": None, "ok": False, "tags": []},
               {"label": 1.0, "review": "fine"}]  # no score, ok, tags: empty cells
    path = tmp_path / "values.json"
    path.write_text(json.dumps(records))
    frame = reading.load_table(str(path), "").frame
    assert frame.to_dict("list") == {"label": ["1", "0", "1.0"], "review": ["good", "bad", "fine"],
                                     "score": ["0.5", "", ""], "ok": ["true", "false", ""],
                                     "tags": ['["a", "b"]', "[]", ""]}
    assert reading.read_table(str(path), "review", "label")["label"].tolist() == ["1", "0", "1"]
    parquet = tmp_path / "values.parquet"
    pd.DataFrame({"label": pd.array([1, None, 0], dtype="Int64"), "review": ["a", "b", None]}).to_parquet(parquet)
    assert reading.load_table(str(parquet), "").frame.to_dict("list") == {"label": ["1", "", "0"],
                                                                       "review": ["a", "b", ""]}


BAD = [  # (file name, its bytes, the one line it must give)
    ("empty.json", b"", r"empty\.json: the file is empty$"),
    ("empty.tsv", b"", r"empty\.tsv: the file is empty \(expected a header line"),
    ("none.json", b"[]", r"none\.json: holds no records"),
    ("blank.jsonl", b"\n\n", r"blank\.jsonl: holds no records"),
    ("header.tsv", b"label\treview\n", r"header\.tsv: has a header but no rows"),
    ("column.jsonl", b'{"label": 1, "text": "x"}\n', r"no column 'review' \(--text-column\); the fields are: label, text"),
    ("column.parquet", None, r"no column 'review' \(--text-column\); the columns are: label, text"),
    ("broken.jsonl", b'{"label": 1, "review": "x"}\n{"label": \n', r"broken\.jsonl: line 2 is not valid JSON"),
    ("list.jsonl", b'[1, 2]\n', r"list\.jsonl: line 1: expected a JSON object, got list"),
    ("object.json", b'{"label": 1}', r"object\.json: expected a JSON list of objects \(records\), got dict"),
    ("strings.json", b'[{"label": 1, "review": "x"}, "y"]', r"strings\.json: record 2: expected a JSON object"),
    ("broken.json", b'[{"label": 1,', r"broken\.json: not valid JSON: .* \(line 1, column"),
    ("fake.parquet", b"not parquet at all", r"fake\.parquet: not a valid Parquet file"),
    ("twice.tsv", b"label\treview\treview\n1\ta\tb\n", r"twice\.tsv: the header names column\(s\) 'review' more"),
    ("missing.jsonl", None, r"missing\.jsonl: no such file"),
    ("folder.json", None, r"folder\.json: is a folder"),
    ("label.json", b'[{"label": "maybe", "review": "x"}, {"label": 1, "review": "y"}]',
     r"label\.json: record 1: label 'maybe' is not one the model knows"),
]


@pytest.mark.parametrize("name,content,says", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_one_line_in_every_format(tmp_path, name, content, says):
    path = tmp_path / name
    if name == "column.parquet":
        pd.DataFrame({"label": [1], "text": ["x"]}).to_parquet(path)
    elif name == "folder.json":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        table = reading.read_table(str(path), "review", "label")
        data.LabelMap(["0", "1"]).encode(table, str(path))
    assert "\n" not in str(e.value) and re.search(says, str(e.value)), str(e.value)


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"label": ["1"], "review": ["x"]}).to_parquet(path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else find_spec(name, *a))
    with pytest.raises(UserError, match=r"data\.parquet: reading Parquet files needs pyarrow: "
                                        r"pip install 'bert-finetune\[parquet\]'"):
        reading.read_table(str(path), "review", "label")


# ---------------------------------------------------------------- the CLIs

def test_predict_reads_a_gbk_file_without_flags(tiny_model, tmp_path):
    """python -m bert_finetune.predict as a user runs it on a file Excel saved on a Chinese Windows."""
    rows = chinese_rows(6, seed=1)
    rows[1]["review"] = "the movie was good"  # words the tiny model's vocabulary has
    src, dst = write(tmp_path / "reviews.csv", rows, "gbk"), tmp_path / "out.jsonl"
    p = subprocess.run([sys.executable, "-m", "bert_finetune.predict", "--model", tiny_model, "--input", src,
                        "--text-column", "review", "--output", dst], capture_output=True, text=True, env=env(),
                       cwd=ROOT, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert f"{src}: read as GB18030 text (detected by charset-normalizer)" in p.stderr
    got = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [(g["label"], g["review"]) for g in got] == [(r["label"], r["review"]) for r in rows]
    assert all(g["prediction"] in ("LABEL_0", "LABEL_1") for g in got)


def cli_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_wrong_encoding_is_one_line_in_predict_and_evaluate(tiny_model, tmp_path, capsys):
    from bert_finetune import evaluate, predict
    src = write(tmp_path / "reviews.csv", chinese_rows(6), "gbk")
    for main, flags in ((predict.main, ["--input", src]), (evaluate.main, ["--data", src, "--text-column", "review"])):
        err = cli_error(main, ["--model", tiny_model, *flags, "--encoding", "utf-8"], capsys)
        assert err.startswith(f"error: {src}: line 2 is not valid UTF-8 text (--encoding utf-8"), err
        err = cli_error(main, ["--model", tiny_model, *flags, "--encoding", "foo"], capsys)
        assert err == "error: --encoding foo: not a text encoding Python knows (e.g. utf-8, gb18030, utf-16, cp1252)"
    from bert_finetune import config
    with pytest.raises(UserError, match="--encoding foo"):
        config.parse(["--encoding", "foo"])
    assert config.parse(["--encoding", "GBK"])[0].encoding == "GBK"
    assert "encoding" not in config.trajectory_keys()  # the same text either way


def test_predict_reads_json_and_parquet_inputs_and_names_records(tiny_model, tmp_path, capsys):
    from bert_finetune import predict
    rows = [{"review": "good film", "id": 1}, {"review": "", "id": 2}, {"review": "bad plot", "id": 3}]
    paths = write_all(tmp_path / "in", rows)
    outputs = {}
    for kind in ("json", "parquet", "tsv"):
        dst = tmp_path / f"out-{kind}.jsonl"
        predict.main(["--model", tiny_model, "--input", paths[kind], "--output", str(dst)])
        err = capsys.readouterr().err
        assert ("record 2)" if kind != "tsv" else "line 3)") in err, err  # the empty example, where it is
        outputs[kind] = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["review"] for o in outputs["json"]] == ["good film", "", "bad plot"]
    assert [o["id"] for o in outputs["json"]] == ["1", "2", "3"]  # read as strings, as from a CSV
    assert outputs["json"] == outputs["parquet"] == outputs["tsv"]


def test_evaluate_names_the_record_of_an_unknown_label(tiny_model, tmp_path, capsys):
    from bert_finetune import evaluate
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"label": "LABEL_0", "review": "good"}, {"label": "maybe", "review": "bad"}]))
    err = cli_error(evaluate.main, ["--model", tiny_model, "--data", path, "--output-dir", tmp_path / "e"], capsys)
    assert "'maybe'" in err and "(first on record 2)" in err
    assert not os.path.exists(tmp_path / "e")
