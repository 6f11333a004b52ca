"""The ways scripts/benchmark.py measures this framework against, one process per run:

    python scripts/peers.py accelerate|trainer|trainer-job SPEC.json RESULT.json

SPEC (written by the benchmark) names the model folder, the train/held-out CSVs (label,review) and the
hyper-parameters every way shares, plus the row's own knobs: `sampling` (random | group_by_length),
`padding` (longest | max_length), `max_steps` (0 = whole epochs) and `bf16` (the Trainer's bf16=True). Data is read as the seed recipe
reads it: pandas -> datasets.Dataset -> map(tokenizer). Needs the bench extra: pip install -e .[bench]

accelerate, trainer: time the training loop only and count what the model trains on (samples, real and
padded tokens); RESULT: train_seconds, steps, samples, real_tokens, padded_tokens, accuracy (held out,
after training; null when max_steps cut training short).
trainer-job: the seed recipe's whole job (evaluate and save every epoch, keep 2, load the best at the end,
save it with its tokenizer); the benchmark times the process from start to exit. RESULT: best_accuracy.
"""
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


# ---------------------------------------------------------------- shared by every peer

def load(spec: dict):
    """(tokenizer, model, train set, held-out set), seeded, tokenized without padding unless padding=max_length."""
    import pandas as pd
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    set_seed(spec["seed"])
    train, held_out = (pd.read_csv(spec[k], keep_default_na=False) for k in ("train_csv", "eval_csv"))
    ids = {name: i for i, name in enumerate(sorted(set(train["label"])))}
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=len(ids))
    padding = {"padding": "max_length"} if spec.get("padding") == "max_length" else {}

    def encode(batch):
        return tokenizer(batch["review"], truncation=True, max_length=spec["max_length"], **padding)

    def dataset(table):
        table = table.assign(label=table["label"].map(ids))[["label", "review"]]
        return Dataset.from_pandas(table, preserve_index=False).map(encode, batched=True, remove_columns=["review"])

    return tokenizer, model, dataset(train), dataset(held_out)


class TokenCounter:
    """Counts the examples and the real / padded tokens the model trains on: a forward pre-hook that
    sees exactly the batches of the loop (no collator look-ahead), in training mode only (no eval)."""

    def __init__(self, model):
        self.samples = self.real = self.padded = self.steps = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if module.training:
            mask = kwargs["attention_mask"]
            self.samples += mask.shape[0]
            self.real += int(mask.sum())
            self.padded += mask.numel()
            self.steps += 1


def trained(counter: TokenCounter, seconds: float, accuracy) -> dict:
    return {"train_seconds": seconds, "steps": counter.steps, "samples": counter.samples,
            "real_tokens": counter.real, "padded_tokens": counter.padded, "accuracy": accuracy}


@torch.no_grad()
def held_out_accuracy(model, held_out, tokenizer, batch_size: int = 128) -> float:
    """The same measure for every peer: argmax accuracy over the whole held-out set."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for batch in DataLoader(held_out, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer)):
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(held_out)


# ---------------------------------------------------------------- the peers

def accelerate_loop(spec: dict) -> dict:
    """The seed's "Accelerate" way: Accelerator.prepare, random sampler, dynamic padding, AdamW (torch's
    default implementation, not fused), linear warmup/decay, gradient clipping."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    tokenizer, model, train, held_out = load(spec)
    loader = DataLoader(train, batch_size=spec["batch_size"], shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer),
                        generator=torch.Generator().manual_seed(spec["seed"]))
    named = list(model.named_parameters())
    no_decay = ("bias", "LayerNorm.weight")
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": spec["weight_decay"]},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0}], lr=spec["lr"])
    total = spec["epochs"] * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(spec["warmup_ratio"] * total), total)
    counter = TokenCounter(model)
    accelerator = Accelerator()
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    model.train()
    t0 = time.perf_counter()
    for _ in range(spec["epochs"]):
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - t0
    return trained(counter, seconds, held_out_accuracy(accelerator.unwrap_model(model), held_out, tokenizer))


def training_arguments(spec: dict, **overrides):
    """The Trainer's defaults, with the hyper-parameters every way shares."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=spec["output_dir"], num_train_epochs=spec["epochs"], per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"], warmup_steps=spec["warmup_ratio"],  # < 1: a ratio
        max_grad_norm=spec["max_grad_norm"], seed=spec["seed"], train_sampling_strategy=spec.get("sampling", "random"),
        bf16=spec.get("bf16", False), use_cpu=not torch.cuda.is_available(), report_to="none", **overrides)


def trainer(spec: dict) -> dict:
    """The HF Trainer, training only (no evaluation or checkpoint inside the timed part)."""
    from transformers import DataCollatorWithPadding, Trainer

    tokenizer, model, train, held_out = load(spec)
    args = training_arguments(spec, save_strategy="no", max_steps=spec.get("max_steps") or -1)
    counter = TokenCounter(model)
    hf = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                 data_collator=DataCollatorWithPadding(tokenizer))
    t0 = time.perf_counter()
    hf.train()
    seconds = time.perf_counter() - t0
    accuracy = None if spec.get("max_steps") else held_out_accuracy(hf.model, held_out, tokenizer)
    return trained(counter, seconds, accuracy)


def trainer_job(spec: dict) -> dict:
    """The seed recipe's whole job on transformers 5: evaluate and save every epoch, keep the last 2
    checkpoints, load the best (by accuracy) at the end, save it with its tokenizer. Dynamic padding."""
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer

    tokenizer, model, train, held_out = load(spec)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=1) == pred.label_ids).mean())}

    args = training_arguments(spec, per_device_eval_batch_size=spec["batch_size"], eval_strategy="epoch",
                              save_strategy="epoch", save_total_limit=2, load_best_model_at_end=True,
                              metric_for_best_model="accuracy")
    hf = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer,
                 data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    hf.train()
    saved = os.path.join(spec["output_dir"], "saved_model")
    hf.save_model(saved)
    tokenizer.save_pretrained(saved)
    return {"best_accuracy": hf.state.best_metric,
            "epochs": [e["eval_accuracy"] for e in hf.state.log_history if "eval_accuracy" in e]}


WAYS = {"accelerate": accelerate_loop, "trainer": trainer, "trainer-job": trainer_job}

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in WAYS:
        sys.exit(f"usage: python {sys.argv[0]} {'|'.join(WAYS)} SPEC.json RESULT.json")
    way, spec_path, result_path = sys.argv[1:]
    with open(spec_path) as f:
        result = WAYS[way](json.load(f))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
