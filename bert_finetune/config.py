"""Settings: one dataclass with defaults, a YAML file over it, command-line flags over both.

Nothing here touches the file system beyond reading the YAML file, and nothing picks a device:
building a Config has no side effects.
"""
import argparse
import codecs
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields

import yaml

from .errors import ArgumentParser, UserError


def trajectory(default):
    """A field whose value changes what training computes: a resume under another value is not the same run."""
    return field(default=default, metadata={"trajectory": True})


@dataclass
class Config:
    # model and data ("" = the embedded default: MiniLM-L6 and Rotten Tomatoes from PyPI packages)
    model: str = trajectory("")
    train_file: str = trajectory("")
    eval_file: str = trajectory("")  # when given, the held-out set; no split is made
    text_column: str = trajectory("review")
    label_column: str = trajectory("label")
    # single_label: one class per text (softmax); multi_label: any set of labels per text, none included (sigmoid),
    # from --label-column split on --label-sep, or from --label-columns of 0/1 cells
    task: str = trajectory("single_label")
    label_sep: str = trajectory("|")
    label_columns: str = trajectory("")  # comma-separated 0/1 columns, one per label (multi_label)
    # multi_label: "tuned" = per-label thresholds that maximise each label's F1 on the held-out set, or one number
    # in (0, 1) for every label
    threshold: str = trajectory("tuned")
    eval_split: float = trajectory(0.2)
    limit: int = trajectory(0)  # use only the first N rows of each file (0 = all)
    max_length: int = trajectory(128)
    truncation: str = trajectory("head")  # which tokens of a longer text to keep: head, tail, head_tail
    head_tokens: int = trajectory(0)  # head_tail: tokens kept from the start (0 = a quarter of the budget)
    text_pair_column: str = trajectory("")  # a second text per row, tokenized with the first as a BERT sentence pair
    strict: bool = False  # rows with empty text are an error instead of being skipped
    # the data files' text encoding, e.g. gb18030, utf-16, cp1252 ("" = detect it: UTF-8, a byte-order mark,
    # else charset-normalizer's guess); not a trajectory setting: the same text is read either way
    encoding: str = ""
    trust_remote_code: bool = False
    cache_dir: str = "~/.cache/bert_finetune/tokens"  # token ids of earlier runs ("" = no cache)
    # optimisation
    epochs: int = trajectory(2)
    batch_size: int = trajectory(32)  # per process
    eval_batch_size: int = 64  # per process; on CPU 64 ran faster than 128 or 256
    grad_accum: int = trajectory(1)
    lr: float = trajectory(1e-4)
    weight_decay: float = trajectory(0.01)
    warmup_ratio: float = trajectory(0.1)
    max_grad_norm: float = trajectory(1.0)  # 0 = no clipping
    layer_lr_decay: float = trajectory(1.0)  # head at lr, encoder layer i from the top at lr * X**i, embeddings lowest
    # the word-embedding matrix is not trained: no gradient, no AdamW state. For large vocabularies (XLM-R,
    # multilingual e5: 96-190M embedding parameters) on CPU, where that matrix's update costs more than the encoder
    freeze_embeddings: bool = trajectory(False)
    class_weights: str = trajectory("none")  # balanced: loss weights n / (classes * count), from the training labels
    max_steps: int = trajectory(0)  # cap on optimizer steps, for smoke runs (0 = no cap)
    precision: str = trajectory("auto")  # auto = bf16 on CUDA where supported, else fp32
    sampler: str = trajectory("length")  # length: length-grouped batches; random: plain DistributedSampler
    compile: bool = trajectory(False)
    seed: int = trajectory(42)
    # outputs
    output_dir: str = "outputs"
    # TensorBoard: events in OUTPUT_DIR/runs/RUN_NAME (the output folder holds all of a job), linked from
    # LOGGING_DIR/RUN_NAME, relative to where the job starts as torch's SummaryWriter's runs/ is, so that
    # `tensorboard --logdir runs` in that folder shows every job started there side by side
    logging_dir: str = "runs"
    run_name: str = ""  # "" = the output folder's name and the start time; a resumed run keeps its own
    log_steps: int = 20
    save_steps: int = 0  # also checkpoint every N optimizer steps (0 = only at each epoch's end)
    save_total_limit: int = 2
    metric_for_best: str = trajectory("accuracy")
    eval_steps: int = trajectory(0)  # also evaluate every N optimizer steps (0 = only at each epoch's end)
    early_stopping_patience: int = trajectory(0)  # stop after P evaluations without a better metric_for_best (0 = off)
    resume: str = ""  # "auto" = newest valid checkpoint in output_dir, or a checkpoint path
    # distributed
    # seconds a collective may wait for a missing rank; the others wait while rank 0 exports best/ and writes a
    # checkpoint, which for a large model on network storage can take minutes
    dist_timeout: float = 1800.0


CHOICES = {
    "precision": ("auto", "fp32", "fp16", "bf16"),
    "sampler": ("length", "random"),
    "truncation": ("head", "tail", "head_tail"),
    "class_weights": ("none", "balanced"),
    "metric_for_best": (
        "accuracy", "loss",
        "weighted_precision", "weighted_recall", "weighted_f1",
        "macro_precision", "macro_recall", "macro_f1",
        # multi_label only ("accuracy" there is the subset accuracy, as scikit-learn's accuracy_score)
        "micro_precision", "micro_recall", "micro_f1", "samples_precision", "samples_recall", "samples_f1",
        "subset_accuracy", "hamming_loss",
    ),
    "task": ("single_label", "multi_label"),
}
MULTI_LABEL_ONLY = ("micro_precision", "micro_recall", "micro_f1", "samples_precision", "samples_recall",
                    "samples_f1", "subset_accuracy", "hamming_loss")
POSITIVE = ("batch_size", "eval_batch_size", "grad_accum", "max_length", "epochs", "log_steps", "dist_timeout")
NON_NEGATIVE = ("weight_decay", "max_grad_norm", "max_steps", "limit", "save_steps", "save_total_limit", "head_tokens",
                "eval_steps", "early_stopping_patience")


def text_encoding(name: str, what: str = "--encoding") -> str:
    """The Python codec name of a text encoding (gbk, GB18030, utf_16, ...); one UserError line for a name Python
    does not know or one that is no text encoding (base64, rot13)."""
    try:
        info = codecs.lookup(name)
    except (LookupError, TypeError, ValueError):
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise UserError(f"{what} {name}: not a text encoding Python knows (e.g. utf-8, gb18030, utf-16, cp1252)")
    return info.name


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: Config) -> Config:
    """Check ranges and choices; the error names the flag."""
    for key in POSITIVE:
        if not getattr(cfg, key) > 0:
            raise UserError(f"{flag(key)} must be positive, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise UserError(f"{flag(key)} must not be negative, got {getattr(cfg, key)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr (learning rate) must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise UserError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if not cfg.eval_file and not 0 < cfg.eval_split < 1:
        raise UserError(f"--eval-split must be between 0 and 1 (exclusive), got {cfg.eval_split}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{flag(key)} must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    if not 0 < cfg.layer_lr_decay <= 1:
        raise UserError(f"--layer-lr-decay must be in (0, 1] (1 = off), got {cfg.layer_lr_decay}")
    if cfg.head_tokens and cfg.truncation != "head_tail":
        raise UserError(f"--head-tokens applies only with --truncation head_tail, got --truncation {cfg.truncation}")
    if cfg.text_pair_column and cfg.truncation != "head":
        raise UserError(f"--truncation {cfg.truncation} works on single texts; with --text-pair-column only "
                        f"--truncation head (the longer text is cut first) is supported")
    if cfg.encoding:
        text_encoding(cfg.encoding)
    _validate_task(cfg)
    if cfg.text_pair_column and cfg.text_pair_column in (cfg.text_column, cfg.label_column):
        raise UserError(f"--text-pair-column {cfg.text_pair_column} must differ from --text-column and --label-column")
    return cfg


def label_column_names(cfg: Config) -> list:
    """--label-columns as a list of names ([] when not given)."""
    return [c.strip() for c in cfg.label_columns.split(",") if c.strip()]


def threshold_value(text: str) -> float | None:
    """--threshold: None for "tuned", else the number, which must lie in (0, 1)."""
    if text == "tuned":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise UserError(f"--threshold must be tuned or a number between 0 and 1 (exclusive), got {text!r}")
    return value


def _validate_task(cfg: Config):
    if cfg.task == "single_label":
        if cfg.label_columns:
            raise UserError("--label-columns needs --task multi_label")
        if cfg.metric_for_best in MULTI_LABEL_ONLY:
            raise UserError(f"--metric-for-best {cfg.metric_for_best} needs --task multi_label")
        return
    threshold_value(cfg.threshold)
    if not cfg.label_sep:
        raise UserError("--label-sep must not be empty")
    names = label_column_names(cfg)
    if cfg.label_columns and len(names) < 2:
        raise UserError(f"--label-columns {cfg.label_columns!r}: name at least two 0/1 columns, separated by commas")
    if len(set(names)) != len(names):
        raise UserError(f"--label-columns {cfg.label_columns!r}: a column is named twice")
    for column in (cfg.text_column, cfg.text_pair_column):
        if column and column in names:
            raise UserError(f"--label-columns: '{column}' is also the text column")


def _coerce(key: str, value, typ, where: str):
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
    else:
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return typ(value)
        except (TypeError, ValueError):
            pass
    raise UserError(f"{where}: {key} must be {typ.__name__}, got {value!r}")


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not readable YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    types = {f.name: f.type for f in fields(Config)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types:
            raise UserError(f"config file {path}: unknown key '{key}'")
        out[name] = _coerce(name, value, types[name], f"config file {path}")
    return out


def build_parser(prog: str, extra=None) -> argparse.ArgumentParser:
    """A parser with one flag per Config field; defaults are suppressed so only given flags override."""
    parser = ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    for f in fields(Config):
        kwargs = {"dest": f.name, "help": f"default: {f.default!r}"}
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _flag_type(f.name, f.type)
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag(f.name), **kwargs)
    for args, kwargs in extra or []:
        parser.add_argument(*args, **kwargs)
    return parser


def _flag_type(name, typ):
    def convert(text):
        return _coerce(flag(name), text, typ, "command line")
    convert.__name__ = typ.__name__
    return convert


def parse(argv, prog="bert_finetune.train", extra=None):
    """argv -> (Config, the extra flags' namespace). Defaults < YAML < flags."""
    args = vars(build_parser(prog, extra).parse_args(argv))
    values = load_yaml(args.pop("config")) if "config" in args else {}
    names = {f.name for f in fields(Config)}
    values.update({k: v for k, v in args.items() if k in names})
    rest = argparse.Namespace(**{k: v for k, v in args.items() if k not in names})
    return validate(Config(**values)), rest


def trajectory_keys() -> list:
    return [f.name for f in fields(Config) if f.metadata.get("trajectory")]


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
