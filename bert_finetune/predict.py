"""Apply a trained model to text: the predicted label, its probability, and every label's probability.

    python -m bert_finetune.predict --model OUTPUT/best --text "..." [--text "..."]
    python -m bert_finetune.predict --model OUTPUT/best --input FILE|- [--output FILE.csv|FILE.jsonl|-]

--input: a .csv, .tsv, .json (a list of objects) or .parquet file (the text in --text-column), a .jsonl
file (one object per line, the text in --text-column, or one JSON string per line), any other file one
example per line, or - for lines on standard input; the text encoding is detected (--encoding forces
one). A model trained on sentence pairs takes the second text from --text-pair (one per --text) or from
--text-pair-column of a table or .jsonl input. Without --output each example prints as
LABEL<tab>PROBABILITY<tab>TEXT (<tab>PAIR); --output writes CSV or JSON Lines by its extension
(- = JSON Lines on standard output) with the input's own fields followed by prediction, probability
and the probability of every label. Output rows follow input rows one to one: an empty example gets
an empty prediction.

--backend onnx scores with ONNX Runtime on a folder that bert_finetune.export wrote (chosen by itself when
--model holds model.onnx); inputs, outputs and errors are the same whichever backend. --threads: CPU threads
(default: every core this process may use, or OMP_NUM_THREADS when set).
"""
import json
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import modeling, reading, reporting, runtime
from .config import CHOICES, text_encoding
from .errors import ArgumentParser, UserError, cli
from .inference import BACKENDS, DEFAULT_TEXT_COLUMN, Predictor, saved_settings

log = logging.getLogger("bert_finetune")


# ---------------------------------------------------------------- input

@dataclass
class Inputs:
    texts: list  # one per example, in input order ("" = nothing to classify)
    lines: list  # where each example is in its source (line number, or --text position), for messages
    records: list | None  # the input's own fields per example (CSV, JSON Lines), kept in the output
    text_key: str  # the text's field name in the output
    pairs: list | None = None  # the second text of each sentence pair
    unit: str = "line"  # what `lines` counts in a file: line, or record (JSON, Parquet)


def _numbered_lines(text: str) -> list:
    """(line number, line) for each line of a text, without the line endings (\n or \r\n)."""
    lines = text.split("\n")
    if lines[-1] == "":  # the last line's ending, or an empty text
        lines.pop()
    return [(number, line.rstrip("\r")) for number, line in enumerate(lines, 1)]


def _read_file_lines(path: str, encoding: str = "") -> list:
    """A file's (or, for '-', standard input's) numbered lines, decoded as reading.decode_bytes() does: the
    encoding detected, or --encoding's; a byte that does not decode is a one-line error."""
    if path == "-":
        return _numbered_lines(reading.decode_bytes(sys.stdin.buffer.read(), "standard input", encoding))
    return _numbered_lines(reading.read_text(path, encoding))


def read_lines(path: str, encoding: str = "") -> Inputs:
    """One example per line; '-' is standard input."""
    lines = _read_file_lines(path, encoding)
    return Inputs([t for _, t in lines], [n for n, _ in lines], None, "text")


def read_jsonl(path: str, text_column: str, pair_column: str | None = None, encoding: str = "") -> Inputs:
    """One JSON object per line with the text under `text_column` (and the pair's second text under
    `pair_column`), or one JSON string per line."""
    texts, numbers, records, pairs = [], [], [], []
    for number, line in _read_file_lines(path, encoding):
        if not line.strip():  # a blank line keeps its place as an empty example
            obj = {}
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {number} is not valid JSON: {e.msg}") from None
        if isinstance(obj, str):
            obj = {text_column: obj}
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {number}: expected an object or a string, got {type(obj).__name__}")
        for field, what in ((text_column, "--text-column"), (pair_column, "--text-pair-column")):
            if obj and field is not None and field not in obj:
                raise UserError(f"{path}: line {number}: no field '{field}' ({what}); "
                                f"the fields are: {', '.join(map(str, obj))}")
        text = obj.get(text_column, "")
        texts.append("" if text is None else str(text))
        if pair_column is not None:
            pair = obj.get(pair_column, "")
            pairs.append("" if pair is None else str(pair))
        numbers.append(number)
        records.append(obj)
    return Inputs(texts, numbers, records, text_column, pairs if pair_column is not None else None)


def read_table_input(path: str, text_column: str, pair_column: str | None = None, encoding: str = "") -> Inputs:
    """A .csv, .tsv, .json or .parquet file, read by reading.load_table() as training and evaluation read theirs."""
    loaded = reading.load_table(path, f"'{text_column}'", encoding=encoding)
    df = loaded.frame
    for column, what in ((text_column, "--text-column"), (pair_column, "--text-pair-column")):
        if column is not None and column not in df.columns:
            raise UserError(f"{path}: no column '{column}' ({what}); the columns are: {', '.join(df.columns)}")
    return Inputs(df[text_column].tolist(), loaded.rows.tolist(), df.to_dict("records"), text_column,
                  df[pair_column].tolist() if pair_column is not None else None, loaded.unit)


def read_inputs(path: str, text_column: str, pair_column: str | None = None, encoding: str = "") -> Inputs:
    if path != "-" and not os.path.exists(path):
        raise UserError(f"--input {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"--input {path}: is a folder, not a file")
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".ndjson"):  # its own reader: a JSON string per line, and blank lines, are examples
        return read_jsonl(path, text_column, pair_column, encoding)
    if extension in reading.FORMATS:
        return read_table_input(path, text_column, pair_column, encoding)
    if pair_column is not None:
        raise UserError(f"--input {path}: sentence pairs (--text-pair-column {pair_column}) need a table (.csv, "
                        f".tsv, .json, .parquet) or .jsonl input with both texts")
    return read_lines(path, encoding)


# ---------------------------------------------------------------- output

def output_rows(inputs: Inputs, probs: np.ndarray, names, nested: bool) -> list:
    """One dict per input example: its own fields, then prediction, probability and every label's
    probability (nested under `probabilities`, or flat as `prob_LABEL` columns)."""
    rows = []
    for i, text in enumerate(inputs.texts):
        row = dict(inputs.records[i]) if inputs.records is not None else {inputs.text_key: text}
        if inputs.records is None and inputs.pairs is not None:
            row["text_pair"] = inputs.pairs[i]
        p = probs[i]
        empty = np.isnan(p).any()
        best = None if empty else int(p.argmax())
        row["prediction"] = None if empty else names[best]
        row["probability"] = None if empty else round(float(p[best]), 6)
        every = {name: None if empty else round(float(v), 6) for name, v in zip(names, p)}
        if nested:
            row["probabilities"] = None if empty else every
        else:
            row.update({f"prob_{name}": v for name, v in every.items()})
        rows.append(row)
    return rows


def output_kind(path: str) -> str:
    """csv, jsonl, or stdout (JSON Lines on standard output), from --output's name."""
    if path == "-":
        return "stdout"
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".csv", ".jsonl", ".ndjson"):
        raise UserError(f"--output {path}: name a .csv or .jsonl file (or - for JSON Lines on standard output)")
    return "csv" if extension == ".csv" else "jsonl"


def write_output(path: str, rows: list):
    """CSV or JSON Lines by the name; a file is written under a temporary name and renamed, so an
    interrupted run leaves no half-written file."""
    kind = output_kind(path)
    if kind == "stdout":
        sys.stdout.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        sys.stdout.flush()
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"--output {path}: the folder {parent} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if kind == "csv":
            pd.DataFrame(rows).to_csv(tmp, index=False, encoding="utf-8")
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"--output {path}: cannot be written: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _one_line(text: str) -> str:
    return " ".join(text.split()) if any(c in text for c in "\t\r\n") else text


# ---------------------------------------------------------------- CLI

def _where(inputs: Inputs, positions, what: str) -> str:
    shown = ", ".join(str(inputs.lines[i]) for i in positions[:5])
    plural = "s" if len(positions) > 1 and what in ("line", "record") else ""
    return f"{what}{plural} {shown}{' ...' if len(positions) > 5 else ''}"


def parse_args(argv):
    parser = ArgumentParser(prog="bert_finetune.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved model folder, e.g. outputs/best")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify (repeatable)")
    source.add_argument("--input", help="a .csv, .tsv, .jsonl, .json or .parquet file, or a text file (one example "
                                        "per line); - for standard input")
    parser.add_argument("--output", help="a .csv or .jsonl file to write (- = JSON Lines on standard output); "
                                         "default: LABEL<tab>PROBABILITY<tab>TEXT lines on standard output")
    parser.add_argument("--text-column", help="the text's column (CSV) or field (JSON Lines); default: the one the "
                                              f"model was trained with, else '{DEFAULT_TEXT_COLUMN}'")
    parser.add_argument("--text-pair", action="append", help="the second text of a sentence pair, one per --text")
    parser.add_argument("--text-pair-column", help="the second text's column (CSV) or field (JSON Lines); default: "
                                                   "the one the model was trained with, if any")
    parser.add_argument("--encoding", default="", help="--input's text encoding, e.g. gb18030, utf-16, cp1252 "
                                                       "(default: detected)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, help="default: the length the model was trained with")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    parser.add_argument("--precision", choices=CHOICES["precision"], default="auto",
                        help="auto (default): bf16 or fp16 autocast on CUDA as in training, fp32 on CPU")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="torch, or onnx (ONNX Runtime on an exported folder); auto (default): onnx when "
                             "--model holds model.onnx")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: every core this process may use, or OMP_NUM_THREADS)")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 0:
        raise UserError(f"--threads must be positive, got {args.threads}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {args.max_length}")
    if args.encoding:
        text_encoding(args.encoding)
    if not os.path.isdir(args.model) and os.path.exists(args.model):
        raise UserError(f"--model {args.model}: not a model folder")
    try:
        args.device = torch.device(args.device) if args.device else None
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if args.device is not None and args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU is available")
    if args.backend == "onnx":  # before the input is read: a missing extra is the first thing to say
        runtime.require("onnxruntime", what="--backend onnx")
    args.threads = args.threads or runtime.default_threads()
    return args


def command_line_inputs(args, pair_column: str | None) -> Inputs:
    """The examples of --text (and --text-pair)."""
    if args.text_pair is None and pair_column:
        raise UserError(f"--model {args.model} was trained on sentence pairs (column '{pair_column}'): "
                        f"give one --text-pair per --text")
    if args.text_pair is not None and len(args.text_pair) != len(args.text):
        raise UserError(f"{len(args.text)} --text but {len(args.text_pair)} --text-pair: give one pair per text")
    return Inputs(list(args.text), [f"#{i}" for i in range(1, len(args.text) + 1)], None, "text",
                  list(args.text_pair) if args.text_pair is not None else None)


def score(predictor: Predictor, inputs: Inputs, batch_size: int, what: str) -> np.ndarray:
    """Probabilities per example, in input order; rows of nan for empty examples. Empty and truncated
    examples are reported (`what` names where they are: line or --text)."""
    def filled(i):  # a sentence pair needs both texts
        return bool(inputs.texts[i].strip()) and (inputs.pairs is None or bool(inputs.pairs[i].strip()))
    present = [i for i in range(len(inputs.texts)) if filled(i)]
    empty = [i for i in range(len(inputs.texts)) if not filled(i)]
    if empty:
        log.warning("%d empty example(s) (%s) get an empty prediction", len(empty), _where(inputs, empty, what))
    probs = np.full((len(inputs.texts), len(predictor.labels)), np.nan, dtype=np.float32)
    if present:
        pairs = [inputs.pairs[i] for i in present] if inputs.pairs is not None else None
        texts = [inputs.texts[i] for i in present]
        ids, types = predictor.tokenize(texts, pairs)
        cut = np.flatnonzero(predictor.truncated(ids, texts, pairs))
        if len(cut):
            log.warning("%d of %d example(s) are longer than %d tokens and were truncated (%s)", len(cut),
                        len(present), predictor.max_length, _where(inputs, [present[i] for i in cut], what))
        probs[present] = predictor.scores(ids, batch_size, len(present) > 8 * batch_size, types)
    return probs


def print_predictions(inputs: Inputs, probs: np.ndarray, names):
    """LABEL<tab>PROBABILITY<tab>TEXT (<tab>PAIR) per example on standard output."""
    out = []
    for i, (text, p) in enumerate(zip(inputs.texts, probs)):
        shown = _one_line(text) + (f"\t{_one_line(inputs.pairs[i])}" if inputs.pairs is not None else "")
        if np.isnan(p).any():
            out.append(f"\t\t{shown}")
        else:
            best = int(p.argmax())
            out.append(f"{names[best]}\t{p[best]:.4f}\t{shown}")
    sys.stdout.write("".join(line + "\n" for line in out))
    sys.stdout.flush()


@cli
def main(argv=None):
    args = parse_args(argv)
    reporting.setup_logging()
    log.handlers[0].setStream(sys.stderr)  # standard output carries the predictions only
    kind = output_kind(args.output) if args.output else None
    # the input is read before the model loads: a wrong column or file fails at once
    saved = saved_settings(modeling.resolve(args.model))
    text_column = args.text_column or saved.get("text_column") or DEFAULT_TEXT_COLUMN
    pair_column = args.text_pair_column or saved.get("text_pair_column") or None
    if args.text is not None:
        inputs = command_line_inputs(args, pair_column)
    elif args.text_pair is not None:
        raise UserError("--text-pair goes with --text; with --input name the column with --text-pair-column")
    else:
        inputs = read_inputs(args.input, text_column, pair_column, args.encoding)
    predictor = Predictor(args.model, device=args.device, max_length=args.max_length,
                          trust_remote_code=args.trust_remote_code, precision=args.precision,
                          backend=args.backend, threads=args.threads)
    probs = score(predictor, inputs, args.batch_size, "--text" if args.text is not None else inputs.unit)
    if not args.output:
        print_predictions(inputs, probs, predictor.labels.names)
        return
    write_output(args.output, output_rows(inputs, probs, predictor.labels.names, nested=kind != "csv"))
    if kind != "stdout":
        log.info("%d prediction(s) written to %s", len(inputs.texts), args.output)


if __name__ == "__main__":
    main()
