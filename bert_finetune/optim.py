"""Parameter groups (no-decay, layer-wise learning rates), AdamW and the linear warmup/decay schedule."""
import re

import torch

from .errors import UserError

# encoder layer i: bert.encoder.layer.i., distilbert.transformer.layer.i., model.layers.i. (ModernBERT)
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and LayerNorm weights are not decayed (nor any other 1-d parameter)."""
    return param.ndim < 2 or name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name


def count_layers(names) -> int:
    """Encoder layers found in parameter names (highest index + 1; 0 when none)."""
    found = [int(m.group(1)) for m in map(_LAYER.search, names) if m]
    return max(found) + 1 if found else 0


def layer_depth(name: str, num_layers: int) -> int:
    """Levels below the head: 0 for the head (classifier, pooler), i for encoder layer i counted from the
    top (1 = the top layer, num_layers = the bottom one), num_layers + 1 for the embeddings."""
    m = _LAYER.search(name)
    if m:
        return num_layers - int(m.group(1))
    return num_layers + 1 if "embeddings" in name else 0


def layer_lr(lr: float, decay: float, depth: int) -> float:
    """Layer-wise decreasing learning rate (Sun et al. 2019): lr * decay**depth."""
    return lr * decay ** depth


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 layer_decay: float = 1.0) -> list:
    """decay / no_decay groups; with layer_decay < 1 one such pair per depth, each with its own lr, head first."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_decay == 1.0:
        decay = [p for n, p in named if not is_no_decay(n, p)]
        no_decay = [p for n, p in named if is_no_decay(n, p)]
        return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    layers = count_layers(n for n, _ in named)
    if not layers:
        raise UserError("--layer-lr-decay: no encoder layers found in the model's parameter names "
                        "(expected names such as encoder.layer.0.); use --layer-lr-decay 1")
    groups = []
    for depth in range(layers + 2):
        where = "head" if depth == 0 else "embeddings" if depth == layers + 1 else f"layer {layers - depth}"
        for no_decay in (False, True):
            params = [p for n, p in named if layer_depth(n, layers) == depth and is_no_decay(n, p) == no_decay]
            if params:
                groups.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                               "lr": layer_lr(lr, layer_decay, depth),
                               "name": f"{where} {'no_decay' if no_decay else 'decay'}"})
    return groups


def describe_lrs(groups) -> str:
    """'head 1.00e-04, layer 5 9.50e-05, ...': each group's peak learning rate (before the schedule scales
    it), one entry per decay/no_decay pair, in group order."""
    peaks = [g.get("initial_lr", g["lr"]) for g in groups]
    if len(set(peaks)) == 1:
        return f"all parameters {peaks[0]:.2e}"
    seen = {}
    for g, peak in zip(groups, peaks):
        seen.setdefault(g["name"].rsplit(" ", 1)[0], peak)
    return ", ".join(f"{name} {lr:.2e}" for name, lr in seen.items())


def build_optimizer(model, lr: float, weight_decay: float, layer_decay: float = 1.0) -> torch.optim.Optimizer:
    # fused AdamW does the whole update in one kernel per dtype/device: measurably faster on CPU and CUDA
    groups = param_groups(model, weight_decay, lr, layer_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype fused does not cover
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most max_norm; returns the norm before.

    The same rule as torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), capped at 1),
    computed faster on CPU, where its two passes over every gradient were 5% of a MiniLM step:
    - the norm is taken over rows of 4,096 elements, then over the rows' norms. torch reduces a whole
      tensor on one thread (1.7 ms for MiniLM's 47 MB embedding gradient); rows run on every core and sum
      in short runs, which is also more exact. Each row is summed by one thread in one order, so the
      result does not depend on the thread count: ranks with different core counts clip alike.
    - when the norm is already under max_norm the gradients are left alone (a multiplication by 1) on CPU.
      On CUDA they are always multiplied, by a coefficient that stays on the device: reading it would stall.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.cat([_row_norms(g) for g in grads]))
    coefficient = max_norm / (total + 1e-6)
    if total.device.type == "cpu" and coefficient >= 1:  # also false for a nan norm: nan spreads, as in torch
        return total
    torch._foreach_mul_(grads, coefficient.clamp(max=1.0))
    return total


def _row_norms(grad: torch.Tensor, row: int = 4096) -> torch.Tensor:
    flat = grad.detach().reshape(-1)
    whole = flat.numel() - flat.numel() % row
    if whole < 8 * row:  # small enough for one thread
        return torch.linalg.vector_norm(flat).reshape(1)
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, row), dim=1)
    return torch.cat([rows, torch.linalg.vector_norm(flat[whole:]).reshape(1)]) if whole < flat.numel() else rows


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then linear decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
