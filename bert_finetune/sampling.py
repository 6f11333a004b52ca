"""Which examples each rank sees, in which order: index arithmetic only, no I/O, no collectives."""
import math

import numpy as np
from torch.utils.data.distributed import DistributedSampler


class LengthGroupedSampler(DistributedSampler):
    """DistributedSampler whose batches hold examples of similar length.

    Each epoch, deterministically from (seed, epoch): shuffle all indices, pad by wrapping so every
    rank gets the same count (as DistributedSampler does), sort by length inside chunks of
    `chunk_batches` global steps, cut each chunk into global steps of batch_size x num_replicas
    examples, shuffle the steps, and give rank r the r-th slice of every step. Ranks at the same
    step thus see similar lengths (no rank waits on another's long batch) and padding is tiny.
    `group_by_length=False` gives plain DistributedSampler order. `skip(n)` resumes mid-epoch.
    """

    def __init__(self, lengths, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 group_by_length: bool = True, chunk_batches: int = 50):
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.chunk_batches = chunk_batches
        self.start = 0

    def skip(self, n_samples: int):
        """Leave out this rank's first n samples of the current epoch (resume after n seen)."""
        self.start = n_samples

    def set_epoch(self, epoch: int):
        super().set_epoch(epoch)
        self.start = 0

    def epoch_indices(self) -> np.ndarray:
        """This rank's whole list for the current epoch, before any skip."""
        if not self.group_by_length:
            return np.fromiter(super().__iter__(), dtype=np.int64, count=self.num_samples)
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n)
        order = np.resize(order, self.total_size)  # wrap-around padding, as DistributedSampler pads
        step = self.batch_size * self.num_replicas
        chunk = step * self.chunk_batches
        steps = []
        for c in range(0, self.total_size, chunk):
            part = order[c:c + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            steps.extend(part[s:s + step] for s in range(0, len(part), step))
        # only the very last step can be short; it stays last so that every other batch is full
        partial = [steps.pop()] if len(steps[-1]) < step else []
        steps = [steps[i] for i in rng.permutation(len(steps))] + partial
        return np.concatenate([s.reshape(self.num_replicas, -1)[self.rank] for s in steps])

    def __iter__(self):
        return iter(self.epoch_indices()[self.start:].tolist())

    def __len__(self):
        return self.num_samples - self.start


def eval_shard(lengths, num_replicas: int, rank: int) -> list:
    """Rank r's examples for evaluation: every example exactly once across ranks (no padding
    duplicates), sorted by length so that eval batches carry almost no padding."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return order[rank::num_replicas].tolist()


def steps_per_epoch(batches: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch: the last, short accumulation group still steps."""
    return math.ceil(batches / grad_accum)
