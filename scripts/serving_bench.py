"""Prediction speed of a trained model served six ways, in one run on one machine: transformers.pipeline at
batch 1 and batch 32, and ours (Predictor, as predict runs it) on torch fp32, torch bf16 autocast (where the CPU
multiplies in bf16), ONNX fp32 and ONNX int8 (exported here with bert_finetune.export).

    python scripts/benchmark.py --predict [--predict-model outputs/best] --only ''
    python scripts/serving_bench.py --model outputs/best [--imdb 500] [--output serving.json]

Two sets of texts: the held-out split of the embedded default (Rotten Tomatoes, the 20% that training with the
default seed held out) and --imdb long IMDB reviews from the same package (balanced, seeded). Each way runs in a
fresh process with every core (--threads), loads, scores 16 texts to warm up, then is timed on each set in
process: texts/s count tokenizing, batching and scoring, not start-up. Every way truncates at the model's max
length (the pipeline with truncation=True, max_length=...). Also: held-out accuracy, the share of labels equal to
ours in torch fp32, the model's size on disk, the process's peak resident memory (ru_maxrss), and the 1-minute load
average at the row's end (on a shared machine, rows run while other work competes for the cores are slower).
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WAYS = {
    "pipeline-1": "transformers.pipeline, batch 1",
    "pipeline-32": "transformers.pipeline, batch 32",
    "torch-fp32": "ours, torch fp32",
    "torch-bf16": "ours, torch bf16 autocast",
    "onnx-fp32": "ours, ONNX fp32",
    "onnx-int8": "ours, ONNX int8",
}
WARM_UP = 16


def datasets(work: str, imdb: int, seed: int) -> dict:
    """{name: csv path} of label,review files: the embedded default's held-out split, and IMDB reviews."""
    from bert_finetune import data
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from truncation_study import imdb_csvs
    table = data.embedded_table()
    _, held_out = data.split(table, 0.2, seed, data.EMBEDDED)
    paths = {"rt": os.path.join(work, "rt-held-out.csv")}
    held_out.rename(columns={"text": "review"})[["label", "review"]].to_csv(paths["rt"], index=False)
    if imdb:
        os.makedirs(os.path.join(work, "imdb"), exist_ok=True)
        paths["imdb"] = imdb_csvs(os.path.join(work, "imdb"), 0, imdb, seed)[1]
    return paths


# ---------------------------------------------------------------- one way, in its own process

def score_way(way: str, model: str, paths: dict, threads: int) -> dict:
    import pandas as pd
    import torch
    torch.set_num_threads(threads)
    from bert_finetune.inference import Predictor
    if way.startswith("pipeline"):
        from transformers import pipeline
        batch = int(way.split("-")[1])
        reference = Predictor(model, device=torch.device("cpu"), backend="torch")
        pipe = pipeline("text-classification", model=model, device="cpu")
        kwargs = {"batch_size": batch, "truncation": True, "max_length": reference.max_length}
        del reference

        def labels_of(texts):
            return [out["label"] for out in pipe(texts, **kwargs)]
    else:
        backend, number = way.split("-")
        predictor = Predictor(model, device=torch.device("cpu"), backend=backend, threads=threads,
                              precision="bf16" if number == "bf16" else "fp32" if backend == "torch" else "auto")

        def labels_of(texts):
            probs = predictor.probabilities(texts, batch_size=64)
            return [predictor.labels.names[i] for i in probs.argmax(1)]
    out = {}
    for name, path in paths.items():
        table = pd.read_csv(path, keep_default_na=False)
        texts = table["review"].tolist()
        labels_of(texts[:WARM_UP])
        started = time.perf_counter()
        predicted = labels_of(texts)
        seconds = time.perf_counter() - started
        out[name] = {"texts_per_s": len(texts) / seconds, "seconds": seconds, "predictions": predicted,
                     "accuracy": float((pd.Series(predicted) == table["label"]).mean())}
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load"] = os.getloadavg()[0]  # a shared machine's other work, over the last minute of this row
    return out


# ---------------------------------------------------------------- the table

def model_mb(folder: str) -> float:
    files = [f for f in os.listdir(folder) if f.startswith(("model.safetensors", "model.onnx"))]
    return sum(os.path.getsize(os.path.join(folder, f)) for f in files) / 1e6


def run_way(way, folder, paths, threads, work) -> dict:
    result = os.path.join(work, f"{way}.json")
    log = os.path.join(work, f"{way}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", way, "--model", folder, "--threads", str(threads),
           "--paths", json.dumps(paths), "--output", result]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        with open(log, errors="replace") as f:
            raise RuntimeError(f"{way} exited with status {rc}:\n{''.join(f.readlines()[-15:])}")
    with open(result) as f:
        return json.load(f)


def table(model: str, imdb: int = 500, seed: int = 42, threads: int = 0, work: str | None = None) -> dict:
    """Export, run every way, and return {settings, rows} with the markdown table in `markdown`."""
    from bert_finetune import precision, runtime
    work = work or tempfile.mkdtemp(prefix="bert-finetune-serving-")
    os.makedirs(work, exist_ok=True)
    threads = threads or runtime.available_cpus()
    paths = datasets(work, imdb, seed)
    folders = {"pipeline-1": model, "pipeline-32": model, "torch-fp32": model, "torch-bf16": model}
    exports = {}
    for way, quantize in (("onnx-fp32", "none"), ("onnx-int8", "int8")):
        folders[way] = os.path.join(work, way)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bert_finetune.export", "--model", model, "--output-dir", folders[way],
                        "--quantize", quantize, "--data", paths["rt"], "--text-column", "review", "--samples", "0"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        exports[way] = {"seconds": time.perf_counter() - started}
    ways = [w for w in WAYS if w != "torch-bf16" or precision.cpu_has_fast("bf16")]
    results = {}
    for way in ways:
        print(f"running {WAYS[way]}", file=sys.stderr, flush=True)
        results[way] = run_way(way, folders[way], paths, threads, work)
    rows = []
    for way in ways:
        row = {"way": WAYS[way], "model_mb": model_mb(folders[way]), "peak_mb": results[way]["peak_mb"],
               "load": results[way]["load"]}
        for name in paths:
            r = results[way][name]
            best_pipeline = max(results[w][name]["texts_per_s"] for w in ("pipeline-1", "pipeline-32"))
            same = sum(a == b for a, b in zip(r["predictions"], results["torch-fp32"][name]["predictions"]))
            row.update({f"{name}_texts_per_s": r["texts_per_s"], f"{name}_vs_pipeline": r["texts_per_s"] / best_pipeline,
                        f"{name}_accuracy": r["accuracy"], f"{name}_same_as_fp32": same / len(r["predictions"])})
        rows.append(row)
    fp32_mb = next(r["model_mb"] for r in rows if r["way"] == WAYS["torch-fp32"])
    for row in rows:
        row["size_vs_fp32"] = row["model_mb"] / fp32_mb
    return {"rows": rows, "exports": exports, "threads": threads, "texts": {n: p for n, p in paths.items()}}


def markdown(result: dict) -> str:
    names = [n for n in ("rt", "imdb") if f"{n}_texts_per_s" in result["rows"][0]]
    titles = {"rt": "RT held-out", "imdb": "IMDB"}
    header = ["way"]
    for n in names:
        header += [f"{titles[n]} texts/s", "vs pipeline best", f"{titles[n]} acc", "labels = fp32"]
    header += ["model MB", "size vs fp32", "peak RSS MB", "load avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        cells = [row["way"]]
        for n in names:
            cells += [f"{row[f'{n}_texts_per_s']:.1f}", f"{row[f'{n}_vs_pipeline']:.2f}x",
                      f"{row[f'{n}_accuracy']:.4f}", f"{row[f'{n}_same_as_fp32']:.2%}"]
        cells += [f"{row['model_mb']:.1f}", f"{row['size_vs_fp32']:.2f}x", f"{row['peak_mb']:.0f}", f"{row['load']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="outputs/best", help="a trained model folder (the embedded default's)")
    p.add_argument("--imdb", type=int, default=500, help="long IMDB reviews to score too (0 = none)")
    p.add_argument("--seed", type=int, default=42, help="the split's seed (training's --seed)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core)")
    p.add_argument("--output", default="serving.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        with open(args.output, "w") as f:
            json.dump(score_way(args.worker, args.model, json.loads(args.paths), args.threads), f)
        return
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}: pip install -e \".[export]\"")
    result = table(args.model, args.imdb, args.seed, args.threads)
    print(markdown(result))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
