"""bert-finetune: fine-tune BERT-family models for text classification, one loop for one device and DDP."""
import time

__version__ = "0.1.0"
PROCESS_START = time.time()  # imported first by `python -m bert_finetune.X`: set-up times count from here


def __getattr__(name):
    # `from bert_finetune import Predictor` without importing torch for every submodule's sake
    if name == "Predictor":
        from .inference import Predictor
        return Predictor
    raise AttributeError(f"module 'bert_finetune' has no attribute {name!r}")
