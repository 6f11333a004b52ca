"""The one inference path: load a trained folder, and score token ids in length-sorted, dynamically padded
batches. Train-time evaluation, the evaluate CLI and the predict CLI all go through here.

    from bert_finetune import Predictor
    Predictor("outputs/best").predict(["a gorgeous, witty, seductive movie."])
    # [{'label': 'positive', 'probability': 0.98..., 'probabilities': {'negative': 0.01..., 'positive': 0.98...}}]

The model runs on a backend: torch (the saved safetensors weights), or ONNX Runtime over an exported folder's
model.onnx (runtime.py; see export.py). Both score the same tokenized, length-sorted, padded batches.
"""
import json
import os
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import data, modeling, precision, reporting, runtime
from .errors import UserError
from .sampling import eval_shard

DEFAULT_TEXT_COLUMN = "review"
DEFAULT_LABEL_COLUMN = "label"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BACKENDS = ("auto", "torch", "onnx")


def saved_settings(path: str) -> dict:
    """What training stored beside the weights in bert_finetune.json (max_length, text_column, label_column,
    text_pair_column, truncation, head_tokens); {} if nothing."""
    try:
        with open(os.path.join(path, "bert_finetune.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def to_probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Softmax over the classes; for a multi-label model (problem_type multi_label_classification) each label's
    own sigmoid."""
    return logits.sigmoid() if multi_label else logits.softmax(-1)


def saved_thresholds(saved: dict, names) -> np.ndarray:
    """A multi-label model's per-label thresholds as training chose them (0.5 for any it did not save)."""
    chosen = saved.get("thresholds") or {}
    return np.array([float(chosen.get(n, 0.5)) for n in names], dtype=np.float64)


def collator(tokenizer, device: torch.device, model_config) -> data.Collator:
    """Pads each batch to its longest example; on CUDA to a multiple of 8, which suits tensor cores, within
    the model's position limit."""
    return data.Collator(tokenizer.pad_token_id or 0, multiple=8 if device.type == "cuda" else 1,
                         limit=modeling.max_positions(model_config))


def length_sorted_loader(dataset, batch_size: int, collate: data.Collator, device: torch.device,
                         world_size: int = 1, rank: int = 0) -> DataLoader:
    """This rank's share of `dataset` (every example exactly once across ranks), longest first, so that
    batches carry almost no padding."""
    return DataLoader(dataset, batch_size=batch_size, sampler=eval_shard(dataset.lengths, world_size, rank),
                      collate_fn=collate, pin_memory=device.type == "cuda")


def logits(model, loader, device: torch.device, autocast=nullcontext):
    """(batch, float32 logits) for every batch of `loader`, in eval mode without gradients. The model is
    unwrapped (not DDP): ranks may hold different numbers of batches. Its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
                with autocast():
                    out = model(**inputs).logits
                yield batch, out.float()
    finally:
        model.train(was_training)


class Predictor:
    """A trained model folder (weights, tokenizer, labels, and the settings saved beside them), ready to
    score texts."""

    def __init__(self, model_dir: str, device: torch.device | None = None, max_length: int | None = None,
                 trust_remote_code: bool = False, precision: str = "auto", backend: str = "auto",
                 threads: int | None = None):
        """backend: torch, onnx (an exported folder's model.onnx on ONNX Runtime's CPU provider), or auto: onnx
        when the folder holds model.onnx. threads: CPU threads to score with (None: leave torch's setting)."""
        self.path = path = modeling.resolve(model_dir)
        if backend not in BACKENDS:
            raise UserError(f"--backend {backend}: choose from {', '.join(BACKENDS)}")
        self.backend = ("onnx" if runtime.holds_onnx(path) else "torch") if backend == "auto" else backend
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = modeling.load_tokenizer(path, trust_remote_code)
        self.config = config = modeling.load_config(path, trust_remote_code)
        self.model, self.session = None, None
        if self.backend == "onnx":
            if not runtime.holds_onnx(path):
                raise UserError(f"--backend onnx: {model_dir} holds no {runtime.ONNX_FILE}; make one with "
                                f"python -m bert_finetune.export --model {model_dir} --output-dir DIR")
            self.session = runtime.OnnxSession(path, threads)
        else:
            if runtime.holds_onnx(path) and not any(f.startswith(("model.safetensors", "pytorch_model"))
                                                    for f in os.listdir(path)):
                raise UserError(f"--backend torch: {model_dir} is an ONNX export, without torch weights; use "
                                f"--backend onnx (the default for it)")
            self.model = modeling.load_classifier(path, config, trust_remote_code).eval()
        self.labels = data.LabelMap.from_config(config)
        self.saved = saved_settings(path)
        # multi-label: a label is predicted where its probability reaches its threshold
        self.thresholds = saved_thresholds(self.saved, self.labels.names) if self.multi_label else None
        if max_length:
            modeling.check_max_length(max_length, config)
        self.max_length = max_length or self.saved.get("max_length") or min(modeling.max_positions(config) or 512, 512)
        # the truncation the model was trained with
        self.truncation = self.saved.get("truncation") or "head"
        self.head_tokens = self.saved.get("head_tokens") or 0
        self.pair_column = self.saved.get("text_pair_column") or None
        self.requested_precision = precision
        self.to(device or torch.device("cuda" if torch.cuda.is_available() and self.model is not None else "cpu"))

    @property
    def multi_label(self) -> bool:
        """Whether each label is scored on its own (sigmoid), not all of them together (softmax)."""
        return self.labels.multi_label

    def to(self, device: torch.device) -> "Predictor":
        """Move to `device`, and score there as training's evaluation does: --precision auto (bf16 or fp16
        autocast on CUDA, fp32 on CPU) and TF32 matmuls on CUDA. An ONNX model runs on the CPU in the numbers
        it was exported in (fp32, or int8 weights)."""
        if self.session is not None:
            if device.type != "cpu":
                raise UserError(f"--device {device}: --backend onnx runs on the CPU; use --backend torch for {device}")
            if self.requested_precision not in ("auto", "fp32"):
                raise UserError(f"--precision {self.requested_precision} is for --backend torch; an ONNX model "
                                f"computes in what it was exported in")
            self.device, self.autocast = device, nullcontext
            self.precision = (self.saved.get("export") or {}).get("quantize") or "fp32"
            return self
        self.device = device
        self.model.to(device)
        self.precision = precision.resolve(self.requested_precision, device, scoring=True)
        self.autocast = precision.autocast(self.precision, device)
        precision.allow_tf32(device)
        return self

    def tokenize(self, texts, pairs=None) -> tuple[list, list | None]:
        """(token ids per text, cut to max_length as in training; token type ids per text, or None)."""
        if pairs is None and self.pair_column:
            raise UserError(f"the model was trained on sentence pairs (column '{self.pair_column}'): "
                            f"give the second texts too")
        return data.encode_texts(self.tokenizer, texts, self.max_length, pairs, self.truncation, self.head_tokens)

    def truncated(self, ids, texts, pairs=None) -> np.ndarray:
        """Whether each text (with its pair) was longer than max_length and got cut."""
        out = np.zeros(len(texts), dtype=bool)
        full = [i for i, x in enumerate(ids) if len(x) >= self.max_length]  # only these can have been cut
        if full:
            second = [pairs[i] for i in full] if pairs is not None else None
            lengths = self.tokenizer([texts[i] for i in full], second, return_attention_mask=False,
                                     return_token_type_ids=False, return_length=True)["length"]
            out[full] = np.asarray(lengths) > self.max_length
        return out

    def logits(self, loader):
        """(batch, float32 logits) for every batch of `loader`, from the backend in use."""
        if self.session is not None:
            return self.session.logits(loader)
        return logits(self.model, loader, self.device, self.autocast)

    def scores(self, ids, batch_size: int = 64, progress: bool = False, types=None) -> np.ndarray:
        """Probabilities [examples, labels] for token ids, in their order: softmax over the labels, or each
        label's sigmoid for a multi-label model."""
        dataset = data.EncodedDataset(ids, np.zeros(len(ids), dtype=np.int64), token_type_ids=types)
        loader = length_sorted_loader(dataset, batch_size, collator(self.tokenizer, self.device, self.config),
                                      self.device)
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        with reporting.progress(len(ids), 0, progress, unit="text") as bar:
            for batch, batch_logits in self.logits(loader):
                out[batch["index"].numpy()] = to_probabilities(batch_logits, self.multi_label).cpu().numpy()
                bar.update(len(batch["index"]))
        return out

    def probabilities(self, texts, batch_size: int = 64, progress: bool = False, pairs=None) -> np.ndarray:
        ids, types = self.tokenize(texts, pairs)
        return self.scores(ids, batch_size, progress, types)

    def predict(self, texts, pairs=None, batch_size: int = 64) -> list:
        """One dict per text, in order: {"label", "probability", "probabilities": {label: probability}}; a
        multi-label model gives "labels" (those at or over the thresholds saved with it) instead of "label" and
        "probability". An
        empty text (or pair) gets None for each, as the predict CLI leaves its row empty."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(texts):
                raise UserError(f"{len(texts)} texts but {len(pairs)} pairs: give one pair per text")
        filled = [i for i, t in enumerate(texts) if t.strip() and (pairs is None or pairs[i].strip())]
        probs = np.full((len(texts), len(self.labels)), np.nan, dtype=np.float32)
        if filled:
            probs[filled] = self.probabilities([texts[i] for i in filled], batch_size,
                                               pairs=[pairs[i] for i in filled] if pairs is not None else None)
        out = []
        for p in probs:
            every = None if np.isnan(p).any() else {name: float(v) for name, v in zip(self.labels.names, p)}
            if self.multi_label:
                chosen = None if every is None else [n for n, hit in zip(self.labels.names,
                                                                         p >= self.thresholds) if hit]
                out.append({"labels": chosen, "probabilities": every})
            else:
                best = None if every is None else int(p.argmax())
                out.append({"label": None if every is None else self.labels.names[best],
                            "probability": None if every is None else float(p[best]), "probabilities": every})
        return out
