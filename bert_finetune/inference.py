"""The one inference path: load a trained folder, and score token ids in length-sorted, dynamically padded
batches. Train-time evaluation, the evaluate CLI and the predict CLI all go through here.

    from bert_finetune import Predictor
    Predictor("outputs/best").probabilities(["a gorgeous, witty, seductive movie."])
"""
import json
import os
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import data, modeling, precision, reporting
from .errors import UserError
from .sampling import eval_shard

DEFAULT_TEXT_COLUMN = "review"
DEFAULT_LABEL_COLUMN = "label"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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
                 trust_remote_code: bool = False, precision: str = "auto"):
        path = modeling.resolve(model_dir)
        self.tokenizer = modeling.load_tokenizer(path, trust_remote_code)
        config = modeling.load_config(path, trust_remote_code)
        self.model = modeling.load_classifier(path, config, trust_remote_code).eval()
        self.labels = data.LabelMap.from_config(self.model.config)
        self.saved = saved_settings(path)
        # multi-label: a label is predicted where its probability reaches its threshold
        self.thresholds = saved_thresholds(self.saved, self.labels.names) if self.labels.multi_label else None
        if max_length:
            modeling.check_max_length(max_length, config)
        self.max_length = max_length or self.saved.get("max_length") or min(modeling.max_positions(config) or 512, 512)
        # the truncation the model was trained with
        self.truncation = self.saved.get("truncation") or "head"
        self.head_tokens = self.saved.get("head_tokens") or 0
        self.pair_column = self.saved.get("text_pair_column") or None
        self.requested_precision = precision
        self.to(device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def to(self, device: torch.device) -> "Predictor":
        """Move to `device`, and score there as training's evaluation does: --precision auto (bf16 or fp16
        autocast on CUDA, fp32 on CPU) and TF32 matmuls on CUDA."""
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

    def scores(self, ids, batch_size: int = 64, progress: bool = False, types=None) -> np.ndarray:
        """Probabilities [examples, labels] for token ids, in their order (multi-label: each label's own)."""
        dataset = data.EncodedDataset(ids, np.zeros(len(ids), dtype=np.int64), token_type_ids=types)
        loader = length_sorted_loader(dataset, batch_size, collator(self.tokenizer, self.device, self.model.config),
                                      self.device)
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        with reporting.progress(len(ids), 0, progress, unit="text") as bar:
            for batch, batch_logits in logits(self.model, loader, self.device, self.autocast):
                out[batch["index"].numpy()] = to_probabilities(batch_logits, self.labels.multi_label).cpu().numpy()
                bar.update(len(batch["index"]))
        return out

    def probabilities(self, texts, batch_size: int = 64, progress: bool = False, pairs=None) -> np.ndarray:
        ids, types = self.tokenize(texts, pairs)
        return self.scores(ids, batch_size, progress, types)
