"""evaluate(): every example once across ranks, metrics from the all-reduced confusion matrix."""
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import distributed, metrics
from .data import Collator
from .sampling import eval_shard


@dataclass
class EvalResult:
    metrics: dict  # accuracy, weighted_/macro_ precision/recall/f1, loss
    confusion: np.ndarray  # summed over ranks
    # this rank's share, for pictures and reports: dataset indices, true labels, probabilities
    indices: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


def eval_loader(dataset, batch_size: int, dist: distributed.Dist, collate: Collator) -> DataLoader:
    shard = eval_shard(dataset.lengths, dist.world_size, dist.rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=shard, collate_fn=collate,
                      pin_memory=dist.device.type == "cuda")


@torch.no_grad()
def evaluate(model, loader: DataLoader, num_labels: int, device: torch.device, autocast=nullcontext) -> EvalResult:
    """Run `model` (unwrapped, not DDP: ranks hold different numbers of batches) over this rank's shard."""
    was_training = model.training
    model.eval()
    indices, labels, probs = [], [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in ("labels", "index")}
        y = batch["labels"].to(device, non_blocking=True)
        with autocast():
            logits = model(**inputs).logits
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        probs.append(logits.softmax(-1).cpu())
        labels.append(batch["labels"])
        indices.append(batch["index"])
    model.train(was_training)
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, num_labels), dtype=np.float32)
    labels = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    indices = torch.cat(indices).numpy() if indices else np.zeros(0, dtype=np.int64)
    cm = metrics.confusion_matrix(labels, probs.argmax(-1), num_labels)
    cm = distributed.all_reduce_sum(cm.astype(np.int64), device)
    loss_sum = distributed.all_reduce_sum(np.array([loss_sum.item()]), device)[0]
    result = metrics.from_confusion(cm)
    result["loss"] = float(loss_sum / max(cm.sum(), 1))
    return EvalResult(result, cm, indices, labels, probs)
