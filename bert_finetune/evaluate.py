"""evaluate(): every example once across ranks, metrics from the all-reduced confusion matrix.

Also a CLI that judges a saved model on a labelled CSV (train.py uses only evaluate()):

    python -m bert_finetune.evaluate --model OUTPUT/best --data test.csv [--output-dir DIR]
    torchrun --nproc-per-node N -m bert_finetune.evaluate ...   (each process scores its shard)
"""
import logging
import os
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, data, distributed, inference, metrics, reading, reporting, visuals
from .config import CHOICES, text_encoding
from .errors import ArgumentParser, UserError, cli

log = logging.getLogger("bert_finetune")
PRECISIONS = CHOICES["precision"]


@dataclass
class EvalResult:
    metrics: dict  # accuracy, weighted_/macro_ precision/recall/f1, loss
    confusion: np.ndarray  # summed over ranks
    # this rank's share, for pictures and reports: dataset indices, true labels, probabilities
    indices: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


def evaluate(model, loader, num_labels: int, device: torch.device, autocast=nullcontext) -> EvalResult:
    """Score this rank's shard (inference.length_sorted_loader) and sum the counts over ranks."""
    indices, labels, probs = [], [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch, logits in inference.logits(model, loader, device, autocast):
        y = batch["labels"].to(device, non_blocking=True)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        probs.append(logits.softmax(-1).cpu())
        labels.append(batch["labels"])
        indices.append(batch["index"])
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, num_labels), dtype=np.float32)
    labels = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    indices = torch.cat(indices).numpy() if indices else np.zeros(0, dtype=np.int64)
    cm = metrics.confusion_matrix(labels, probs.argmax(-1), num_labels)
    cm = distributed.all_reduce_sum(cm.astype(np.int64), device)
    loss_sum = distributed.all_reduce_sum(np.array([loss_sum.item()]), device)[0]
    result = metrics.from_confusion(cm)
    result["loss"] = float(loss_sum / max(cm.sum(), 1))
    return EvalResult(result, cm, indices, labels, probs)


# ---------------------------------------------------------------- the CLI

def display_width(text: str) -> int:
    """Columns a terminal gives the text: a Chinese, Japanese or Korean character takes two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def right(text: str, width: int) -> str:
    """Right-aligned in `width` terminal columns (str.rjust counts characters, not columns)."""
    return " " * max(0, width - display_width(text)) + text


def report_text(cm: np.ndarray, names, result: dict) -> str:
    """sklearn's classification_report layout: per class, then accuracy, macro and weighted averages."""
    c = metrics.per_class(cm)
    width = max(12, *(display_width(n) for n in names))
    head = f"{'':>{width}} {'precision':>10} {'recall':>10} {'f1-score':>10} {'support':>10}"
    lines = [head, ""]
    for i, name in enumerate(names):
        lines.append(f"{right(name, width)} {c['precision'][i]:>10.4f} {c['recall'][i]:>10.4f} {c['f1'][i]:>10.4f} "
                     f"{c['support'][i]:>10d}")
    total = int(cm.sum())
    lines += ["", f"{'accuracy':>{width}} {'':>10} {'':>10} {result['accuracy']:>10.4f} {total:>10d}"]
    for avg in ("macro", "weighted"):
        lines.append(f"{avg + ' avg':>{width}} {result[avg + '_precision']:>10.4f} {result[avg + '_recall']:>10.4f} "
                     f"{result[avg + '_f1']:>10.4f} {total:>10d}")
    absent = [n for n, p in zip(names, c["present"]) if not p]
    if absent:
        lines.append(f"(neither in the data nor predicted, left out of the macro average: {', '.join(absent)})")
    return "\n".join(lines)


def confusion_text(cm: np.ndarray, names) -> str:
    """The confusion matrix as a table: rows are true labels, columns predicted ones."""
    width = max(6, *(display_width(n) for n in names), *(len(str(v)) for v in np.asarray(cm).ravel()))
    corner = "true \\ pred"
    first = max(width, len(corner))
    lines = [f"{corner:>{first}} " + " ".join(right(n, width) for n in names)]
    for name, row in zip(names, np.asarray(cm)):
        lines.append(f"{right(name, first)} " + " ".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def write_report(result: EvalResult, names, output_dir: str, about: dict):
    """eval_results.json and confusion_matrix.png in output_dir; the summary, report and matrix printed."""
    cm, m = result.confusion, result.metrics
    c = metrics.per_class(cm)
    per_class = {n: {"precision": float(c["precision"][i]), "recall": float(c["recall"][i]),
                     "f1": float(c["f1"][i]), "support": int(c["support"][i])} for i, n in enumerate(names)}
    json_path = os.path.join(output_dir, "eval_results.json")
    png_path = os.path.join(output_dir, "confusion_matrix.png")
    checkpoint.write_json(json_path, {**about, "labels": names, "metrics": m, "per_class": per_class,
                                      "confusion_matrix": cm.tolist()})
    names_shown = visuals.save_confusion_png(cm, names, png_path, os.path.basename(about["data"]))
    print(f"accuracy {m['accuracy']:.4f}  weighted F1 {m['weighted_f1']:.4f}  macro F1 {m['macro_f1']:.4f}  "
          f"loss {m['loss']:.4f}  ({int(cm.sum())} examples)\n")
    print(report_text(cm, names, m) + "\n")
    print(confusion_text(cm, names) + "\n")
    if not names_shown:  # no font here has their characters: the picture shows ids
        print(f"{png_path} shows the labels by id:\n{visuals.label_legend(names)}\n")
    print(f"written: {json_path}, {png_path}", flush=True)


@cli
def main(argv=None):
    parser = ArgumentParser(prog="bert_finetune.evaluate",
                            description="Judge a saved model on a labelled CSV: accuracy, precision/recall/F1, "
                                        "confusion matrix.")
    parser.add_argument("--model", required=True, help="a saved model folder, e.g. outputs/best")
    parser.add_argument("--data", required=True, help="a data file with a text and a label column: .csv, .tsv, "
                                                      ".jsonl, .json (a list of objects) or .parquet")
    parser.add_argument("--encoding", default="", help="the data file's text encoding, e.g. gb18030, utf-16, cp1252 "
                                                       "(default: detected)")
    parser.add_argument("--text-column", help="default: the one the model was trained with, else 'review'")
    parser.add_argument("--label-column", help="default: the one the model was trained with, else 'label'")
    parser.add_argument("--text-pair-column", help="the second text of a sentence pair; default: the one the model "
                                                   "was trained with, if any")
    parser.add_argument("--output-dir", help="where eval_results.json and confusion_matrix.png go "
                                             "(default: eval-NAME in the current folder, NAME = the data file's name)")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--max-length", type=int, help="default: the length the model was trained with")
    parser.add_argument("--limit", type=int, default=0, help="only the first N rows (0 = all)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (default): bf16 or fp16 autocast on CUDA as in training, fp32 on CPU")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--dist-timeout", type=float, default=300.0, help="seconds a collective may wait (torchrun)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    reporting.setup_logging(rank)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.encoding:
        text_encoding(args.encoding)

    # -- everything that can be wrong with the input is found before the process group forms
    trained = inference.Predictor(args.model, device=torch.device("cpu"), max_length=args.max_length,
                                  trust_remote_code=args.trust_remote_code, precision=args.precision,
                                  backend="torch")  # evaluate() runs the torch model itself, under DDP too
    text_column = args.text_column or trained.saved.get("text_column") or inference.DEFAULT_TEXT_COLUMN
    label_column = args.label_column or trained.saved.get("label_column") or inference.DEFAULT_LABEL_COLUMN
    pair_column = args.text_pair_column or trained.pair_column
    labels = trained.labels
    table = reading.read_table(args.data, text_column, label_column, args.limit, pair_column=pair_column,
                               encoding=args.encoding)
    unknown = sorted(set(table["label"]) - set(labels.ids))
    if unknown:
        first = table.loc[~table["label"].isin(labels.ids), "row"].iloc[0]
        raise UserError(f"{args.data}: label(s) the model does not know: {', '.join(map(repr, unknown[:10]))}"
                        f"{' ...' if len(unknown) > 10 else ''} (first on {reading.row_unit(table)} {first}); "
                        f"the model knows: {', '.join(labels.names)}")
    output_dir = args.output_dir or f"eval-{os.path.splitext(os.path.basename(args.data))[0]}"
    if rank == 0:
        checkpoint.make_output_dir(output_dir)
    ids, types = trained.tokenize(table["text"].tolist(), table["pair"].tolist() if pair_column else None)
    dataset = data.EncodedDataset(ids, labels.encode(table, args.data), table["text"].tolist(), types)

    dist = distributed.setup(args.dist_timeout)
    try:
        trained.to(dist.device)
        loader = inference.length_sorted_loader(dataset, args.batch_size, inference.collator(
            trained.tokenizer, dist.device, trained.model.config), dist.device, dist.world_size, dist.rank)
        pairs = f", pairs with column {pair_column}" if pair_column else ""
        log.info("evaluating %s on %d examples of %s (max length %d, truncation %s%s) on %s x %d in %s",
                 args.model, len(dataset), args.data, trained.max_length, trained.truncation, pairs,
                 dist.device.type, dist.world_size, trained.precision)
        result = evaluate(trained.model, loader, len(labels), dist.device, trained.autocast)
        if dist.is_main:
            write_report(result, labels.names, output_dir, {
                "model": args.model, "data": args.data, "examples": int(result.confusion.sum()),
                "max_length": trained.max_length, "truncation": trained.truncation, "text_pair_column": pair_column})
        distributed.barrier()
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
