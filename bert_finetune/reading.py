"""A user's data file read into a table of strings, whatever its format (CSV, TSV, JSON Lines, JSON,
Parquet, by extension) and text encoding (detected, or forced with --encoding); every problem one line that
names the file and the line or record."""
import codecs
import csv
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import text_encoding
from .errors import UserError

log = logging.getLogger("bert_finetune")


SAMPLE_BYTES = 1 << 20
# byte-order marks, longest first (UTF-32-LE's starts with UTF-16-LE's); the codecs named drop them
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# file name endings and their formats; anything else is read as CSV
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
           ".parquet": "parquet"}
ENCODING_HINT = "pass --encoding to force one"
UNSURE = "no other encoding could be told for sure; single-byte ones such as cp1252 never can"


def file_format(path: str) -> str:
    """csv, tsv, jsonl, json or parquet, by the file's name ending (csv for any other)."""
    return FORMATS.get(os.path.splitext(path)[1].lower(), "csv")


def encoding_name(codec: str) -> str:
    """A codec as people write it: UTF-8 (also for utf-8-sig), UTF-16, GB18030, CP1252."""
    return {"utf-8-sig": "UTF-8"}.get(codec, codec.upper())


def _mostly_utf8(sample: bytes) -> bool:
    """UTF-8 with a few damaged bytes: nearly all non-ASCII characters decode (GBK or Big5 text read as UTF-8
    gives about one good character per five bad ones)."""
    text = sample.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    good = len(text) - len(text.encode("ascii", errors="ignore")) - bad
    return good > 0 and good >= 8 * bad


def _guess(sample: bytes) -> str:
    """charset-normalizer's guess among the multi-byte encodings, "" if it has none. Short Chinese samples often
    decode as well in Korean or Japanese codecs: on a tie GB18030 wins (and always stands for GBK and GB2312,
    which it extends)."""
    try:
        from charset_normalizer import from_bytes
        from charset_normalizer.utils import is_multi_byte_encoding
    except ImportError:
        return ""
    # multi-byte encodings (CJK, UTF-16/32) have a byte structure that a decode checks; a single-byte one decodes
    # any bytes, so its fit is no evidence
    matches = [m for m in from_bytes(sample) if is_multi_byte_encoding(m.encoding)]
    if not matches:
        return ""
    best = min(matches, key=lambda m: m.chaos)
    tied = [codecs.lookup(m.encoding).name for m in matches if m.chaos <= best.chaos + 1e-9]
    chinese = [c for c in tied if c in ("gb18030", "gbk", "gb2312")]
    return "gb18030" if chinese else codecs.lookup(best.encoding).name


def detect_encoding(sample: bytes, whole: bool = True) -> tuple[str, str]:
    """(codec, how it was found) for a file's first bytes (`whole`: the sample is the whole file).

    A byte-order mark settles it; then strict UTF-8 (so plain ASCII and UTF-8 stay UTF-8, also with a few
    damaged bytes, which are then reported); only then charset-normalizer, trusted for multi-byte encodings only:
    a single-byte one (cp1252, ...) decodes any bytes, so a guess of one is no evidence and such a file needs
    --encoding. The codec is utf-8 where nothing else fits; `how` then says so.
    """
    for bom, codec in _BOMS:
        if sample.startswith(bom):
            return codec, f"detected by its {encoding_name(codec)} byte-order mark"
    half = len(sample) // 2
    if half and b"\0" in sample:  # no text has NUL bytes, but UTF-16 without a mark has one in every ASCII letter
        even, odd = sample[0::2].count(0), sample[1::2].count(0)
        for codec, nul, other in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
            if nul > 0.3 * half and other < 0.05 * half:
                return codec, "detected by its NUL bytes, UTF-16 without a byte-order mark"
    try:
        # incremental: a character cut by the sample's end is no error
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=whole)
        return "utf-8", "detected" if whole else f"detected from the first {SAMPLE_BYTES >> 20} MB"
    except UnicodeDecodeError:
        pass
    if _mostly_utf8(sample):
        return "utf-8", "detected: UTF-8 with some damaged bytes"
    if not whole:  # end the sample at a line's end: a multi-byte character cut in two would spoil the guess
        end = sample.rfind(b"\n")
        if end > 0:
            sample = sample[:end + 2 if sample[end + 1:end + 2] == b"\0" else end + 1]  # UTF-16's \n\0 whole
    guessed = _guess(sample)
    if guessed:
        return guessed, "detected by charset-normalizer"
    return "utf-8", UNSURE


def resolve_encoding(path: str, encoding: str = "", sample: bytes | None = None) -> tuple[str, str]:
    """(codec, how) for a file: --encoding's, or detected from its first SAMPLE_BYTES."""
    if encoding:
        codec, how = text_encoding(encoding, f"{path}: --encoding"), f"--encoding {encoding}"
    else:
        if sample is None:
            with open(path, "rb") as f:
                sample = f.read(SAMPLE_BYTES + 1)
        whole = len(sample) <= SAMPLE_BYTES
        codec, how = detect_encoding(sample[:SAMPLE_BYTES], whole)
    return codec, how


def _log_read(path: str, codec: str, how: str):
    """One INFO line after a file decoded: its encoding and how it was chosen. Plain UTF-8, the everyday case, only
    at DEBUG (predict's standard error stays free for its warnings and errors)."""
    level = logging.DEBUG if codec == "utf-8" and how.startswith("detected") else logging.INFO
    log.log(level, "%s: read as %s text (%s)", path, encoding_name(codec), how)


def _undecodable(name: str, raw: bytes, codec: str, how: str, error: UnicodeDecodeError | None,
                 line: int = 0) -> UserError:
    """The one line for bytes that `codec` cannot decode: the line they are on (`line`, or where `error` is in
    `raw`), and what to do."""
    line = line or raw[:error.start].decode(codec, errors="replace").count("\n") + 1
    hint = f"{how}; {ENCODING_HINT}"
    if how.startswith("--encoding"):
        detected, found = detect_encoding(raw[:SAMPLE_BYTES], len(raw) <= SAMPLE_BYTES)
        hint = how if found == UNSURE or detected == codec else \
            f"{how}; it looks like {encoding_name(detected)}: leave out --encoding to have it detected"
    return UserError(f"{name}: line {line} is not valid {encoding_name(codec)} text ({hint})")


def decode_bytes(raw: bytes, name: str, encoding: str = "") -> str:
    """A whole file's (or standard input's) bytes as text, in --encoding's or the detected encoding, without a
    byte-order mark; bytes that do not decode are one UserError line naming `name` and the line."""
    codec, how = resolve_encoding(name, encoding, raw[:SAMPLE_BYTES + 1])
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        raise _undecodable(name, raw, codec, how, e) from None
    _log_read(name, codec, how)
    return text


def read_text(path: str, encoding: str = "") -> str:
    """A whole text file, decoded as decode_bytes() does."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot be read: {e.strerror}") from None
    return decode_bytes(raw, path, encoding)


@dataclass
class Loaded:
    """A data file's table as read: every cell a string, and where each row is in the file."""
    frame: pd.DataFrame  # the file's own columns
    rows: np.ndarray  # per row its line (CSV and TSV: the header is line 1; JSON Lines) or record number (from 1)
    unit: str  # what `rows` counts: "line" or "record"
    format: str  # csv, tsv, jsonl, json or parquet
    columns: list  # every column (field) name the file has, read or not


def _as_text(value) -> str:
    """A JSON or Parquet value as the string a CSV cell would hold: 1 -> "1", null -> "", true -> "true"."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple, dict)) and pd.isna(value):  # None, NaN, pandas' NA
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return str(value)


def _records_frame(records: list) -> pd.DataFrame:
    """JSON objects -> a table of strings, a column per key in order of appearance; a key that a record lacks is
    an empty cell there."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    return pd.DataFrame({key: [_as_text(record.get(key)) for record in records] for key in keys}, dtype=object)


def _read_csv(path: str, sep: str, limit: int, encoding: str, expected_header: str,
              columns: list | None = None, chunk: int = 0):
    """(the table, holding only `columns` if given, and every column name of the header); with `chunk`, (an
    iterator of tables of `chunk` rows, the names)."""
    codec, how = resolve_encoding(path, encoding)
    options = {"sep": sep, "encoding": codec, "dtype": str, "keep_default_na": False}
    with _csv_errors(path, sep, codec, how, encoding, expected_header):
        # pandas renames a repeated column name (review, review.1): the header's own names are checked
        names = [str(c) for c in pd.read_csv(path, nrows=1, header=None, **options).iloc[0]]
        _refuse_repeated_names(path, names, "the header names")
        # only the columns the job reads: the others would cost a Python string per cell
        usecols = [n for n in names if n in columns] if columns else None
        df = pd.read_csv(path, nrows=limit or None, quoting=csv.QUOTE_MINIMAL, usecols=usecols,
                         chunksize=chunk or None, **options)
    if chunk:
        return _checked_chunks(df, path, sep, codec, how, encoding, expected_header), names
    _log_read(path, codec, how)
    return df, names


def _checked_chunks(reader, path, sep, codec, how, encoding, expected_header):
    """pandas' chunks of a CSV, its errors as _csv_errors() says them; the encoding logged once the first chunk
    decoded."""
    with _csv_errors(path, sep, codec, how, encoding, expected_header):
        for number, frame in enumerate(reader):
            if number == 0:
                _log_read(path, codec, how)
            yield frame


@contextmanager
def _csv_errors(path: str, sep: str, codec: str, how: str, encoding: str, expected_header: str):
    """pandas' errors while reading a CSV or TSV as one UserError line each."""
    try:
        yield
    except UnicodeDecodeError:
        with open(path, "rb") as f:  # where: pandas' offset counts in its own buffer, not in the file
            raw = f.read()
        try:
            raw.decode(codec)
        except UnicodeDecodeError as e:
            raise _undecodable(path, raw, codec, how, e) from None
        raise UserError(f"{path}: is not valid {encoding_name(codec)} text ({how}; {ENCODING_HINT})") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty (expected a header line such as {expected_header})") from None
    except pd.errors.ParserError as e:
        what = "TSV" if sep == "\t" else "CSV"
        raise UserError(f"{path}: not a valid {what}: {str(e).strip().splitlines()[-1]}") from None


def _refuse_repeated_names(path: str, names: list, where: str):
    """A column named twice is an error that names it: which of the two is meant is the user's call."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{path}: {where} column(s) {', '.join(map(repr, repeated))} more than once; "
                        f"rename them so that each column has its own name")


def _read_jsonl(path: str, limit: int, encoding: str) -> tuple[pd.DataFrame, list]:
    """One JSON object per line (blank lines skipped): the table and each record's line number."""
    records, lines = [], []
    for number, line in enumerate(read_text(path, encoding).split("\n"), 1):
        if limit and len(records) == limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {number} is not valid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        lines.append(number)
    return _records_frame(records), lines


def _read_json(path: str, limit: int, encoding: str) -> pd.DataFrame:
    """A JSON list of objects (records)."""
    try:
        found = json.loads(read_text(path, encoding))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(found, list):
        raise UserError(f"{path}: expected a JSON list of objects (records), got {type(found).__name__}")
    found = found[:limit] if limit else found
    for number, record in enumerate(found, 1):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {number}: expected a JSON object, got {type(record).__name__}")
    return _records_frame(found)


def _open_parquet(path: str):
    """(the open Parquet file, every column name), with one-line errors: pyarrow missing, not Parquet, a
    column named twice."""
    if importlib.util.find_spec("pyarrow") is None:
        raise UserError(f"{path}: reading Parquet files needs pyarrow: pip install 'bert-finetune[parquet]' "
                        f"(or pip install pyarrow)")
    import pyarrow.parquet as pq
    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise _not_parquet(path, e) from None
    names = [str(c) for c in file.schema_arrow.names]
    _refuse_repeated_names(path, names, "the file names")
    return file, names


def _not_parquet(path: str, error: Exception) -> UserError:
    return UserError(f"{path}: not a valid Parquet file: {str(error).strip().splitlines()[0]}")


def _parquet_frame(records, names: list, columns: list | None) -> pd.DataFrame:
    """A pyarrow table or record batch as a table of strings, of `columns` only if given. Python values, not
    pandas': an integer column with a null stays 1, not 1.0."""
    return pd.DataFrame({name: [_as_text(v) for v in records.column(i).to_pylist()]
                         for i, name in enumerate(names) if not columns or name in columns}, dtype=object)


def _read_parquet(path: str, limit: int, columns: list | None = None) -> tuple[pd.DataFrame, list]:
    """(the table, holding only `columns` if given, and every column name of the file)."""
    file, names = _open_parquet(path)
    try:
        table = file.read()
    except (OSError, ValueError) as e:
        raise _not_parquet(path, e) from None
    return _parquet_frame(table.slice(0, limit) if limit else table, names, columns), names


def load_table(path: str, expected_header: str, limit: int = 0, encoding: str = "",
               columns: list | None = None) -> Loaded:
    """A data file by its name's ending: .csv, .tsv, .jsonl (one object per line), .json (a list of objects),
    .parquet, anything else as CSV; the first `limit` rows (0 = all); of CSV, TSV and Parquet only `columns`
    (those of them the file has) if given. Every cell is a string as written (a label NA stays "NA"; a JSON 1
    becomes "1"). Text is in `encoding` or the detected one (resolve_encoding()).

    Every failure is one UserError naming the file (and the line or record).
    """
    kind = file_format(path)
    try:
        if os.path.getsize(path) == 0:
            header = f" (expected a header line such as {expected_header})" if kind in ("csv", "tsv") else ""
            raise UserError(f"{path}: the file is empty{header}")
        if kind in ("csv", "tsv"):
            frame, names = _read_csv(path, "\t" if kind == "tsv" else ",", limit, encoding, expected_header, columns)
            return Loaded(frame, np.arange(2, len(frame) + 2), "line", kind, names)
        if kind == "jsonl":
            frame, lines = _read_jsonl(path, limit, encoding)
            return Loaded(frame, np.asarray(lines, dtype=np.int64), "line", kind, [str(c) for c in frame.columns])
        if kind == "json":
            frame = _read_json(path, limit, encoding)
            names = [str(c) for c in frame.columns]
        else:
            frame, names = _read_parquet(path, limit, columns)
        return Loaded(frame, np.arange(1, len(frame) + 1), "record", kind, names)
    except OSError as e:
        raise UserError(f"{path}: cannot be read: {e.strerror}") from None


def iter_table(path: str, expected_header: str, encoding: str = "", chunk: int = 10_000):
    """load_table() a chunk of rows at a time: CSV and TSV through pandas' chunked reader, Parquet a record batch
    at a time, so that memory does not grow with the file; JSON Lines and JSON come whole, as one chunk."""
    kind = file_format(path)
    if kind not in ("csv", "tsv", "parquet"):
        yield load_table(path, expected_header, encoding=encoding)
        return
    try:
        if os.path.getsize(path) == 0:
            header = f" (expected a header line such as {expected_header})" if kind != "parquet" else ""
            raise UserError(f"{path}: the file is empty{header}")
    except OSError as e:
        raise UserError(f"{path}: cannot be read: {e.strerror}") from None
    if kind == "parquet":
        frames, names = _parquet_batches(path, chunk)
    else:
        frames, names = _read_csv(path, "\t" if kind == "tsv" else ",", 0, encoding, expected_header, chunk=chunk)
    first = 2 if kind != "parquet" else 1  # CSV rows are lines after the header; Parquet's are records
    for frame in frames:
        yield Loaded(frame.reset_index(drop=True), np.arange(first, first + len(frame)),
                     "line" if kind != "parquet" else "record", kind, names)
        first += len(frame)


def _parquet_batches(path: str, chunk: int):
    """(an iterator of tables of `chunk` records, every column name), as _read_parquet() reads them whole."""
    file, names = _open_parquet(path)

    def frames():
        try:
            for batch in file.iter_batches(batch_size=chunk):
                yield _parquet_frame(batch, names, None)
        except (OSError, ValueError) as e:
            raise _not_parquet(path, e) from None
    return frames(), names


def stream_lines(stream, name: str, encoding: str = "", block: int = 1 << 20):
    """(line number, line) for each line of a binary stream, without line endings (\n or \r\n), decoded a block
    at a time as decode_bytes() decodes a whole file (the encoding detected from the first MB, or --encoding's):
    memory does not grow with the file. Bytes that do not decode are one UserError naming `name` and the line."""
    raw = sample = stream.read(SAMPLE_BYTES + 1)
    codec, how = resolve_encoding(name, encoding, raw)
    decoder = codecs.getincrementaldecoder(codec)()
    number, pending, logged = 0, "", False
    while True:
        try:
            text = pending + decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            line = number + pending.count("\n") + raw[:max(e.start, 0)].decode(codec, "replace").count("\n") + 1
            raise _undecodable(name, sample, codec, how, None, line) from None
        if not logged:
            _log_read(name, codec, how)
            logged = True
        lines = text.split("\n")
        pending = lines.pop()  # the last line may go on in the next block
        for line in lines:
            number += 1
            yield number, line.rstrip("\r")
        if not raw:
            break
        raw = stream.read(block)
    if pending:
        yield number + 1, pending.rstrip("\r")


def row_unit(table: pd.DataFrame) -> str:
    """What read_table()'s row numbers count: "line" or "record"."""
    return table.attrs.get("row_unit", "line")


def read_table(path: str, text_column: str, label_column: str | None, limit: int = 0,
               strict: bool = False, pair_column: str | None = None, encoding: str = "",
               label_sep: str | None = None, label_columns: list | None = None) -> pd.DataFrame:
    """Read a data file (load_table()) into columns text, pair (if pair_column), label (if label_column) and row
    (its line in the file, or record number for JSON and Parquet: row_unit() says which).

    Multi-label: with label_sep, label is the tuple of the label column's labels split on it (an empty cell is
    the empty tuple, a text with no label); with label_columns (0/1 columns, label_column None), the tuple of
    those columns that hold 1.

    Every problem becomes one UserError naming the file, and the column or line where it is.
    """
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a data file")
    wanted = [c for c in (text_column, label_column, pair_column, *(label_columns or ())) if c is not None]
    loaded = load_table(path, f"'{label_column},{text_column}'", limit, encoding, wanted)
    df, unit = loaded.frame, loaded.unit
    if len(df) == 0 and loaded.format not in ("csv", "tsv"):
        raise UserError(f"{path}: holds no records")
    columns = loaded.columns
    needed = [(text_column, "--text-column"), (label_column, "--label-column"), (pair_column, "--text-pair-column")]
    needed += [(column, "--label-columns") for column in label_columns or ()]
    for column, what in needed:
        if column is not None and column not in columns:
            fields = "columns" if loaded.format in ("csv", "tsv", "parquet") else "fields"
            raise UserError(f"{path}: no column '{column}' ({what}); the {fields} are: {', '.join(columns)}")
    if len(df) == 0:
        raise UserError(f"{path}: has a header but no rows")
    out = pd.DataFrame({"text": df[text_column].values, "row": loaded.rows})
    if pair_column is not None:
        out["pair"] = df[pair_column].values
    blank = out["text"].str.strip() == ""
    if pair_column is not None:
        blank |= out["pair"].str.strip() == ""
    problems = [(blank, f"empty text in column {'/'.join(repr(c) for c in (text_column, pair_column) if c)}")]
    if label_columns:
        out["label"] = _indicator_label_sets(df, label_columns, loaded.rows, path, unit)
    elif label_column is not None and label_sep is not None:
        out["label"] = [tuple(dict.fromkeys(p.strip() for p in cell.split(label_sep) if p.strip()))
                        if cell.strip().lower() not in MISSING_LABELS else () for cell in df[label_column]]
    elif label_column is not None:
        out["label"] = canonical_labels(df[label_column].str.strip())
        problems.append((out["label"].str.lower().isin(MISSING_LABELS),
                         f"no label (empty, NA, null, ...) in column '{label_column}'"))
    skipped = np.zeros(len(out), dtype=bool)
    for mask, what in problems:
        if mask.any():
            rows = out.loc[mask, "row"].tolist()
            where = f"{len(rows)} row(s) with {what}, {unit}s {', '.join(map(str, rows[:5]))}" \
                    f"{' ...' if len(rows) > 5 else ''}"
            if strict:
                raise UserError(f"{path}: {where} (--strict)")
            log.warning("%s: skipped %s", path, where)
            skipped |= mask.to_numpy()
    if skipped.any():
        out = out[~skipped].reset_index(drop=True)
        if len(out) == 0:
            raise UserError(f"{path}: no rows left after skipping the empty ones")
    out.attrs["row_unit"] = unit
    return out


def _indicator_label_sets(df: pd.DataFrame, columns: list, rows, path: str, unit: str) -> list:
    """Per row, the tuple of `columns` whose cell is 1 (1, 1.0, true, yes); 0 (0, 0.0, false, no, empty) is not."""
    on, off = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"} | MISSING_LABELS
    cells = pd.DataFrame({c: df[c].str.strip().str.lower() for c in columns})
    for c in columns:
        bad = ~cells[c].isin(on | off)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: {unit} {rows[i]}, column '{c}' (--label-columns): {df[c].iloc[i]!r} is not 0 or 1")
    hits = cells.isin(on).to_numpy()
    return [tuple(c for c, hit in zip(columns, row) if hit) for row in hits]


# label cells that mean "no label" (pandas' own missing-value markers), compared in lower case
MISSING_LABELS = {"", "na", "n/a", "nan", "null", "none", "#n/a", "<na>"}


def canonical_labels(labels: pd.Series) -> pd.Series:
    """The same class written as 1 and 1.0 (a spreadsheet's export) becomes one: whole numbers lose '.0'."""
    def canonical(value: str) -> str:
        try:
            number = float(value)
        except ValueError:
            return value
        return str(int(number)) if number.is_integer() and value.strip().lower() not in MISSING_LABELS else value
    return labels.map({v: canonical(v) for v in labels.unique()})
