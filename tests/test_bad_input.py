"""Bad input: one line on stderr naming what and where, exit 2, no traceback, earlier outputs untouched."""
import hashlib
import os

import pytest

from conftest import python_m, run_train, train_args


@pytest.fixture(scope="module")
def earlier_run(tiny_model, tmp_path_factory):
    """A finished run whose outputs every bad invocation below must leave alone."""
    from conftest import synthetic_rows, write_csv
    d = tmp_path_factory.mktemp("bad-input")
    good = write_csv(d / "good.csv", synthetic_rows(60, 0))
    run_train(train_args(tiny_model, good, d / "out", "--epochs", 1))
    files = {
        "empty.csv": b"",
        "header_only.csv": b"label,review\n",
        "wrong_col.csv": b"label,text\n1,good\n0,bad\n",
        "one_class.csv": b"label,review\n1,good\n1,fine\n1,great\n1,nice\n1,ok\n",
        "too_few.csv": b"label,review\n1,good\n0,bad\n",
        "bad_bytes.csv": b"label,review\n1,fine\n1,\xff\xfe\xfa bad bytes\n0,fine\n",
        "blank_text.csv": b"label,review\n" + b"".join(b"%d,the good movie\n" % (i % 2) for i in range(20)) + b"1,\n0,  \n",
        "eval_unknown.csv": b"label,review\nneg,bad\nmaybe,the plot\n",
        "bad.yaml": b"batch_size: 4\nbatch_sise: 8\n",
        "bad_type.yaml": b"epochs: many\n",
        "notes.txt": b"not a model\n",
    }
    for name, content in files.items():
        (d / name).write_bytes(content)
    os.makedirs(d / "not_a_model", exist_ok=True)
    os.makedirs(d / "readonly", exist_ok=True)
    os.chmod(d / "readonly", 0o500)
    return d


def digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


CASES = [  # (name, flags ({d} = the fixture's folder), regex the one line must match)
    ("missing csv", "--train-file {d}/nope.csv", r"nope\.csv: no such file"),
    ("folder as csv", "--train-file {d}", r"is a folder"),
    ("empty csv", "--train-file {d}/empty.csv", r"empty\.csv: the file is empty"),
    ("header only", "--train-file {d}/header_only.csv", r"header_only\.csv: has a header but no rows"),
    ("text column absent", "--train-file {d}/wrong_col.csv", r"no column 'review'.*columns are: label, text"),
    ("label column absent", "--train-file {d}/good.csv --label-column stars", r"no column 'stars'"),
    ("single class", "--train-file {d}/one_class.csv", r"one_class\.csv: column 'label' holds a single class"),
    ("too few rows", "--train-file {d}/too_few.csv", r"too_few\.csv: 2 rows are too few"),
    ("undecodable bytes", "--train-file {d}/bad_bytes.csv", r"bad_bytes\.csv: line 3 is not valid UTF-8"),
    ("empty text, strict", "--train-file {d}/blank_text.csv --strict", r"blank_text\.csv: 2 row\(s\) with empty .*lines 22, 23"),
    ("eval label unknown", "--train-file {d}/good.csv --eval-file {d}/eval_unknown.csv",
     r"eval_unknown\.csv: line 3: label 'maybe' is not one the model knows"),
    ("unknown flag", "--train-file {d}/good.csv --no-such-flag 3", r"--no-such-flag"),
    ("unknown yaml key", "--train-file {d}/good.csv --config {d}/bad.yaml", r"bad\.yaml: unknown key 'batch_sise'"),
    ("wrong yaml type", "--train-file {d}/good.csv --config {d}/bad_type.yaml", r"bad_type\.yaml: epochs must be int"),
    ("wrong flag type", "--train-file {d}/good.csv --epochs two", r"--epochs must be int"),
    ("batch size 0", "--train-file {d}/good.csv --batch-size 0", r"--batch-size must be positive"),
    ("negative lr", "--train-file {d}/good.csv --lr -1", r"--lr \(learning rate\) must be a positive"),
    ("eval split >= 1", "--train-file {d}/good.csv --eval-split 1.5", r"--eval-split must be between 0 and 1"),
    ("max length over the model's", "--train-file {d}/good.csv --max-length 100000", r"--max-length 100000 is above .* \(64\)"),
    ("model folder missing", "--train-file {d}/good.csv --model {d}/nonexistent", r"nonexistent: no such model folder"),
    ("not a model folder", "--train-file {d}/good.csv --model {d}/not_a_model", r"not a model folder"),
    ("config file missing", "--train-file {d}/good.csv --config {d}/nope.yaml", r"nope\.yaml does not exist"),
    ("resume nothing", "--train-file {d}/good.csv --resume {d}/nonexistent_ckpt", r"nonexistent_ckpt: no such checkpoint"),
    ("output dir not writable", "--train-file {d}/good.csv --output-dir {d}/readonly/sub", r"readonly/sub: cannot be created"),
    ("output dir is a file", "--train-file {d}/good.csv --output-dir {d}/notes.txt", r"notes\.txt: cannot be created"),
]


@pytest.mark.parametrize("name,flags,says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(earlier_run, tiny_model, capsys, name, flags, says):
    import re
    from bert_finetune import train
    d = earlier_run
    if name == "output dir not writable" and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    before = digest(d / "out")
    argv = ["--single-gpu", "--model", tiny_model, "--output-dir", str(d / "out"), "--max-length", "32",
            "--epochs", "1", *flags.format(d=d).split()]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(says, err[0]), err
    assert digest(d / "out") == before


def test_bom_just_works_and_blank_rows_are_skipped_and_reported(tiny_model, tmp_path):
    from bert_finetune import reading
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefflabel,review\n1,good\n0,bad\n1,\n".encode("utf-8"))
    table = reading.read_table(str(path), "review", "label")
    assert list(table.columns[:2]) == ["text", "row"] and table["label"].tolist() == ["1", "0"]


def test_cli_error_has_no_traceback(tiny_model, tmp_path):
    p = python_m("bert_finetune.train", ["--single-gpu", "--model", tiny_model, "--train-file", tmp_path / "x.csv",
                                         "--output-dir", tmp_path / "o", "--max-length", 32])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: {tmp_path / 'x.csv'}: no such file"
