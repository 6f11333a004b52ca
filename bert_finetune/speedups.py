"""Training speed-ups that leave the model's function as it was, each checked at start-up.

- fast CPU dropout: every nn.Dropout, and the attention probabilities' dropout, draws a quarter of the
  random numbers torch's CPU dropout does (FastDropout).
- last layer at the first token: where the classifier reads the last layer at [CLS] alone, training
  computes that layer there only (about 1/layers of the FLOPs).

Both reach into transformers' BERT internals (attention.self.query, attention_head_size, the layer's
keyword arguments and plain-tensor return), which a transformers release may change. So `enable()`
applies each one and keeps it only if, on the first real batch, the patched model's logits equal the
unpatched model's (dropout off); otherwise it undoes it and says so in one warning line.
"""
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("bert_finetune")


# ---------------------------------------------------------------- fast CPU dropout

class FastDropout(torch.nn.Module):
    """nn.Dropout for CPU training, about 3x faster, same p to 1/65536.

    torch's CPU dropout draws one 32-bit random number per element and spends more time in the RNG than
    in the multiply (a tenth of a MiniLM training step). Here each 64-bit draw gives four 16-bit numbers,
    and an element is dropped when its number falls below round(p * 65536): four times fewer draws, and
    the same seed gives the same masks, so exact resume still holds.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p  # read by models that pass dropout on (e.g. to attention)

    @property
    def scale(self) -> float:
        return dropout_threshold(self.p)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, *dropout_threshold(self.p)) if self.training else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropout_threshold(p: float) -> tuple[int, float]:
    """(int16 value below which an element is dropped, scale of the kept ones) for drop probability p."""
    threshold = round(p * 65536) - 32768
    kept = 1.0 - (threshold + 32768) / 65536
    return threshold, 1.0 / kept if kept > 0 else 0.0


def fast_dropout(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    if threshold == -32768:  # nothing to drop
        return x
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    keep = draws.view(torch.int16)[:n].view(x.shape) >= threshold
    return x * keep.to(x.dtype).mul_(scale)


def _attention_with_fast_dropout(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                 is_causal=None, **kwargs):
    """transformers' SDPA attention, except that in CPU training the attention probabilities go through
    FastDropout: SDPA's own dropout on CPU takes the slow math path with bernoulli_ anyway."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    causal = is_causal or getattr(module, "is_causal", False)
    if not dropout or query.device.type != "cpu" or causal or key.shape[1] != query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:  # bool: True = attend; float: added to the scores
        scores = scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool \
            else scores + attention_mask
    probs = fast_dropout(scores.softmax(-1), *dropout_threshold(dropout))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


FAST_DROPOUT_ATTENTION = "sdpa_fast_dropout"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Every nn.Dropout becomes FastDropout, and SDPA attention drops its probabilities with it too.
    Returns how many modules were swapped. Weights and the saved config are unchanged."""
    swapped = _swap(model, torch.nn.Dropout, FastDropout)
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(FAST_DROPOUT_ATTENTION, _attention_with_fast_dropout)
        AttentionMaskInterface.register(FAST_DROPOUT_ATTENTION, sdpa_mask)
        model.set_attn_implementation(FAST_DROPOUT_ATTENTION)
    return swapped


def undo_fast_dropout(model: torch.nn.Module):
    _swap(model, FastDropout, torch.nn.Dropout)
    if _attention_swapped(model):
        model.set_attn_implementation("sdpa")


def _attention_swapped(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == FAST_DROPOUT_ATTENTION


def _swap(model, old: type, new: type) -> int:
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is old:
                setattr(parent, name, new(child.p))
                swapped += 1
    return swapped


# ---------------------------------------------------------------- the last layer at the first token

# sequence classifiers whose head reads nothing of the last layer but the first token's hidden state
FIRST_TOKEN_HEADS = {"BertForSequenceClassification", "RobertaForSequenceClassification",
                     "XLMRobertaForSequenceClassification", "CamembertForSequenceClassification",
                     "ElectraForSequenceClassification"}


def _last_layer(model):
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    return layers[-1] if layers else None


def train_last_layer_on_first_token(model: torch.nn.Module) -> bool:
    """In training, let the last encoder layer compute the first token ([CLS]) only.

    The classification head reads the last layer's output at position 0 and nowhere else, so that
    layer's queries, attention output and feed-forward at the other positions are work whose result is
    thrown away: about 1/layers of the model's FLOPs (14% for MiniLM-L6). Keys and values still come from
    every position, so the first token's output, the loss and every gradient are the same. Evaluation
    runs the layer whole. Returns whether the model qualified (a known head, a BERT-style layer,
    encoder-only, an attention function other than eager).
    """
    config = getattr(model, "config", None)
    last = _last_layer(model)
    if (type(model).__name__ not in FIRST_TOKEN_HEADS or last is None or config.is_decoder
            or getattr(config, "chunk_size_feed_forward", 0) or config._attn_implementation == "eager"):
        return False
    if not all(hasattr(last, name) for name in ("attention", "intermediate", "output")):
        return False
    whole_layer = last.forward

    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        if not last.training:
            return whole_layer(hidden_states, attention_mask, *args, **kwargs)
        return _first_token_layer(last, hidden_states, attention_mask, **kwargs)

    last.forward = forward  # an instance attribute: the weights and their names stay as they were
    return True


def undo_first_token(model: torch.nn.Module):
    last = _last_layer(model)
    if last is not None and "forward" in vars(last):
        del last.forward


def _first_token_layer(layer, hidden_states, attention_mask, cache=None, encoder_attention_mask=None, **kwargs):
    """A BERT layer's forward for position 0 alone: [batch, 1, hidden]."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    attention = layer.attention.self
    batch, length, _ = hidden_states.shape
    first = hidden_states[:, :1]

    def heads(x):
        return x.view(batch, x.shape[1], -1, attention.attention_head_size).transpose(1, 2)

    query, key, value = heads(attention.query(first)), heads(attention.key(hidden_states)), \
        heads(attention.value(hidden_states))
    if attention_mask is not None and attention_mask.ndim == 4:  # [batch, 1, queries, keys]: the first query's row
        attention_mask = attention_mask[:, :, :1]
    attend = ALL_ATTENTION_FUNCTIONS[attention.config._attn_implementation]
    context, _ = attend(attention, query, key, value, attention_mask, scaling=attention.scaling,
                        dropout=attention.dropout.p if attention.training else 0.0, **kwargs)
    attention_output = layer.attention.output(context.reshape(batch, 1, -1), first)
    return layer.output(layer.intermediate(attention_output), attention_output)


# ---------------------------------------------------------------- applied with a check

@dataclass(frozen=True)
class SpeedUp:
    name: str
    apply: Callable  # (model) -> whether the model qualified (and was patched)
    undo: Callable  # (model) -> None: the model as it was


FAST_CPU_DROPOUT = SpeedUp("fast CPU dropout", lambda m: use_fast_dropout(m) > 0 or _attention_swapped(m),
                           undo_fast_dropout)
FIRST_TOKEN_LAST_LAYER = SpeedUp("last layer at the first token", train_last_layer_on_first_token, undo_first_token)
# a dropout rate that takes FastDropout's code paths yet drops nothing (below 1/65536)
_NO_DROP = 1e-9


def enable(model: torch.nn.Module, batch: dict, speedups) -> list:
    """Apply each speed-up the model qualifies for, in order; keep it only if the model's logits on `batch`
    (training mode, dropout off) still equal those of the model without any. Returns the names kept.
    Draws nothing from the global random generators (exact resume)."""
    reference = _logits(model, batch)
    kept = []
    for speedup in speedups:
        if not speedup.apply(model):
            continue
        got = _logits(model, batch)
        gap = (got - reference).abs().max().item()
        if not gap <= 1e-3 * max(1.0, reference.abs().max().item()):  # also catches a nan
            speedup.undo(model)
            log.warning("speed-up '%s' switched off: on the first batch it changed the logits by %.3g (it relies on "
                        "transformers internals that may have changed)", speedup.name, gap)
            continue
        kept.append(speedup.name)
    return kept


def _logits(model, batch) -> torch.Tensor:
    devices = [batch["input_ids"].device] if batch["input_ids"].device.type == "cuda" else []
    was_training = model.training
    with torch.no_grad(), torch.random.fork_rng(devices=devices), _dropout_off(model), _exact_matmuls():
        model.train()  # the speed-ups act in training only
        logits = model(**batch).logits.float()
    model.train(was_training)
    return logits


@contextmanager
def _exact_matmuls():
    """fp32 matmuls on CUDA in full fp32 (not TF32), whose rounding would otherwise differ with the shapes."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def _dropout_off(model):
    saved = [(m, m.p) for m in model.modules() if isinstance(m, (torch.nn.Dropout, FastDropout))]
    for m, _ in saved:
        m.p = _NO_DROP if isinstance(m, FastDropout) else 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p
