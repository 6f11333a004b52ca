"""Which number format a run computes in, and the autocast context that gives it: one choice for training,
evaluation and prediction."""
import logging
from contextlib import nullcontext
from functools import partial

import torch

log = logging.getLogger("bert_finetune")


# the CPU flags (Linux /proc/cpuinfo names) of matmul units for each half precision
FAST_CPU_FLAGS = {"bf16": frozenset({"amx_bf16", "avx512_bf16"}), "fp16": frozenset({"amx_fp16", "avx512_fp16"})}


# auto picks bf16 on CPUs with bf16 matmul units: the embedded default job's best accuracy in bf16 was within
# 0.5 point of fp32's over 3 seeds on such a CPU (Zen 4: fp32 0.8386, bf16 0.8390 on average; the README's table)
CPU_AUTO_BF16 = True


def resolve(requested: str, device: torch.device, capability: tuple | None = None, cpu_flags: set | None = None,
            say: bool = False, scoring: bool = False) -> str:
    """--precision as used. auto: on CUDA, bf16 where the GPU multiplies in bf16 natively (compute capability
    8.0 and up: Ampere, Ada, Hopper, Blackwell), else fp16 with the GradScaler (not
    torch.cuda.is_bf16_supported(): it says yes on V100 and T4, which only emulate bf16). On a CPU, bf16 where
    its flags name bf16 matmul units (AMX or AVX512-BF16: Intel Sapphire Rapids and later, Cooper Lake, AMD
    Zen 4 and later), else fp32; decided from the flags, since torch's get_cpu_capability() says "avx512" on
    CPUs with and without them. `say`: log the choice and why. Half precision on a CPU without matmul units for
    it is allowed but warned about.

    `scoring` (evaluation, predict): auto on a CPU is fp32 whatever training used, so that the metrics and
    predictions are those of the saved model as any fp32 consumer (transformers' pipeline, sklearn on its
    predictions) computes them; bf16 scoring is there for the asking."""
    flags = cpu_flags if cpu_flags is not None else (read_cpu_flags() if device.type == "cpu" else set())
    if requested == "auto":
        if device.type == "cuda":
            major, minor = capability or torch.cuda.get_device_capability(device)
            chosen = "bf16" if major >= 8 else "fp16"
            why = f"compute capability {major}.{minor}: {'native bf16' if major >= 8 else 'no native bf16'}"
        elif scoring:
            chosen, why = "fp32", "scoring on a CPU: the saved model's fp32 numbers"
        else:
            units = sorted(FAST_CPU_FLAGS["bf16"] & flags)
            chosen = "bf16" if units and CPU_AUTO_BF16 else "fp32"
            if chosen == "bf16":
                why = f"this CPU multiplies in bf16 ({', '.join(units)})"
            elif not units:
                why = f"this CPU has no bf16 matmul units (no {' or '.join(sorted(FAST_CPU_FLAGS['bf16']))})"
            else:
                why = "bf16 matmul units here, but bf16 is not the CPU default"
        if say:
            log.info("--precision auto: %s (%s)", chosen, why)
        return chosen
    if requested != "fp32" and device.type == "cpu" and not FAST_CPU_FLAGS[requested] & flags:
        log.warning("--precision %s: this CPU has no %s matmul units (AMX or AVX-512 %s), so it runs about 100x "
                    "slower than fp32; use --precision fp32", requested, requested, requested.upper())
    return requested


def read_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there: macOS, Windows)."""
    try:
        with open(cpuinfo) as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cpu_has_fast(precision: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    return bool(FAST_CPU_FLAGS[precision] & read_cpu_flags(cpuinfo))


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
