"""Training speed of this framework next to its peers': the same model, data, split, epochs and
hyper-parameters through every way, in one run on one machine, printed as one markdown table and
written as JSON.

    python scripts/benchmark.py [--epochs 1] [--limit N] [--max-length 128] [--batch-size 32]
                                [--only a,b,c,d,e,f] [--whole-job] [--output benchmark.json]

  a  ours, 1 process                  python -m bert_finetune.train --single-gpu
  b  ours, 2 processes (DDP)          bash launch.sh 2, half the batch per process: the same global batch
  c  a plain accelerate loop          random sampler, dynamic padding, torch's AdamW (not fused)
  d  the HF Trainer, its defaults     random sampler, dynamic padding
  e  the HF Trainer, group_by_length  train_sampling_strategy="group_by_length"
  f  the seed recipe's padding        the Trainer, every example padded to --max-length; when the run is
                                      longer than --padded-steps steps, only those are timed (no accuracy)
  g  ours, --precision fp32           where (a) is bf16 (a CPU with bf16 matmul units), our fp32 for reference
  h  the HF Trainer, defaults + bf16  bf16=True; only on a CPU with bf16 matmul units (or a GPU)
  i  the HF Trainer, group_by_length + bf16    its best setting there

c-f live in scripts/peers.py and need the bench extra (pip install -e .[bench]). Every row runs in a
fresh process on the same CSVs (label,review): the embedded default's data (Rotten Tomatoes) split
here once (20% held out, seeded), the first --limit training rows when given, all held-out rows.
Speed is the training loop's (no tokenizing, evaluating or saving); real tokens are non-padding ones.
MFU = real tokens/s x 6 x non-embedding parameters / matmul peak in the row's precision, the peak being
the best of torch.mm probes in that precision taken right before and right after the row (a shared
machine's peak drifts, and a busy moment only lowers a probe); ours' MFU is recomputed here the same way,
and the table prints the peak each row was judged against. Speed ratios move by 10-15% between runs on a shared machine:
compare rows of one run only.

--large-vocab adds a table for a multilingual-size vocabulary: MiniLM's depth and width with 250,002
token embeddings (random weights; XLM-R's vocabulary size), where on CPU the embedding matrix's gradient and
AdamW update cost more than the encoder: ours, ours with --freeze-embeddings, the Trainer with
group_by_length (and with bf16 where the CPU has bf16 units), each on the same data and batches.

--scale N adds a data-at-scale table (scripts/scale.py): with N training rows (the embedded sentences
repeated, or --train-file's), for 1 process and launch.sh 2, first run and cache hit: texts tokenized, data
set-up seconds, seconds to the first training step, wall clock and peak memory per rank. `--only ''` with it
runs that table alone.

--whole-job adds a second table: wall clock from process start to saved model for the whole job
(load, tokenize, 2 epochs, evaluate and save each epoch): ours (the embedded default job) vs the seed
recipe on the HF Trainer (eval/save each epoch, keep 2, load the best at the end and save it with its
tokenizer, dynamic padding), with its defaults and with group_by_length. `--only ''` skips table one.

--predict adds the serving table (scripts/serving_bench.py): a trained model (--predict-model, the embedded
default job's best/) scored on the held-out split and 500 IMDB reviews by transformers.pipeline (batch 1 and 32)
and by ours on torch fp32, torch bf16 (where the CPU has bf16 units), ONNX fp32 and ONNX int8: texts/s, accuracy,
labels equal to fp32, model size and peak memory. Needs the export extra (pip install -e ".[export]").
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ["HF_HUB_OFFLINE"] = "1"

import torch

from bert_finetune import data, precision, reporting

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402  (scripts/scale.py, beside this file)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "scripts", "peers.py")
SHARED = {"weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0}  # ours' defaults, given to every way
WHOLE_JOB_EPOCHS = 2


@dataclass
class Bench:
    args: argparse.Namespace
    work: str  # scratch folder: CSVs, specs, outputs, one log per process
    model: str
    train_csv: str
    eval_csv: str
    n_train: int
    flops_per_token: float
    device: torch.device

    def settings(self, epochs: int, batch_size: int, model: str | None = None) -> dict:
        """The hyper-parameters every way gets."""
        a = self.args
        return {"model": model or self.model, "epochs": epochs, "batch_size": batch_size, "max_length": a.max_length,
                "lr": a.lr, "seed": a.seed, **SHARED}

    @property
    def native_bf16(self) -> bool:
        return self.device.type == "cuda" or precision.cpu_has_fast("bf16")


class Skipped(Exception):
    """A row that does not apply on this machine (its reason is the row's note)."""


# ---------------------------------------------------------------- processes, timing, MFU

def run(bench: Bench, name: str, cmd: list) -> float:
    """Run cmd from the repository root, output to WORK/NAME.log; its wall-clock seconds."""
    log = os.path.join(bench.work, f"{name}.log")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc:
        with open(log, errors="replace") as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"{name} exited with status {rc} (log: {log}):\n{tail}")
    return seconds


def peaks(bench: Bench) -> dict:
    """The matmul peak in each precision a row may train in here."""
    names = ["fp32", "bf16"] if bench.native_bf16 else ["fp32"]
    return {name: reporting.matmul_peak_flops(bench.device, name) for name in names}


def measure(bench: Bench, row_fn) -> dict:
    """Run one row between matmul probes; MFU from its real tokens/s against the best probe in its precision."""
    before = peaks(bench)
    row = row_fn(bench)
    after = peaks(bench)
    peak = max(before[row["precision"]], after[row["precision"]])
    return {**row, "peak_gflops": peak / 1e9, "mfu": row["tokens_per_s"] * bench.flops_per_token / peak}


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def flags(settings: dict) -> list:
    return [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


# ---------------------------------------------------------------- ours and the peers

def ours(bench: Bench, nproc: int, extra: tuple = (), name: str = "", model: str | None = None) -> dict:
    name = name or f"ours-{nproc}"
    out = os.path.join(bench.work, name)
    if nproc == 1:
        launcher = [sys.executable, "-m", "bert_finetune.train", "--single-gpu"]
    else:
        launcher = ["bash", "launch.sh", str(nproc)]  # torchrun, found on PATH next to this Python
    settings = bench.settings(bench.args.epochs, bench.args.batch_size // nproc, model)
    run(bench, name, launcher + flags(settings) + ["--train-file", bench.train_csv, "--eval-file", bench.eval_csv,
                                                   "--output-dir", out, "--logging-dir", out + "-runs", *extra])
    r = read_json(os.path.join(out, "results.json"))
    seen, expected = r["train_samples_per_s"] * r["train_seconds"], bench.n_train * bench.args.epochs
    if abs(seen / expected - 1) > 0.05:
        print(f"warning: {name}: results.json's samples/s x train seconds = {seen:.0f} samples, not the "
              f"{expected} trained: its samples/s and train_seconds do not cover the same time", file=sys.stderr)
    return {"train_seconds": r["train_seconds"], "samples_per_s": r["train_samples_per_s"],
            "tokens_per_s": r["train_tokens_per_s"], "padding_fraction": r["padding_fraction"],
            "accuracy": r["final"]["accuracy"], "precision": r["precision"]}


def run_peer(bench: Bench, way: str, name: str, train_csv: str, eval_csv: str, epochs: int, model: str | None = None,
             **row) -> tuple:
    """One scripts/peers.py process: (its wall seconds, its result)."""
    spec = {**bench.settings(epochs, bench.args.batch_size, model), "train_csv": train_csv, "eval_csv": eval_csv,
            "output_dir": os.path.join(bench.work, name), **row}
    spec_path, result_path = (os.path.join(bench.work, f"{name}.{x}.json") for x in ("spec", "result"))
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    seconds = run(bench, name, [sys.executable, PEERS, way, spec_path, result_path])
    return seconds, read_json(result_path)


def peer(bench: Bench, way: str, name: str, **row) -> dict:
    _, r = run_peer(bench, way, name, bench.train_csv, bench.eval_csv, bench.args.epochs, **row)
    s = r["train_seconds"]
    return {"train_seconds": s, "samples_per_s": r["samples"] / s, "tokens_per_s": r["real_tokens"] / s,
            "padding_fraction": 1 - r["real_tokens"] / r["padded_tokens"], "accuracy": r["accuracy"],
            "precision": "bf16" if row.get("bf16") else "fp32"}


# ---------------------------------------------------------------- the rows

def row_ours(bench):
    return ours(bench, nproc=1)


def row_ours_ddp(bench):
    return {**ours(bench, nproc=2), "note": f"2 processes x batch {bench.args.batch_size // 2}"}


def row_accelerate(bench):
    return peer(bench, "accelerate", "accelerate")


def row_trainer(bench):
    return peer(bench, "trainer", "trainer")


def row_trainer_grouped(bench):
    return peer(bench, "trainer", "trainer-grouped", sampling="group_by_length")


def row_padded(bench):
    a = bench.args
    steps = a.epochs * math.ceil(bench.n_train / a.batch_size)
    cut = a.padded_steps if 0 < a.padded_steps < steps else 0
    row = peer(bench, "trainer", "padded", padding="max_length", max_steps=cut)
    return {**row, "note": f"first {cut} of {steps} steps timed" if cut else ""}


def row_ours_fp32(bench):
    if precision.resolve("auto", bench.device) == "fp32":
        raise Skipped("(a) is fp32 here")
    return ours(bench, nproc=1, extra=("--precision", "fp32"), name="ours-fp32")


def needs_bf16(bench):
    if not bench.native_bf16:
        raise Skipped("this CPU has no bf16 matmul units (avx512_bf16, amx_bf16)")


def row_trainer_bf16(bench):
    needs_bf16(bench)
    return peer(bench, "trainer", "trainer-bf16", bf16=True)


def row_trainer_grouped_bf16(bench):
    needs_bf16(bench)
    return peer(bench, "trainer", "trainer-grouped-bf16", sampling="group_by_length", bf16=True)


ROWS = {
    "a": ("(a) ours, 1 process", row_ours),
    "b": ("(b) ours, torchrun 2 processes", row_ours_ddp),
    "c": ("(c) accelerate loop", row_accelerate),
    "d": ("(d) HF Trainer, defaults", row_trainer),
    "e": ("(e) HF Trainer, group_by_length", row_trainer_grouped),
    "f": ("(f) seed recipe: pad to max length", row_padded),
    "g": ("(g) ours, --precision fp32", row_ours_fp32),
    "h": ("(h) HF Trainer, defaults + bf16", row_trainer_bf16),
    "i": ("(i) HF Trainer, group_by_length + bf16", row_trainer_grouped_bf16),
}
BASELINE = "d"


def throughput_table(bench: Bench, letters: list) -> list:
    rows = {}
    for letter in letters:
        label, row_fn = ROWS[letter]
        print(f"running {label} ...", file=sys.stderr, flush=True)
        try:
            rows[letter] = {"row": letter, "way": label, "note": "", **measure(bench, row_fn)}
        except Skipped as e:
            rows[letter] = {"row": letter, "way": label, "note": f"skipped: {e}"}
        except RuntimeError as e:
            print(e, file=sys.stderr)
            rows[letter] = {"row": letter, "way": label, "note": "failed (see its log)"}
    base = rows.get(BASELINE, {}).get("samples_per_s")
    for row in rows.values():
        row["vs_trainer"] = row["samples_per_s"] / base if base and "samples_per_s" in row else None
    return list(rows.values())


LARGE_VOCAB = 250_002  # XLM-R's and multilingual e5's


def large_vocab_model(bench: Bench) -> str:
    """MiniLM's encoder with a 250,002-row embedding matrix, random weights, MiniLM's tokenizer: its ids use the
    first 30,522 rows, and every row is in the gradient and the AdamW update, as in a multilingual model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    path = os.path.join(bench.work, "large-vocab-model")
    config = AutoConfig.from_pretrained(bench.model, num_labels=2, vocab_size=LARGE_VOCAB)
    torch.manual_seed(bench.args.seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(bench.model).save_pretrained(path)
    return path


def large_vocab_table(bench: Bench) -> list:
    model = large_vocab_model(bench)
    ways = [("ours", lambda b: ours(b, 1, name="vocab-ours", model=model)),
            ("ours, --freeze-embeddings", lambda b: ours(b, 1, ("--freeze-embeddings",), "vocab-ours-frozen",
                                                          model)),
            ("HF Trainer, group_by_length", lambda b: peer(b, "trainer", "vocab-trainer-grouped", model=model,
                                                           sampling="group_by_length"))]
    if bench.native_bf16:
        ways.append(("HF Trainer, group_by_length + bf16", lambda b: peer(
            b, "trainer", "vocab-trainer-grouped-bf16", model=model, sampling="group_by_length", bf16=True)))
    rows = []
    for label, row_fn in ways:
        label = f"{LARGE_VOCAB:,}-token vocabulary: {label}"
        print(f"running {label} ...", file=sys.stderr, flush=True)
        try:
            rows.append({"way": label, "note": "", **measure(bench, row_fn)})
        except RuntimeError as e:
            print(e, file=sys.stderr)
            rows.append({"way": label, "note": "failed (see its log)"})
    base = rows[2].get("samples_per_s")
    for row in rows:
        row["vs_trainer"] = row["samples_per_s"] / base if base and "samples_per_s" in row else None
    return rows


def whole_job_table(bench: Bench) -> list:
    """Wall clock from process start to saved model: ours' embedded default job vs the seed recipe."""
    a = bench.args
    table = data.embedded_table()
    train, held_out = data.split(table.iloc[:a.limit] if a.limit else table, 0.2, a.seed, data.EMBEDDED)
    train_csv, eval_csv = write_csvs(train, held_out, os.path.join(bench.work, "job-data"))
    size = {"train_rows": len(train), "held_out_rows": len(held_out), "epochs": WHOLE_JOB_EPOCHS}
    print(f"whole job: {len(train)} train / {len(held_out)} held-out rows, {WHOLE_JOB_EPOCHS} epochs, evaluate and "
          f"save each", file=sys.stderr, flush=True)
    rows = []

    print("running the whole job: ours ...", file=sys.stderr, flush=True)
    out = os.path.join(bench.work, "job-ours")
    limit = ["--limit", str(a.limit)] if a.limit else []
    seconds = run(bench, "job-ours", [sys.executable, "-m", "bert_finetune.train", "--single-gpu", "--output-dir", out,
                                       "--logging-dir", out + "-runs"]
                  + flags(bench.settings(WHOLE_JOB_EPOCHS, a.batch_size)) + limit)
    r = read_json(os.path.join(out, "results.json"))
    rows.append({"way": f"ours, the embedded default job ({r['precision']})", "wall_seconds": seconds,
                 "best_accuracy": r["best"]["accuracy"]})
    other = "fp32" if r["precision"] == "bf16" else "bf16" if bench.native_bf16 else None
    if other:  # the other precision this machine runs at full speed, for reference
        out = os.path.join(bench.work, f"job-ours-{other}")
        seconds = run(bench, f"job-ours-{other}", [sys.executable, "-m", "bert_finetune.train", "--single-gpu",
                                                   "--output-dir", out, "--logging-dir", out + "-runs",
                                                   "--precision", other]
                      + flags(bench.settings(WHOLE_JOB_EPOCHS, a.batch_size)) + limit)
        rows.append({"way": f"ours, --precision {other}", "wall_seconds": seconds,
                     "best_accuracy": read_json(os.path.join(out, "results.json"))["best"]["accuracy"]})

    for sampling, label in (("random", "HF Trainer, seed recipe, defaults"),
                            ("group_by_length", "HF Trainer, seed recipe, group_by_length")):
        print(f"running the whole job: {label} ...", file=sys.stderr, flush=True)
        seconds, r = run_peer(bench, "trainer-job", f"job-trainer-{sampling}", train_csv, eval_csv,
                              WHOLE_JOB_EPOCHS, sampling=sampling)
        rows.append({"way": label, "wall_seconds": seconds, "best_accuracy": r["best_accuracy"]})
    trainer = next(row for row in rows if row["way"] == "HF Trainer, seed recipe, defaults")
    return [{**row, **size, "vs_trainer": row["wall_seconds"] / trainer["wall_seconds"]} for row in rows]


# ---------------------------------------------------------------- data, tables, main

def write_csvs(train, held_out, folder: str) -> tuple:
    os.makedirs(folder, exist_ok=True)
    paths = os.path.join(folder, "train.csv"), os.path.join(folder, "eval.csv")
    for table, path in zip((train, held_out), paths):
        table.rename(columns={"text": "review"})[["label", "review"]].to_csv(path, index=False)
    return paths


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores ({torch.backends.cpu.get_cpu_capability()})"


def markdown(rows: list, columns: list) -> str:
    """columns: (header, key, format); a missing value prints as a dash."""
    def cell(row, key, fmt):
        return "—" if row.get(key) is None else fmt.format(row[key])
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, k, f) for _, k, f in columns) + " |" for row in rows]
    return "\n".join(lines)


THROUGHPUT_COLUMNS = [("way", "way", "{}"), ("train s", "train_seconds", "{:.1f}"),
                      ("samples/s", "samples_per_s", "{:.1f}"), ("real tokens/s", "tokens_per_s", "{:.0f}"),
                      ("padding", "padding_fraction", "{:.1%}"), ("precision", "precision", "{}"),
                      ("peak GFLOP/s", "peak_gflops", "{:.0f}"), ("MFU", "mfu", "{:.2f}"),
                      ("held-out acc", "accuracy", "{:.3f}"), ("speed vs (d)", "vs_trainer", "{:.2f}x"),
                      ("note", "note", "{}")]
WHOLE_JOB_COLUMNS = [("whole job", "way", "{}"), ("start to saved model, s", "wall_seconds", "{:.0f}"),
                     ("best held-out acc", "best_accuracy", "{:.3f}"),
                     ("time vs Trainer defaults", "vs_trainer", "{:.2f}x")]


SCALE_COLUMNS = scale.COLUMNS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="use the first N training rows (0 = all)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (row b: half per process)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--only", default=",".join(ROWS), help="rows to run, e.g. a,d,e ('' = none)")
    p.add_argument("--padded-steps", type=int, default=30, help="row f: time at most this many steps (0 = all)")
    p.add_argument("--whole-job", action="store_true", help="add the whole-job table (2 epochs; slow)")
    p.add_argument("--large-vocab", action="store_true", help="add the 250,002-token vocabulary table")
    p.add_argument("--scale", type=int, default=0, metavar="N",
                   help="add the data-at-scale table: set-up with N training rows (scripts/scale.py)")
    p.add_argument("--train-file", default="", help="--scale: repeat this label,review file's rows, not the "
                                                     "embedded sentences")
    p.add_argument("--predict", action="store_true", help="add the serving table (scripts/serving_bench.py)")
    p.add_argument("--predict-model", default="outputs/best", help="--predict: the embedded default job's best/")
    p.add_argument("--output", default="benchmark.json", help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (CSVs, outputs, logs)")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in ROWS]
    if unknown:
        p.error(f"--only: unknown row(s) {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    if "b" in args.only and args.batch_size % 2:
        p.error("row b splits --batch-size over 2 processes: give an even batch size")
    needs_bench = args.whole_job or args.large_vocab or any(x in args.only for x in "cdefhi")
    missing = [m for m in ("accelerate", "datasets") if importlib.util.find_spec(m) is None]
    if needs_bench and missing:
        p.error(f"rows c-f and --whole-job need {', '.join(missing)}: pip install -e .[bench]")
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if args.predict and missing:
        p.error(f"--predict needs {', '.join(missing)}: pip install -e \".[export]\"")
    if args.predict and not os.path.isfile(os.path.join(args.predict_model, "config.json")):
        p.error(f"--predict-model {args.predict_model}: not a trained model folder (train the embedded default first)")
    return args


def main(argv=None):
    args = parse_args(argv)
    import transformers
    from transformers import AutoModelForSequenceClassification
    transformers.logging.set_verbosity_error()  # the new head's load report, here only used to count parameters
    transformers.logging.disable_progress_bar()

    work = tempfile.mkdtemp(prefix="bert-finetune-bench-")
    model_dir = data.embedded_model_dir()
    table = data.embedded_table()
    train, held_out = data.split(table, 0.2, args.seed, data.EMBEDDED)
    train = train.iloc[:args.limit] if args.limit else train
    train_csv, eval_csv = write_csvs(train, held_out, os.path.join(work, "data"))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=table["label"].nunique())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(args, work, model_dir, train_csv, eval_csv, len(train), reporting.train_flops_per_token(model),
                  device)
    del model

    settings = {**bench.settings(args.epochs, args.batch_size), "train_rows": len(train),
                "held_out_rows": len(held_out), "flops_per_token": bench.flops_per_token,
                "device": device_name(device), "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__, "transformers": transformers.__version__, "command": " ".join(sys.argv)}
    print(f"{settings['device']}; batch {args.batch_size}, max length {args.max_length}, lr {args.lr}, seed {args.seed}; scratch {work}",
          file=sys.stderr)
    if args.only:
        print(f"speed: {len(train)} train / {len(held_out)} held-out rows, {args.epochs} epoch(s)", file=sys.stderr)

    results = {"settings": settings, "rows": throughput_table(bench, args.only)}
    failed = any(r["note"].startswith("failed") for r in results["rows"])
    if args.large_vocab:
        results["large_vocab"] = large_vocab_table(bench)
        failed |= any(r["note"].startswith("failed") for r in results["large_vocab"])
    if args.scale:
        try:
            results["scale"] = scale.scale_table(args.scale, work, args.train_file)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            results["scale"], failed = [], True
    if args.whole_job:
        try:
            results["whole_job"] = whole_job_table(bench)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            results["whole_job"], failed = [], True

    if args.predict:
        import serving_bench
        try:
            results["predict"] = serving_bench.table(args.predict_model, seed=args.seed,
                                                     work=os.path.join(work, "serving"))
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(e, file=sys.stderr)
            failed = True

    tables = [(results["rows"], THROUGHPUT_COLUMNS), (results.get("large_vocab"), THROUGHPUT_COLUMNS),
              (results.get("whole_job"), WHOLE_JOB_COLUMNS), (results.get("scale"), SCALE_COLUMNS)]
    print("\n\n".join(markdown(rows, columns) for rows, columns in tables if rows), flush=True)
    if results.get("predict"):
        print(("\n" if any(rows for rows, _ in tables) else "") + serving_bench.markdown(results["predict"]), flush=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    if args.keep or failed:
        print(f"scratch folder kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
