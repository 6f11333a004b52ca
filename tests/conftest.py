"""Shared fixtures: a tiny BERT built here (no hub), learnable synthetic CSVs, and run helpers."""
import json
import os
import random
import socket
import subprocess
import sys
import tempfile

import pandas as pd
import pytest

# tiny models run fastest on one thread; more only fight over a small shared machine's cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ["good", "great", "fine", "superb"]
NEGATIVE = ["bad", "awful", "boring", "dull"]
FILLER = ("the a movie film plot actor scene story music city night day house road man woman "
          "dog cat car tree light water time").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_model(path: str, num_labels: int = 2, max_positions: int = 64, seed: int = 0, hidden: int = 32,
                     heads: int = 2):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(SPECIAL + POSITIVE + NEGATIVE + FILLER + ["pos", "neg", "neu"]) + "\n")
    BertTokenizer(vocab=vocab).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL + POSITIVE + NEGATIVE + FILLER) + 3, hidden_size=hidden,
                        num_hidden_layers=2, num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=max_positions, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


def synthetic_rows(n: int, seed: int, labels=("neg", "pos"), min_words=3, max_words=20):
    """label,review rows whose label is told by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % len(labels)
        words = [rng.choice(FILLER) for _ in range(rng.randint(min_words, max_words))]
        cue = POSITIVE if y == len(labels) - 1 else NEGATIVE if y == 0 else ["neu"]
        words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
        rows.append({"label": labels[y], "review": " ".join(words)})
    rng.shuffle(rows)
    return rows


def write_csv(path, rows) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.fixture
def make_csv(tmp_path):
    def make(name="train.csv", n=200, seed=0, **kw):
        return write_csv(tmp_path / name, synthetic_rows(n, seed, **kw))
    return make


# the tests' own token cache, not the user's: a stale entry there could hide a tokenization regression
TOKEN_CACHE = tempfile.mkdtemp(prefix="bert-finetune-test-tokens-")


def train_args(model, train_file, output_dir, *extra):
    # TensorBoard's link in the output folder itself, not in runs/ under the folder pytest runs in
    return ["--model", model, "--train-file", train_file, "--output-dir", str(output_dir), "--max-length", "32",
            "--logging-dir", os.path.join(str(output_dir), "runs"),
            "--batch-size", "8", "--lr", "2e-3", "--warmup-ratio", "0.0", "--log-steps", "5",
            # auto is bf16 on CPUs with bf16 matmul units: the same numbers on every machine CI may get
            "--precision", "fp32",
            "--cache-dir", TOKEN_CACHE, *map(str, extra)]


def run_train(args, single=True):
    """Train in this process; returns results.json."""
    from bert_finetune import train
    argv = (["--single-gpu"] if single else []) + list(args)
    train.main(argv)
    out = args[args.index("--output-dir") + 1]
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def env(**extra):
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),  # torchrun
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args, timeout=300, **environ) -> subprocess.CompletedProcess:
    """`bash launch.sh nproc args` from the project root, output captured."""
    return subprocess.run(["bash", os.path.join(ROOT, "launch.sh"), str(nproc), *map(str, args)], env=env(**environ),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def python_m(module, args, timeout=300, **environ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env(**environ),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
