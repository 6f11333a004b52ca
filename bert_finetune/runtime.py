"""ONNX Runtime for the Predictor's --backend onnx: a session over an exported folder's model.onnx that scores
the same collated batches as the torch model, and the one line that says what to install when the export extra
is missing."""
import os

import numpy as np
import torch

from .errors import UserError

ONNX_FILE = "model.onnx"
INSTALL = 'pip install -e ".[export]" (onnx, onnxruntime, onnxscript)'


def require(*modules: str, what: str):
    """Import `modules` (onnx, onnxruntime, onnxscript), or stop with one line that names the extra."""
    imported = []
    for name in modules:
        try:
            imported.append(__import__(name))
        except ImportError:
            raise UserError(f"{what} needs the package {name}, which is not installed: {INSTALL}") from None
    return imported


def holds_onnx(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ONNX_FILE))


def available_cpus() -> int:
    """The cores this process may run on (a container's or taskset's limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """OMP_NUM_THREADS when set (its first number), else every core this process may use."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else available_cpus()


class OnnxSession:
    """model.onnx on ONNX Runtime's CPU provider. Its inputs are those the export gave it (input_ids,
    attention_mask, and token_type_ids for sentence pairs); its output is the logits."""

    def __init__(self, path: str, threads: int | None = None):
        (ort,) = require("onnxruntime", what="--backend onnx")
        options = ort.SessionOptions()
        # one text batch at a time: all threads inside each operator, none between operators
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(os.path.join(path, ONNX_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 (onnxruntime raises its own types for a bad or truncated file)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--model {path}: cannot load {ONNX_FILE}: {first}") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.threads = options.intra_op_num_threads

    def logits(self, loader):
        """(batch, float32 logits) for every batch of `loader`, as inference.logits() yields them."""
        for batch in loader:
            feed = {}
            for name in self.inputs:
                value = batch.get(name)
                if value is None:  # token_type_ids of a pair model given single texts: segment 0, as torch does
                    value = torch.zeros_like(batch["input_ids"])
                feed[name] = value.numpy().astype(np.int64, copy=False)
            yield batch, torch.from_numpy(self.session.run(None, feed)[0]).float()
