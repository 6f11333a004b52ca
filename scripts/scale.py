"""Data at scale: what set-up costs with N training rows, for 1 process and for `launch.sh 2`, on the first run
(tokenize and write the token cache) and on a cache hit. Run by `python scripts/benchmark.py --scale N`.

Each run trains 3 steps (--max-steps 3, --max-length 128) with a 200-row --eval-file, in a fresh process, with a
token cache of the benchmark's own (emptied before each first run). From each run's results.json: texts tokenized
and data set-up seconds on rank 0, seconds from process start to the first training step (the slowest rank), peak
resident memory per rank (pages shared by the ranks, such as the memory-mapped token cache, count in each), and the
node's memory at the first step: the ranks' proportional set sizes summed (shared pages counted once); the wall
clock is the whole process's (or torchrun's).
"""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = [("run", "way", "{}"), ("rows", "rows", "{:,}"), ("tokenized on rank 0", "tokenized", "{:,}"),
           ("data set-up s (rank 0)", "data_s", "{:.1f}"), ("to first step s", "ready_s", "{:.1f}"),
           ("wall s", "wall_s", "{:.1f}"), ("peak memory per rank, MB", "peak_mb", "{}"),
           ("node memory at the first step, MB", "node_mb", "{:.0f}"), ("node / 1 process", "vs_one", "{:.2f}x")]


def build_rows(n: int, folder: str, train_file: str = "") -> tuple:
    """(train.csv with n rows: the embedded sentences repeated, or the first n of train_file repeated; eval.csv
    with 200 rows of the same)."""
    import pandas as pd
    from bert_finetune import data, reading
    if train_file:
        table = reading.read_table(train_file, "review", "label")[["label", "text"]]
    else:
        table = data.embedded_table()[["label", "text"]]
    repeats = -(-n // len(table))
    rows = pd.concat([table] * repeats, ignore_index=True).iloc[:n].rename(columns={"text": "review"})
    os.makedirs(folder, exist_ok=True)
    train, held = os.path.join(folder, "train.csv"), os.path.join(folder, "eval.csv")
    rows.to_csv(train, index=False)
    rows.iloc[:200].to_csv(held, index=False)
    return train, held


def one_run(work: str, name: str, nproc: int, train: str, held: str, cache: str) -> dict:
    out = os.path.join(work, name)
    launcher = [sys.executable, "-m", "bert_finetune.train", "--single-gpu"] if nproc == 1 else \
        ["bash", "launch.sh", str(nproc)]
    cmd = launcher + ["--train-file", train, "--eval-file", held, "--output-dir", out, "--logging-dir", out + "-runs",
                      "--max-steps", "3", "--max-length", "128", "--cache-dir", cache, "--save-total-limit", "1"]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    t0 = time.perf_counter()
    with open(os.path.join(work, f"{name}.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc:
        raise RuntimeError(f"{name} exited with status {rc}: see {os.path.join(work, name + '.log')}")
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    setup = r["setup"]
    return {"tokenized": setup[0]["tokenized"], "data_s": setup[0]["data_s"],
            "ready_s": max(s["ready_s"] for s in setup), "wall_s": wall, "peaks": r["peak_rss_mb"],
            "node_mb": sum(s["pss_mb"] for s in setup)}


def scale_table(n: int, work: str, train_file: str = "") -> list:
    train, held = build_rows(n, os.path.join(work, "scale-data"), train_file)
    cache = os.path.join(work, "scale-tokens")
    rows, one = [], None
    for nproc in (1, 2):
        for first in (True, False):
            if first:
                shutil.rmtree(cache, ignore_errors=True)
            way = f"{'1 process' if nproc == 1 else 'launch.sh 2'}, {'first run' if first else 'cache hit'}"
            print(f"scale: {n:,} rows, {way} ...", file=sys.stderr, flush=True)
            r = one_run(work, f"scale-{nproc}-{'first' if first else 'hit'}", nproc, train, held, cache)
            if nproc == 1 and not first:
                one = r["node_mb"]
            rows.append({"way": way, "rows": n, **r, "peak_mb": " / ".join(f"{p:.0f}" for p in r["peaks"])})
    for row in rows:
        row["vs_one"] = row["node_mb"] / one if one else None
    return rows
