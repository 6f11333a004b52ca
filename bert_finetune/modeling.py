"""Load a tokenizer, a config and a sequence-classification model from a folder or a hub name, with one-line
errors; the model's position limit. (The training speed-ups are in speedups.py.)"""
import os

from .errors import UserError


def resolve(model: str) -> str:
    """The model folder or hub name to load; "" is the embedded MiniLM."""
    if not model:
        from .data import embedded_model_dir
        return embedded_model_dir()
    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model) or model.count("/") > 1
    if looks_local:
        path = os.path.expanduser(model)
        if not os.path.isdir(path):
            raise UserError(f"--model {model}: no such model folder")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"--model {model}: not a model folder (no config.json inside)")
        return path
    return model


def _loading(what: str, model: str, fn):
    try:
        return fn()
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: e.g. a head of another size
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model}: cannot load the {what}: {first}") from None


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    return _loading("tokenizer", model, lambda: AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code))


def load_config(model: str, trust_remote_code: bool = False, **overrides):
    from transformers import AutoConfig
    return _loading("config", model, lambda: AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, **overrides))


def load_classifier(model: str, config, trust_remote_code: bool = False, new_head: bool = False):
    """The model with its classification head. new_head (training): a saved head with another number of labels
    than config's (a fine-tuned model trained on for other labels) is replaced by a new one, as the encoder
    is kept; transformers' load report names it."""
    from transformers import AutoModelForSequenceClassification
    return _loading("weights", model, lambda: AutoModelForSequenceClassification.from_pretrained(
        model, config=config, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=new_head))


def max_positions(config) -> int | None:
    n = getattr(config, "max_position_embeddings", None)
    # RoBERTa-style models reserve two positions for the padding offset
    return n - 2 if n and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else n


def check_max_length(max_length: int, config):
    """A --max-length beyond the model's position embeddings is a one-line error."""
    limit = max_positions(config)
    if limit and max_length > limit:
        raise UserError(f"--max-length {max_length} is above the model's position limit ({limit})")
