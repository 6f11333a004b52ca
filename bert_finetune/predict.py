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
import itertools
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import metrics, modeling, reading, reporting, runtime
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


# examples read, scored and written at a time: memory does not grow with the input
CHUNK = 10_000


def _batched(items, n: int):
    """Lists of n items at a time (the last may be shorter)."""
    items = iter(items)
    while part := list(itertools.islice(items, n)):
        yield part


def _file_lines(path: str, encoding: str = ""):
    """(line number, line) of a file, or of standard input for '-', decoded a block at a time as
    reading.stream_lines() does: the encoding detected, or --encoding's; a byte that does not decode is a
    one-line error."""
    if path == "-":
        yield from reading.stream_lines(sys.stdin.buffer, "standard input", encoding)
        return
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot be read: {e.strerror}") from None
    with f:
        yield from reading.stream_lines(f, path, encoding)


def iter_lines(path: str, encoding: str = "", chunk: int = CHUNK):
    """One example per line ('-' is standard input), `chunk` examples at a time."""
    for part in _batched(_file_lines(path, encoding), chunk):
        yield Inputs([t for _, t in part], [n for n, _ in part], None, "text")


def _jsonl_record(path: str, number: int, line: str, text_column: str, pair_column: str | None) -> dict:
    """One line of JSON Lines input as a record: an object with the text under `text_column` (and the pair's
    second text under `pair_column`), a JSON string (the text), or a blank line ({}: an empty example)."""
    if not line.strip():  # a blank line keeps its place as an empty example
        return {}
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {number} is not valid JSON: {e.msg}") from None
    if isinstance(obj, str):
        obj = {text_column: obj}
    if not isinstance(obj, dict):
        raise UserError(f"{path}: line {number}: expected an object or a string, got {type(obj).__name__}")
    for key, what in ((text_column, "--text-column"), (pair_column, "--text-pair-column")):
        if obj and key is not None and key not in obj:
            raise UserError(f"{path}: line {number}: no field '{key}' ({what}); "
                            f"the fields are: {', '.join(map(str, obj))}")
    return obj


def _field(record: dict, key: str) -> str:
    value = record.get(key, "")
    return "" if value is None else str(value)


def iter_jsonl(path: str, text_column: str, pair_column: str | None = None, encoding: str = "",
               chunk: int = CHUNK):
    """JSON Lines input (see _jsonl_record()), `chunk` examples at a time."""
    for part in _batched(_file_lines(path, encoding), chunk):
        records = [_jsonl_record(path, number, line, text_column, pair_column) for number, line in part]
        yield Inputs([_field(r, text_column) for r in records], [n for n, _ in part], records, text_column,
                     [_field(r, pair_column) for r in records] if pair_column is not None else None)


def iter_table_input(path: str, text_column: str, pair_column: str | None = None, encoding: str = "",
                     chunk: int = CHUNK):
    """A .csv, .tsv, .json or .parquet file, read by reading.iter_table() as training and evaluation read theirs
    (CSV, TSV and Parquet `chunk` rows at a time)."""
    for loaded in reading.iter_table(path, f"'{text_column}'", encoding, chunk):
        df = loaded.frame
        for column, what in ((text_column, "--text-column"), (pair_column, "--text-pair-column")):
            if column is not None and column not in loaded.columns:
                raise UserError(f"{path}: no column '{column}' ({what}); the columns are: "
                                f"{', '.join(loaded.columns)}")
        yield Inputs(df[text_column].tolist(), loaded.rows.tolist(), df.to_dict("records"), text_column,
                     df[pair_column].tolist() if pair_column is not None else None, loaded.unit)


def iter_inputs(path: str, text_column: str, pair_column: str | None = None, encoding: str = "",
                chunk: int = CHUNK):
    """--input's examples, `chunk` at a time, by the file's name: JSON Lines, a table, or one per line."""
    if path != "-" and not os.path.exists(path):
        raise UserError(f"--input {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"--input {path}: is a folder, not a file")
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".ndjson"):  # its own reader: a JSON string per line, and blank lines, are examples
        return iter_jsonl(path, text_column, pair_column, encoding, chunk)
    if extension in reading.FORMATS:
        return iter_table_input(path, text_column, pair_column, encoding, chunk)
    if pair_column is not None:
        raise UserError(f"--input {path}: sentence pairs (--text-pair-column {pair_column}) need a table (.csv, "
                        f".tsv, .json, .parquet) or .jsonl input with both texts")
    return iter_lines(path, encoding, chunk)


# ---------------------------------------------------------------- output

def over_threshold(p: np.ndarray, names, thresholds) -> list:
    """A multi-label model's prediction for one example: the labels whose probability reaches their threshold."""
    return [n for n, hit in zip(names, metrics.predicted(p, thresholds)) if hit]


def output_rows(inputs: Inputs, probs: np.ndarray, names, nested: bool, thresholds=None, sep: str = "|") -> list:
    """One dict per input example: its own fields, then prediction, probability and every label's
    probability (nested under `probabilities`, or flat as `prob_LABEL` columns). A multi-label model
    (thresholds given): prediction is the list of labels over their thresholds (in CSV joined by sep), and
    there is no single probability."""
    rows = []
    for i, text in enumerate(inputs.texts):
        row = dict(inputs.records[i]) if inputs.records is not None else {inputs.text_key: text}
        if inputs.records is None and inputs.pairs is not None:
            row["text_pair"] = inputs.pairs[i]
        p = probs[i]
        empty = np.isnan(p).any()
        if thresholds is not None:
            chosen = None if empty else over_threshold(p, names, thresholds)
            row["prediction"] = chosen if nested or chosen is None else sep.join(chosen)
        else:
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


class Output:
    """Where predictions go, a chunk at a time: LABEL<tab>PROBABILITY<tab>TEXT lines on standard output (no
    --output), JSON Lines on standard output (-), or a CSV or JSON Lines file by its name, written under a
    temporary name and renamed once all is written, so that an interrupted run leaves no half-written file. The
    CSV's columns are those of the first chunk's rows."""

    def __init__(self, path: str | None, names, thresholds=None, sep: str = "|"):
        self.path, self.names, self.count = path, names, 0
        self.thresholds, self.sep = thresholds, sep  # multi-label: the labels over their thresholds, joined by sep
        self.kind = output_kind(path) if path else "lines"
        self.columns, self.file, self.tmp = None, None, None
        if self.kind in ("csv", "jsonl"):
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise UserError(f"--output {path}: the folder {parent} does not exist")
            self.tmp = f"{path}.tmp-{os.getpid()}"
            self.file = self._io(open, self.tmp, "w", encoding="utf-8", newline="")

    def _io(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise UserError(f"--output {self.path}: cannot be written: {e.strerror}") from None

    def write(self, inputs: Inputs, probs: np.ndarray):
        self.count += len(inputs.texts)
        if self.kind == "lines":
            print_predictions(inputs, probs, self.names, self.thresholds, self.sep)
            return
        rows = output_rows(inputs, probs, self.names, nested=self.kind != "csv", thresholds=self.thresholds,
                           sep=self.sep)
        if self.kind == "csv":
            # object columns: a value is written as it was read (an integer field with a gap stays 1, not 1.0)
            frame = pd.DataFrame(rows, columns=self.columns, dtype=object)
            self._io(frame.to_csv, self.file, index=False, header=self.columns is None)
            self.columns = list(frame.columns)
        else:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            if self.file is None:
                sys.stdout.write(lines)
                sys.stdout.flush()
            else:
                self._io(self.file.write, lines)

    def close(self, complete: bool):
        """Rename the written file into place if `complete`, else remove it."""
        if self.file is None:
            return
        try:
            self._io(self.file.close)
            if complete:
                self._io(os.replace, self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def _one_line(text: str) -> str:
    return " ".join(text.split()) if any(c in text for c in "\t\r\n") else text


# ---------------------------------------------------------------- CLI

@dataclass
class Flagged:
    """Examples of one kind worth a warning (empty, truncated), over all chunks: how many, and where the first
    few are."""
    count: int = 0
    first: list = field(default_factory=list)

    def add(self, inputs: Inputs, positions):
        self.count += len(positions)
        self.first += [inputs.lines[i] for i in positions[:5 - len(self.first)]]

    def where(self, what: str) -> str:
        plural = "s" if self.count > 1 and what in ("line", "record") else ""
        return f"{what}{plural} {', '.join(map(str, self.first))}{' ...' if self.count > 5 else ''}"


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
    parser.add_argument("--chunk-size", type=int, default=CHUNK,
                        help=f"examples read, scored and written at a time (default {CHUNK}): memory does not grow "
                             f"with the input")
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
    for flag, value in (("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
        if value < 1:
            raise UserError(f"{flag} must be positive, got {value}")
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


def score(predictor: Predictor, inputs: Inputs, batch_size: int, empty: Flagged, cut: Flagged) -> np.ndarray:
    """Probabilities per example, in input order; rows of nan for empty examples. Empty examples, and those
    longer than max_length (truncated), are added to `empty` and `cut`."""
    def filled(i):  # a sentence pair needs both texts
        return bool(inputs.texts[i].strip()) and (inputs.pairs is None or bool(inputs.pairs[i].strip()))
    present = [i for i in range(len(inputs.texts)) if filled(i)]
    empty.add(inputs, [i for i in range(len(inputs.texts)) if not filled(i)])
    probs = np.full((len(inputs.texts), len(predictor.labels)), np.nan, dtype=np.float32)
    if present:
        pairs = [inputs.pairs[i] for i in present] if inputs.pairs is not None else None
        texts = [inputs.texts[i] for i in present]
        ids, types = predictor.tokenize(texts, pairs)
        cut.add(inputs, [present[i] for i in np.flatnonzero(predictor.truncated(ids, texts, pairs))])
        probs[present] = predictor.scores(ids, batch_size, len(present) > 8 * batch_size, types)
    return probs


def print_predictions(inputs: Inputs, probs: np.ndarray, names, thresholds=None, sep: str = "|"):
    """LABEL<tab>PROBABILITY<tab>TEXT (<tab>PAIR) per example on standard output; for a multi-label model
    LABELS<tab>PROBABILITIES<tab>TEXT, the labels over their thresholds and their probabilities joined by sep."""
    out = []
    for i, (text, p) in enumerate(zip(inputs.texts, probs)):
        shown = _one_line(text) + (f"\t{_one_line(inputs.pairs[i])}" if inputs.pairs is not None else "")
        if np.isnan(p).any():
            out.append(f"\t\t{shown}")
        elif thresholds is not None:
            chosen = over_threshold(p, names, thresholds)
            shares = sep.join(f"{p[names.index(n)]:.4f}" for n in chosen)
            out.append(f"{sep.join(chosen)}\t{shares}\t{shown}")
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
    if args.output:
        output_kind(args.output)  # a wrong --output name fails before anything is read
    # the input's first chunk is read before the model loads: a wrong column or file fails at once
    saved = saved_settings(modeling.resolve(args.model))
    text_column = args.text_column or saved.get("text_column") or DEFAULT_TEXT_COLUMN
    pair_column = args.text_pair_column or saved.get("text_pair_column") or None
    if args.text is not None:
        chunks = iter([command_line_inputs(args, pair_column)])
    elif args.text_pair is not None:
        raise UserError("--text-pair goes with --text; with --input name the column with --text-pair-column")
    else:
        chunks = iter_inputs(args.input, text_column, pair_column, args.encoding, args.chunk_size)
    first = next(chunks, None)
    predictor = Predictor(args.model, device=args.device, max_length=args.max_length,
                          trust_remote_code=args.trust_remote_code, precision=args.precision,
                          backend=args.backend, threads=args.threads)
    output = Output(args.output, predictor.labels.names, predictor.thresholds,
                    predictor.saved.get("label_sep") or "|")
    empty, cut, what = Flagged(), Flagged(), "--text" if args.text is not None else None
    complete = False
    try:
        for inputs in itertools.chain([first] if first is not None else [], chunks):
            what = what or inputs.unit
            output.write(inputs, score(predictor, inputs, args.batch_size, empty, cut))
        complete = True
    finally:
        output.close(complete)
    if empty.count:
        log.warning("%d empty example(s) (%s) get an empty prediction", empty.count, empty.where(what))
    if cut.count:
        log.warning("%d of %d example(s) are longer than %d tokens and were truncated (%s)", cut.count,
                    output.count - empty.count, predictor.max_length, cut.where(what))
    if output.kind in ("csv", "jsonl"):
        log.info("%d prediction(s) written to %s", output.count, args.output)


if __name__ == "__main__":
    main()
