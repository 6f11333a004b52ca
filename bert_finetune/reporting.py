"""Console, tqdm and TensorBoard: rank 0 speaks, the others only warn."""
import logging
import os
import re
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

from .errors import WriteError
from .precision import cpu_has_fast

log = logging.getLogger("bert_finetune")


class _TqdmHandler(logging.StreamHandler):
    """A log line while a progress bar is drawn: the bar is lifted, the line written, the bar redrawn below
    it (tqdm.write), instead of the line landing in the middle of the bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own policy: a failed log line never ends the run
            self.handleError(record)


def setup_logging(rank: int = 0):
    handler = _TqdmHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    # transformers' own chatter (the load report of the new head, "writing model shards" bars) says nothing new here
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class Writer:
    """TensorBoard on rank 0; a no-op elsewhere. A failed write (disk full, ...) is a WriteError: TensorBoard
    writes in a thread of its own and raises the thread's error at the next call."""

    def __init__(self, logdir: str | None, purge_step: int | None = None):
        self.tb, self.logdir = None, logdir
        if logdir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = self._call(SummaryWriter, logdir, purge_step=purge_step)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise WriteError(f"cannot write TensorBoard events in {self.logdir}: {e.strerror or e}") from None

    @property
    def enabled(self) -> bool:
        return self.tb is not None

    def scalars(self, values: dict, step: int, prefix: str = ""):
        if self.tb:
            for k, v in values.items():
                self._call(self.tb.add_scalar, f"{prefix}{k}", v, step)

    def image(self, tag: str, rgb, step: int):
        """An image, height x width x 3 (uint8)."""
        if self.tb:
            self._call(self.tb.add_image, tag, rgb, step, dataformats="HWC")

    def pr_curve(self, tag: str, is_positive, scores, step: int):
        """A precision-recall curve of one class: truth as booleans, that class's probability as scores."""
        if self.tb:
            self._call(self.tb.add_pr_curve, tag, np.asarray(is_positive, dtype=bool),
                       np.asarray(scores, dtype=np.float32), step)

    def text(self, tag: str, markdown: str, step: int):
        if self.tb:
            self._call(self.tb.add_text, tag, markdown, step)

    def hparams(self, hparams: dict, metrics: dict, step: int | None = None, prefix: str = "hparams/"):
        """The run's settings and final metrics for the HParams tab, in this run's own folder.

        SummaryWriter.add_hparams would put them in a sub-run of their own (a second "run" per
        training in every tab); the same three summaries written here keep one run per training.
        The metrics are also written as scalars `{prefix}NAME`, which is where the tab reads them.
        """
        if not self.tb:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries
        values = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in hparams.items() if v is not None}
        tagged = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        for summary in hparams_summaries(values, tagged):
            self._call(self.tb.file_writer.add_summary, summary, step)
        for tag, v in tagged.items():
            self._call(self.tb.add_scalar, tag, v, step)

    def flush(self):
        if self.tb:
            self._call(self.tb.flush)

    def close(self):
        if self.tb:
            tb, self.tb = self.tb, None
            self._call(tb.close)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KB on Linux


def proportional_mb() -> float:
    """This process's proportional set size now, in MB: its private memory plus its share of pages mapped by
    several processes (the token cache of a node's ranks), so that summed over processes nothing counts twice.
    Linux only (else the resident size)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 2**10
    except (OSError, StopIteration, ValueError):
        return peak_rss_mb()


def link_run(events_dir: str, link: str):
    """Make `link` a symbolic link to the run folder `events_dir`, so that TensorBoard pointed at the link's
    folder finds the run (it follows links); nothing to do when both name one folder. A link that cannot be
    made (a file system without them, a name taken) is a warning that says where the events are."""
    if os.path.realpath(link) == os.path.realpath(events_dir):
        return
    try:
        os.makedirs(os.path.dirname(link) or ".", exist_ok=True)
        os.symlink(os.path.relpath(events_dir, os.path.dirname(link) or "."), link, target_is_directory=True)
    except OSError as e:
        log.warning("TensorBoard events are in %s (no link %s: %s): tensorboard --logdir %s", events_dir, link,
                    e.strerror or e, os.path.dirname(events_dir))


def progress(total: int, initial: int, enabled: bool, every: float = 30.0, unit: str = "step"):
    """A tqdm bar in a terminal; in a file or a Slurm log, where a redrawn bar becomes one endless line of
    carriage returns, a plain log line every `every` seconds instead."""
    from tqdm.auto import tqdm
    if enabled and not _is_terminal(sys.stderr):
        return ProgressLines(total, initial, every, unit)
    return tqdm(total=total, initial=initial, disable=not enabled, unit=unit, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class ProgressLines:
    """tqdm's update/set_postfix/close, written as `step 120/313 (38%), 2.1 step/s, 1:32 left, loss=...`
    log lines at most every `every` seconds, and once at the end."""

    def __init__(self, total: int, initial: int, every: float, unit: str = "step"):
        self.total, self.n, self.every, self.unit = total, initial, every, unit
        self.start_n, self.t0 = initial, time.monotonic()
        self.last, self.postfix, self.closed = self.t0, "", False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1):
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self):
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._line()

    def _line(self):
        self.last = now = time.monotonic()
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left != float("inf") else "?"
        log.info("%s %d/%d (%.0f%%), %.2f %s/s, %s left%s", self.unit, self.n, self.total,
                 100 * self.n / max(self.total, 1), rate, self.unit, eta, f", {self.postfix}" if self.postfix else "")


# ---- speed: samples/s, real tokens/s, padding, MFU ----

# Dense peak FLOP/s per GPU by precision (vendor datasheets, no sparsity); TF32 for fp32 matmuls. Matched by
# gpu_peaks() on whole words of the device's name, so that "L40S" is not "L4" and an H100 PCIe not an SXM.
GPU_PEAKS = [  # (model, variant word or None, peaks); the first that matches wins
    ("H200", None, {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("H100", "PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100", "NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}),
    ("H100", None, {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("A100", None, {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L40S", None, {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("L4", None, {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("A10G", None, {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    ("A10", None, {"bf16": 125e12, "fp16": 125e12, "fp32": 62e12}),
    ("V100", None, {"fp16": 125e12, "fp32": 15.7e12}),  # no native bf16
    ("T4", None, {"fp16": 65e12, "fp32": 8.1e12}),
]


def gpu_peaks(name: str) -> dict | None:
    """The datasheet peaks of the GPU called `name` (torch.cuda.get_device_name), or None when unknown."""
    words = {w.upper() for w in re.split(r"[^A-Za-z0-9]+", name) if w}
    for model, variant, peaks in GPU_PEAKS:
        if model in words and (variant is None or variant.upper() in words):
            return peaks
    return None


def matmul_peak_flops(device: torch.device, precision: str) -> float:
    """The hardware's matmul peak in the precision in use: the datasheet on known GPUs, else a short probe
    in that precision."""
    if device.type == "cuda":
        peaks = gpu_peaks(torch.cuda.get_device_name(device)) or {}
        if precision in peaks:
            return peaks[precision]
    return probe_matmul(device, DTYPES[precision])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def probe_matmul(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 6) -> float:
    """Best of a few n x n matmuls in `dtype`, FLOP/s (about a second on a 2-core CPU in fp32). A CPU
    without matmul units for a half precision is about 100x slower in it: a smaller n keeps that short."""
    if device.type == "cpu" and dtype != torch.float32:
        if not cpu_has_fast("bf16" if dtype == torch.bfloat16 else "fp16"):
            n = 256
    # its own generator: the probe must not move the training RNG (exact resume)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
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
    out, as are padding tokens: this is real-token ("useful work") MFU. It is the model's count, the
    same for every way of training it: where training runs the last layer at the first token only
    (modeling.train_last_layer_on_first_token), the hardware does about 1/layers fewer FLOPs than this.
    """
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return 6 * (sum(p.numel() for p in model.parameters()) - embedding)


class Meter:
    """Training throughput. Counts samples and real/padded tokens over an interval; `lap()` closes
    the interval and folds it into whole-run totals. Time inside `with meter.paused():` (evaluation,
    checkpoints) is not training time and is not counted. `reduce` sums an array of this process's
    counts over all ranks (default: one process)."""

    def __init__(self, flops_per_token: float, peak: float, totals: dict | None = None, reduce=None):
        self.flops_per_token, self.peak = flops_per_token, peak
        self.totals = dict(totals or {"seconds": 0.0, "samples": 0, "real": 0, "padded": 0})
        self.reduce = reduce or (lambda counts: counts)
        self.warned = False
        self.restart()

    def restart(self):
        self.t0, self.samples, self.real, self.padded = time.perf_counter(), 0, 0, 0

    def add(self, batch):
        self.samples += batch["input_ids"].shape[0]
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()

    def counts(self) -> list:
        return [self.samples, self.real, self.padded]

    def lap(self, counts=None) -> dict:
        """Rates over the interval just closed; `counts` = the interval's (samples, real, padded) already
        summed over ranks (default: this process's own, summed with `reduce`)."""
        seconds = time.perf_counter() - self.t0
        if counts is None:
            counts = self.reduce(np.array(self.counts()))
        samples, real, padded = (int(c) for c in counts)
        for key, value in zip(("seconds", "samples", "real", "padded"), (seconds, samples, real, padded)):
            self.totals[key] += value
        self.restart()
        return self._checked(self._rates(seconds, samples, real, padded))

    @contextmanager
    def paused(self):
        """Close the interval now and start the next one on leaving: what runs inside is not timed."""
        self.lap()
        try:
            yield
        finally:
            self.restart()

    def overall(self) -> dict:
        t = self.totals
        return self._checked(self._rates(t["seconds"], t["samples"], t["real"], t["padded"]))

    def _checked(self, rates: dict) -> dict:
        """An MFU above 1 cannot be: the peak probe ran in a slow moment (a busy shared machine). Said once."""
        if rates["mfu"] > 1 and not self.warned:
            self.warned = True
            log.warning("MFU %.2f is above 1: the matmul peak probed at start-up (%.0f GFLOP/s) is too low, likely "
                        "measured while the machine was busy; read MFU as relative only", rates["mfu"], self.peak / 1e9)
        return rates

    def _rates(self, seconds, samples, real, padded) -> dict:
        seconds = max(seconds, 1e-9)
        return {
            "samples_per_s": samples / seconds,
            "tokens_per_s": real / seconds,
            "padding_fraction": 1 - real / max(padded, 1),
            "mfu": real / seconds * self.flops_per_token / self.peak if self.peak else 0.0,
        }
