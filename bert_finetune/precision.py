"""Which number format a run computes in, and the autocast context that gives it: one choice for training,
evaluation and prediction."""
import logging
from contextlib import nullcontext
from functools import partial

import torch

log = logging.getLogger("bert_finetune")


def resolve(requested: str, device: torch.device, capability: tuple | None = None) -> str:
    """--precision as used. auto: on CUDA, bf16 where the GPU multiplies in bf16 natively (compute capability
    8.0 and up: Ampere, Ada, Hopper, Blackwell), else fp16 with the GradScaler; fp32 on CPU. (Not
    torch.cuda.is_bf16_supported(): it says yes on V100 and T4, which only emulate bf16.) Half precision on a
    CPU without matmul units for it is allowed but warned about."""
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        major, _ = capability or torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    if requested != "fp32" and device.type == "cpu" and not cpu_has_fast(requested):
        log.warning("--precision %s: this CPU has no %s matmul units (AMX or AVX-512 %s), so it runs about 100x "
                    "slower than fp32; use --precision fp32", requested, requested, requested.upper())
    return requested


def cpu_has_fast(precision: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            flags = f.read()
    except OSError:
        return False
    wanted = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}[precision]
    return any(f" {w}" in flags for w in wanted)


def autocast(precision: str, device: torch.device):
    """A no-argument factory of the forward pass's context: autocast in bf16/fp16, nothing in fp32."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def allow_tf32(device: torch.device):
    """fp32 matmuls on CUDA's tensor cores (TF32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
