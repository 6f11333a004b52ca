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
    metrics: dict  # accuracy, weighted_/macro_ precision/recall/f1, loss (multi-label: metrics.from_multi_label_sums)
    confusion: np.ndarray  # summed over ranks; multi-label: per label [[tn, fp], [fn, tp]], as scikit-learn's
    # this rank's share, for pictures and reports: dataset indices, true labels, probabilities
    indices: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    # multi-label: the thresholds the metrics are at, and per label precision, recall, f1, support
    thresholds: np.ndarray | None = None
    per_label: dict | None = None


def evaluate(model, loader, num_labels: int, device: torch.device, autocast=nullcontext,
             thresholds="tuned", tuned_too: bool = False) -> EvalResult:
    """Score this rank's shard (inference.length_sorted_loader) and sum the counts over ranks.

    A multi-label model (problem_type multi_label_classification) is judged at `thresholds`: "tuned" (each
    label's F1-best on these examples) or one per label; beside them the summary at 0.5 (`NAME_at_0.5`) and,
    with tuned_too, at tuned thresholds (`NAME_tuned`)."""
    if getattr(model.config, "problem_type", None) == data.MULTI_LABEL_PROBLEM:
        return _evaluate_multi_label(model, loader, num_labels, device, autocast, thresholds, tuned_too)
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


def _evaluate_multi_label(model, loader, num_labels, device, autocast, thresholds, tuned_too) -> EvalResult:
    """Sigmoid probabilities and BCE; the thresholds tuned from all-reduced score histograms; the metrics
    from all-reduced counts (every example once)."""
    indices, labels, probs = [], [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch, logits in inference.logits(model, loader, device, autocast):
        y = batch["labels"].to(device, non_blocking=True)
        loss_sum += F.binary_cross_entropy_with_logits(logits, y, reduction="sum").double()
        probs.append(inference.to_probabilities(logits, True).cpu())
        labels.append(batch["labels"].to(torch.int64))
        indices.append(batch["index"])
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, num_labels), dtype=np.float32)
    labels = torch.cat(labels).numpy() if labels else np.zeros((0, num_labels), dtype=np.int64)
    indices = torch.cat(indices).numpy() if indices else np.zeros(0, dtype=np.int64)
    tuned = None
    if isinstance(thresholds, str) or tuned_too:
        tuned = metrics.tuned_thresholds(distributed.all_reduce_sum(metrics.score_histograms(probs, labels), device))
    chosen = tuned if isinstance(thresholds, str) else np.asarray(thresholds, dtype=np.float64)
    others = {"_at_0.5": np.full(num_labels, 0.5)}
    if tuned is not None and tuned is not chosen:
        others["_tuned"] = tuned
    others = {k: v for k, v in others.items() if not np.array_equal(v, chosen)}
    parts = [chosen, *others.values()]
    local = np.concatenate([metrics.multi_label_sums(labels, metrics.predicted(probs, t)) for t in parts]
                           + [[loss_sum.item()]])
    summed = distributed.all_reduce_sum(local, device)
    width = 3 * num_labels + 5
    result, per = metrics.from_multi_label_sums(summed[:width], num_labels)
    n = summed[width - 1]
    result["loss"] = float(summed[-1] / max(n * num_labels, 1))
    for i, suffix in enumerate(others, start=1):
        other, _ = metrics.from_multi_label_sums(summed[i * width:(i + 1) * width], num_labels)
        result.update({f"{k}{suffix}": other[k] for k in metrics.SUMMARY})
    confusion = np.stack([[per["tn"], per["fp"]], [per["fn"], per["tp"]]]).transpose(2, 0, 1)
    return EvalResult(result, confusion, indices, labels, probs, chosen, per)


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


def multi_label_report_text(result: EvalResult, names) -> str:
    """Per label precision, recall, F1, support and threshold; then the micro, macro, weighted and samples
    averages, subset accuracy and Hamming loss (scikit-learn's classification_report layout for multi-label)."""
    per, m = result.per_label, result.metrics
    width = max(15, *(display_width(n) for n in names))
    lines = [f"{'':>{width}} {'precision':>10} {'recall':>10} {'f1-score':>10} {'support':>10} {'threshold':>10}", ""]
    for i, name in enumerate(names):
        lines.append(f"{right(name, width)} {per['precision'][i]:>10.4f} {per['recall'][i]:>10.4f} "
                     f"{per['f1'][i]:>10.4f} {per['support'][i]:>10d} {result.thresholds[i]:>10.3f}")
    lines.append("")
    support = int(per["support"].sum())
    for avg in ("micro", "macro", "weighted", "samples"):
        lines.append(f"{avg + ' avg':>{width}} {m[avg + '_precision']:>10.4f} {m[avg + '_recall']:>10.4f} "
                     f"{m[avg + '_f1']:>10.4f} {support:>10d}")
    lines += ["", f"{'subset accuracy':>{width}} {m['subset_accuracy']:>10.4f}",
              f"{'Hamming loss':>{width}} {m['hamming_loss']:>10.4f}"]
    return "\n".join(lines)


def write_multi_label_report(result: EvalResult, names, output_dir: str, about: dict):
    """eval_results.json and confusion_per_label.png in output_dir; the summary and per-label report printed."""
    m, per = result.metrics, result.per_label
    json_path = os.path.join(output_dir, "eval_results.json")
    png_path = os.path.join(output_dir, "confusion_per_label.png")
    per_label = {n: {"precision": float(per["precision"][i]), "recall": float(per["recall"][i]),
                     "f1": float(per["f1"][i]), "support": int(per["support"][i]),
                     "threshold": float(result.thresholds[i])} for i, n in enumerate(names)}
    checkpoint.write_json(json_path, {**about, "labels": names, "metrics": m, "per_label": per_label,
                                      "confusion_per_label": result.confusion.tolist()})
    names_shown = visuals.save_multi_label_confusion_png(result.confusion, names, png_path,
                                                         os.path.basename(about["data"]))
    print(f"micro F1 {m['micro_f1']:.4f}  macro F1 {m['macro_f1']:.4f}  samples F1 {m['samples_f1']:.4f}  "
          f"subset accuracy {m['subset_accuracy']:.4f}  Hamming loss {m['hamming_loss']:.4f}  loss {m['loss']:.4f}"
          f"  ({about['examples']} examples, the model's thresholds)")
    print(f"at 0.5 for every label: micro F1 {m.get('micro_f1_at_0.5', m['micro_f1']):.4f}  macro F1 "
          f"{m.get('macro_f1_at_0.5', m['macro_f1']):.4f}\n")
    print(multi_label_report_text(result, names) + "\n")
    if not names_shown:
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
    parser.add_argument("--label-sep", help="multi-label: what separates a row's labels in the label column; "
                                            "default: the model's, else |")
    parser.add_argument("--label-columns", help="multi-label: the 0/1 columns, one per label, comma-separated; "
                                                "default: the model's, if it was trained on such columns")
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
    if labels.multi_label:
        table, dataset_labels = _read_multi_label(args, trained, text_column, label_column, pair_column)
    else:
        table = reading.read_table(args.data, text_column, label_column, args.limit, pair_column=pair_column,
                                   encoding=args.encoding)
        dataset_labels = _single_labels(table, labels, args.data)
    output_dir = args.output_dir or f"eval-{os.path.splitext(os.path.basename(args.data))[0]}"
    if rank == 0:
        checkpoint.make_output_dir(output_dir)
    ids, types = trained.tokenize(table["text"].tolist(), table["pair"].tolist() if pair_column else None)
    dataset = data.EncodedDataset(ids, dataset_labels, table["text"].tolist(), types)

    dist = distributed.setup(args.dist_timeout)
    try:
        trained.to(dist.device)
        loader = inference.length_sorted_loader(dataset, args.batch_size, inference.collator(
            trained.tokenizer, dist.device, trained.model.config), dist.device, dist.world_size, dist.rank)
        pairs = f", pairs with column {pair_column}" if pair_column else ""
        log.info("evaluating %s on %d examples of %s (max length %d, truncation %s%s) on %s x %d in %s",
                 args.model, len(dataset), args.data, trained.max_length, trained.truncation, pairs,
                 dist.device.type, dist.world_size, trained.precision)
        result = evaluate(trained.model, loader, len(labels), dist.device, trained.autocast,
                          thresholds=trained.thresholds)
        if dist.is_main:
            about = {"model": args.model, "data": args.data, "examples": len(dataset),
                     "max_length": trained.max_length, "truncation": trained.truncation,
                     "text_pair_column": pair_column}
            if labels.multi_label:
                write_multi_label_report(result, labels.names, output_dir, about)
            else:
                write_report(result, labels.names, output_dir, about)
        distributed.barrier()
    finally:
        distributed.teardown()


def _read_multi_label(args, trained, text_column, label_column, pair_column):
    """A multi-label model's data file, read as its training file was: label sets split on the model's label
    separator or from its 0/1 columns (the flags override both)."""
    columns = args.label_columns if args.label_columns is not None else trained.saved.get("label_columns")
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    sep = args.label_sep or trained.saved.get("label_sep") or "|"
    table = reading.read_table(args.data, text_column, None if columns else label_column, args.limit,
                               pair_column=pair_column, encoding=args.encoding, label_sep=sep,
                               label_columns=columns or None)
    return table, trained.labels.encode(table, args.data)


def _single_labels(table, labels, path: str):
    """The class ids of a single-label model's data file; labels it does not know are one UserError."""
    unknown = sorted(set(table["label"]) - set(labels.ids))
    if unknown:
        first = table.loc[~table["label"].isin(labels.ids), "row"].iloc[0]
        raise UserError(f"{path}: label(s) the model does not know: {', '.join(map(repr, unknown[:10]))}"
                        f"{' ...' if len(unknown) > 10 else ''} (first on {reading.row_unit(table)} {first}); "
                        f"the model knows: {', '.join(labels.names)}")
    return labels.encode(table, path)


if __name__ == "__main__":
    main()
