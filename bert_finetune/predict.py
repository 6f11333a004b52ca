"""Apply a trained model to text: the label and its probability.

    python -m bert_finetune.predict --model OUTPUT/best --text "..." [--text "..."]
"""
import argparse
import json
import os

import numpy as np
import torch

from . import data, modeling, reporting
from .errors import UserError, cli


class Predictor:
    """A saved model folder, ready to score texts in length-sorted, dynamically padded batches."""

    def __init__(self, model_dir: str, device: torch.device | None = None, max_length: int | None = None,
                 trust_remote_code: bool = False):
        path = modeling.resolve(model_dir)
        self.tokenizer = modeling.load_tokenizer(path, trust_remote_code)
        config = modeling.load_config(path, trust_remote_code)
        self.model = modeling.load_classifier(path, config, trust_remote_code).eval()
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.labels = data.LabelMap.from_config(self.model.config)
        saved = {}
        if os.path.isfile(os.path.join(path, "bert_finetune.json")):
            with open(os.path.join(path, "bert_finetune.json")) as f:
                saved = json.load(f)
        self.max_length = max_length or saved.get("max_length") or modeling.max_positions(config) or 512

    @torch.no_grad()
    def probabilities(self, texts, batch_size: int = 64) -> np.ndarray:
        ids = data.tokenize(self.tokenizer, texts, self.max_length)
        collate = data.Collator(self.tokenizer.pad_token_id or 0)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([{"input_ids": ids[i], "labels": 0, "index": i} for i in chunk])
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device)).logits
            out[chunk] = logits.float().softmax(-1).cpu().numpy()
        return out


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="bert_finetune.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved model folder, e.g. outputs/best")
    parser.add_argument("--text", action="append", required=True, help="a text to classify (repeatable)")
    parser.add_argument("--max-length", type=int, help="default: the length the model was trained with")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    reporting.setup_logging()
    if not os.path.isdir(args.model) and os.path.exists(args.model):
        raise UserError(f"--model {args.model}: not a model folder")
    predictor = Predictor(args.model, max_length=args.max_length, trust_remote_code=args.trust_remote_code)
    probs = predictor.probabilities(args.text)
    for text, p in zip(args.text, probs):
        best = int(p.argmax())
        print(f"{predictor.labels.names[best]}\t{p[best]:.4f}\t{text}")


if __name__ == "__main__":
    main()
