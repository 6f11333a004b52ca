"""Console, tqdm and TensorBoard: rank 0 speaks, the others only warn."""
import logging
import os
import sys
import time

import torch

log = logging.getLogger("bert_finetune")


def setup_logging(rank: int = 0):
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    # transformers' own chatter (the load report of the new head, "writing model shards" bars) says nothing new here
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class Writer:
    """TensorBoard on rank 0; a no-op elsewhere."""

    def __init__(self, logdir: str | None):
        self.tb = None
        if logdir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(logdir)

    def scalars(self, values: dict, step: int, prefix: str = ""):
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}{k}", v, step)

    def flush(self):
        if self.tb:
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()


def progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


# ---- speed: samples/s, real tokens/s, padding, MFU ----

# Dense peak FLOP/s per GPU by precision (vendor datasheets, no sparsity); TF32 for fp32 matmuls.
GPU_PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 62e12},
}


def matmul_peak_flops(device: torch.device, precision: str) -> float:
    """The hardware's matmul peak: the datasheet on known GPUs, else a short torch.mm probe."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks[precision]
    return probe_matmul(device)


def probe_matmul(device: torch.device, n: int = 2048, repeats: int = 6) -> float:
    """Best of a few n x n fp32 matmuls, FLOP/s (about a second on a 2-core CPU)."""
    a = torch.randn(n, n, device=device, generator=None)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def train_flops_per_token(model) -> float:
    """6 x non-embedding parameters per real token: 2 for the forward matmuls, 4 for the backward.

    Attention's score/value matmuls (12 x layers x hidden x sequence length per token) are left
    out, as are padding tokens: this is real-token ("useful work") MFU.
    """
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return 6 * (sum(p.numel() for p in model.parameters()) - embedding)


class Meter:
    """Counts samples and real/padded tokens between calls to `rates()`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0, self.samples, self.real, self.padded = time.perf_counter(), 0, 0, 0

    def add(self, batch):
        self.samples += batch["input_ids"].shape[0]
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()

    def rates(self, flops_per_token: float, peak: float, world_size: int) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tokens_per_s = self.real * world_size / dt
        return {
            "samples_per_s": self.samples * world_size / dt,
            "tokens_per_s": tokens_per_s,
            "padding_fraction": 1 - self.real / max(self.padded, 1),
            "mfu": tokens_per_s * flops_per_token / peak if peak else 0.0,
        }
