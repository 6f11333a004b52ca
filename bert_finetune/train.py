"""Fine-tune a BERT-family classifier: one loop for one device and for torchrun/DDP.

    python -m bert_finetune.train --single-gpu [--config configs/X.yaml] [--key value ...]
    bash launch.sh N [same flags]

Reads top to bottom: settings, data, model, optimizer, (resume), the epochs, evaluation,
checkpoints, results. Single process and DDP share every line but setup and a few
`world_size > 1` branches.
"""
import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from . import checkpoint, config, data, distributed, metrics, modeling, optim, reporting, visuals
from .errors import UserError, cli
from .evaluate import eval_loader, evaluate
from .sampling import LengthGroupedSampler, steps_per_epoch

log = logging.getLogger("bert_finetune")

# settings that change the trajectory: a resume under different values is not the same run
TRAJECTORY_KEYS = ("model", "train_file", "eval_file", "eval_split", "limit", "max_length", "epochs", "batch_size",
                   "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "max_steps", "precision",
                   "sampler", "seed", "truncation", "head_tokens", "text_pair_column", "class_weights",
                   "layer_lr_decay", "eval_steps", "early_stopping_patience")


# ---------------------------------------------------------------- data

def load_tables(cfg: config.Config):
    """(train table, held-out table, label map, where each came from)."""
    pair_column = cfg.text_pair_column or None
    if cfg.train_file:
        table = data.read_table(cfg.train_file, cfg.text_column, cfg.label_column, cfg.limit, cfg.strict, pair_column)
        source = cfg.train_file
    elif pair_column:
        raise UserError(f"--text-pair-column {pair_column}: the embedded default data has no second text; "
                        f"pass a --train-file with that column")
    else:
        table, source = data.embedded_table(), data.EMBEDDED
        table = table.iloc[:cfg.limit] if cfg.limit else table
    labels = data.LabelMap.from_values(table["label"])
    if len(labels) < 2:
        raise UserError(f"{source}: column '{cfg.label_column}' holds a single class ({labels.names[0]}); "
                        f"classification needs at least two")
    if cfg.eval_file:
        held_out = data.read_table(cfg.eval_file, cfg.text_column, cfg.label_column, cfg.limit, cfg.strict,
                                   pair_column)
        labels.encode(held_out, cfg.eval_file)  # fails on labels the training file never had
        return table, held_out, labels, (source, cfg.eval_file)
    train, held_out = data.split(table, cfg.eval_split, cfg.seed, source)
    return train, held_out, labels, (source, source)


def head_tokens(cfg: config.Config, tokenizer) -> int:
    """--head-tokens resolved (0 = a quarter of the budget); 0 unless --truncation head_tail."""
    if cfg.truncation != "head_tail":
        return 0
    budget = cfg.max_length - tokenizer.num_special_tokens_to_add(pair=False)
    k = cfg.head_tokens or data.default_head_tokens(budget)
    if not 0 < k < budget:
        raise UserError(f"--head-tokens {k} leaves no room for head and tail: --max-length {cfg.max_length} keeps "
                        f"{budget} tokens besides the special ones")
    return k


def encode(tokenizer, table, labels: data.LabelMap, source: str, cfg: config.Config) -> data.EncodedDataset:
    texts, types = table["text"].tolist(), None
    if cfg.text_pair_column:
        ids, types = data.tokenize_pairs_cached(tokenizer, texts, table["pair"].tolist(), cfg.max_length,
                                                cfg.cache_dir)
    else:
        ids = data.tokenize_cached(tokenizer, texts, cfg.max_length, cfg.cache_dir, cfg.truncation,
                                   head_tokens(cfg, tokenizer))
    return data.EncodedDataset(ids, labels.encode(table, source), texts, types)


# ---------------------------------------------------------------- precision

def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested != "fp32" and device.type == "cpu" and not _cpu_has_fast(requested):
        log.warning("--precision %s: this CPU has no %s matmul units (AMX or AVX-512 %s), so it runs about 100x "
                    "slower than fp32; use --precision fp32", requested, requested, requested.upper())
    return requested


def _cpu_has_fast(precision: str) -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    wanted = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}[precision]
    return any(f" {w}" in flags for w in wanted)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- RNG

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This rank's RNG states as plain bytes and tuples: they travel through all_gather_object and
    load back with weights_only=True."""
    _, mt, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (mt.astype(np.uint32).tobytes(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state: dict):
    def tensor(b):
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)
    random.setstate(_as_tuples(state["python"]))
    mt, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.frombuffer(mt, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- signals

class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves, and exits non-zero."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum


# ---------------------------------------------------------------- output dir

def check_output_dir(cfg: config.Config, restarted: bool) -> str | None:
    """Where to resume from (or None); refuses to start over an earlier run's checkpoints."""
    out = cfg.output_dir
    checkpoint.make_output_dir(out)
    spec = cfg.resume or ("auto" if restarted else "")
    if spec:
        path = checkpoint.find_resume(spec, out)
        if path is None:
            log.info("--resume auto: no checkpoint in %s, starting fresh", out)
        return path
    if checkpoint.list_checkpoints(out):
        raise UserError(f"--output-dir {out} holds checkpoints of an earlier run: pass --resume auto to continue it, "
                        f"or choose another --output-dir")
    return None


# ---------------------------------------------------------------- main

@cli
def main(argv=None):
    cfg, extra = config.parse(argv, extra=[(("--single-gpu",), {"action": "store_true", "dest": "single_gpu",
                                                                 "help": "one process on one device (no torchrun)"})])
    single = getattr(extra, "single_gpu", False)
    rank = 0 if single else int(os.environ.get("RANK", "0"))
    reporting.setup_logging(rank)

    # -- everything that can be wrong with the input is found before anything is written
    model_name = modeling.resolve(cfg.model)
    tokenizer = modeling.load_tokenizer(model_name, cfg.trust_remote_code)
    model_config = modeling.load_config(model_name, cfg.trust_remote_code)
    limit = modeling.max_positions(model_config)
    if limit and cfg.max_length > limit:
        raise UserError(f"--max-length {cfg.max_length} is above the model's position limit ({limit})")
    head_tokens(cfg, tokenizer)  # a --head-tokens that does not fit fails here, before anything is written
    train_table, eval_table, labels, (train_src, eval_src) = load_tables(cfg)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume_from = check_output_dir(cfg, restarted) if rank == 0 else None

    dist = distributed.setup(cfg.dist_timeout, single=single)
    try:
        distributed.barrier()  # rank 0 has created the output dir by now
        if not os.path.isdir(cfg.output_dir):
            raise UserError(f"--output-dir {cfg.output_dir}: missing on this node (rank {dist.rank}) although rank 0 "
                            f"created it: the output dir must be on storage that every node shares")
        run(cfg, dist, model_name, tokenizer, model_config, train_table, eval_table, labels, train_src, eval_src,
            distributed.broadcast(resume_from))
    finally:
        distributed.teardown()


def run(cfg, dist, model_name, tokenizer, model_config, train_table, eval_table, labels, train_src, eval_src,
        resume_from):
    is_main, world = dist.is_main, dist.world_size
    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    # -- data: tokenize once, unpadded; batches padded to their own longest example
    t0 = time.perf_counter()
    train_set = encode(tokenizer, train_table, labels, train_src, cfg)
    eval_set = encode(tokenizer, eval_table, labels, eval_src, cfg)
    log.info("data: %d train / %d held-out examples, %d labels (%s), tokenized in %.1f s",
             len(train_set), len(eval_set), len(labels), ", ".join(labels.names), time.perf_counter() - t0)
    collate = data.Collator(tokenizer.pad_token_id or 0, multiple=8 if device.type == "cuda" else 1)
    sampler = LengthGroupedSampler(train_set.lengths, cfg.batch_size, world, dist.rank, cfg.seed,
                                   group_by_length=cfg.sampler == "length")
    # its own generator: creating a DataLoader iterator must not draw from the global RNG (exact resume)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                              pin_memory=device.type == "cuda", generator=torch.Generator())
    held_out = eval_loader(eval_set, cfg.eval_batch_size, dist, collate)

    # -- model: the same seed on every rank, so the new classifier head starts identical
    seed_everything(cfg.seed)
    model_config.num_labels = len(labels)
    model_config.id2label = dict(enumerate(labels.names))
    model_config.label2id = dict(labels.ids)
    model = modeling.load_classifier(model_name, model_config, cfg.trust_remote_code).to(device)
    if device.type == "cpu" and not cfg.compile:  # torch.compile makes its own dropout kernels
        modeling.use_fast_dropout(model)  # CPU dropout is bound by its RNG: see modeling.FastDropout
    if modeling.train_last_layer_on_first_token(model):  # the head reads [CLS] alone: the same loss, less work
        log.info("training computes the last layer at the first token only (the classifier reads nothing else)")
    raw_model = model

    # -- optimizer and schedule
    batches_per_epoch = len(train_loader)
    updates_per_epoch = steps_per_epoch(batches_per_epoch, cfg.grad_accum)
    total_steps = cfg.epochs * updates_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = optim.build_optimizer(raw_model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay)
    scheduler = optim.build_scheduler(optimizer, warmup_steps, total_steps)
    log.info("learning rates: %s", optim.describe_lrs(optimizer.param_groups))
    class_weights, loss_weights = None, None
    if cfg.class_weights == "balanced":
        class_weights = data.balanced_class_weights(train_set.labels, len(labels))
        loss_weights = torch.tensor(class_weights, dtype=torch.float32, device=device)
        log.info("class weights (balanced): %s", ", ".join(f"{n} {w:.4f}" for n, w in zip(labels.names, class_weights)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_for(precision, device)

    # -- resume: weights before DDP wraps the model, then optimizer, schedule, scaler, position, RNG
    state = {"step": 0, "epoch": 0, "batches_done": 0, "best": None, "best_step": None, "epochs": [],
             "evals_without_improvement": 0, "stopped": None, "loop_seconds": 0.0, "speed": None}
    seed_everything(cfg.seed + dist.rank)  # dropout differs across ranks
    if resume_from:
        weights, saved = checkpoint.load(resume_from)
        raw_model.load_state_dict(weights)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state.update(saved["progress"])
        _warn_if_changed(saved["config"], config.to_dict(cfg), saved["world_size"], world)
        log.info("resumed from %s: step %d, epoch %d, batch %d", resume_from, state["step"], state["epoch"] + 1,
                 state["batches_done"])

    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model, dynamic=True)

    # -- reporting
    run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    writer = reporting.Writer(os.path.join(cfg.output_dir, "runs", run_name) if is_main else None)
    flops_per_token = reporting.train_flops_per_token(raw_model)
    def measure_peak() -> float:  # the whole job's: summed over ranks
        return float(distributed.all_reduce_sum(np.array([reporting.matmul_peak_flops(device, precision)]), device)[0])
    peak = measure_peak()
    log.info("model %s: %.1fM parameters; %s on %s x %d; %d steps (%d per epoch), warmup %d; peak %.0f GFLOP/s",
             model_name, sum(p.numel() for p in raw_model.parameters()) / 1e6, precision, device.type, world,
             total_steps, updates_per_epoch, warmup_steps, peak / 1e9)

    export_info = {"max_length": cfg.max_length, "text_column": cfg.text_column, "label_column": cfg.label_column,
                   "text_pair_column": cfg.text_pair_column, "truncation": cfg.truncation,
                   "head_tokens": head_tokens(cfg, tokenizer)}

    def save_checkpoint():
        rngs = distributed.gather(rng_state())
        if is_main:
            path = checkpoint.save(cfg.output_dir, state["step"], raw_model.state_dict(), {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "progress": dict(state), "rng": rngs,
                "config": config.to_dict(cfg), "world_size": world})
            best = os.path.join(cfg.output_dir, f"{checkpoint.PREFIX}{state['best_step']:06d}") \
                if state["best_step"] is not None else None
            checkpoint.rotate(cfg.output_dir, cfg.save_total_limit, protect=[best])
            log.info("saved checkpoint %s", path)
        distributed.barrier()

    def run_evaluation(epoch: int) -> dict:  # the epoch's record: epoch, step and metrics
        result = evaluate(raw_model, held_out, len(labels), device, autocast)
        m = result.metrics
        record = {"epoch": epoch + 1, "step": state["step"], **m}
        state["epochs"].append(record)
        log.info("eval epoch %d step %d: %s", epoch + 1, state["step"],
                 " ".join(f"{k} {v:.4f}" for k, v in m.items()))
        writer.scalars(m, state["step"], "eval/")
        # pictures on rank 0; each rank holds only its shard's predictions
        shares = distributed.gather((result.indices, result.labels, result.probs))
        visuals.log_evaluation(writer, state["step"], result.confusion, labels.names, shares, eval_set.texts)
        improved = metrics.better(cfg.metric_for_best, m[cfg.metric_for_best],
                                  state["best"] and state["best"][cfg.metric_for_best])
        waited = 0 if improved else state["evals_without_improvement"] + 1
        # rank 0 decides and every rank follows it, so that all ranks stop at the same step
        improved, waited = distributed.broadcast((improved, waited))
        state["evals_without_improvement"] = waited
        if improved:
            state["best"], state["best_step"] = record, state["step"]
            if is_main:
                checkpoint.export(raw_model, tokenizer, os.path.join(cfg.output_dir, "best"), export_info)
        elif cfg.early_stopping_patience and waited >= cfg.early_stopping_patience:
            state["stopped"] = {
                "step": state["step"], "reason": "early_stopping",
                "message": f"early stopping: {cfg.metric_for_best} has not improved for {waited} evaluations "
                           f"(--early-stopping-patience {cfg.early_stopping_patience}); best "
                           f"{state['best'][cfg.metric_for_best]:.4f} at step {state['best_step']}"}
            log.info("%s", state["stopped"]["message"])
        distributed.barrier()
        return record

    # -- the loop; RNG states restored last, once nothing else will draw from them
    if resume_from and saved["world_size"] == world:
        set_rng_state(saved["rng"][dist.rank])
    stop = StopRequest()
    model.train()
    meter = reporting.Meter(flops_per_token, peak, state["speed"])
    bar = reporting.progress(total_steps, state["step"], is_main)
    loss_sum, norm_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    loss_count = 0
    final = state["epochs"][-1] if state["epochs"] and (state["step"] >= total_steps or state["stopped"]) else None
    t_start = time.perf_counter() - state["loop_seconds"]
    for epoch in range(state["epoch"], cfg.epochs):
        if state["step"] >= total_steps or state["stopped"]:
            break
        sampler.set_epoch(epoch)
        first_batch = state["batches_done"] if epoch == state["epoch"] else 0
        sampler.skip(first_batch * cfg.batch_size)
        for batch_idx, batch in enumerate(train_loader, start=first_batch):
            # the last accumulation group of an epoch may be short: scale by its real size
            group_start = batch_idx - batch_idx % cfg.grad_accum
            group_size = min(cfg.grad_accum, batches_per_epoch - group_start)
            is_update = batch_idx + 1 == group_start + group_size
            meter.add(batch)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "index"}
            targets = batch.pop("labels")
            # between updates, skip DDP's gradient all-reduce: the last micro-step syncs them all
            sync = nullcontext() if is_update or world == 1 else model.no_sync()
            with sync:
                with autocast():
                    logits = model(**batch).logits
                # our own loss, not the model's: it takes the class weights
                loss = F.cross_entropy(logits.float(), targets, weight=loss_weights) / group_size
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
            if not is_update:
                continue

            if cfg.max_grad_norm:
                scaler.unscale_(optimizer)
                norm_sum += optim.clip_grad_norm(raw_model.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batches_done"] = batch_idx + 1
            loss_count += 1
            bar.update(1)

            if state["step"] % cfg.log_steps == 0 or state["step"] == total_steps:
                totals = distributed.all_reduce_sum(
                    np.array([loss_sum.item(), norm_sum.item(), loss_count, *meter.counts()]), device)
                speed = meter.lap(totals[3:])
                logged = {"loss": totals[0] / max(totals[2], 1), "lr": scheduler.get_last_lr()[0], **speed}
                if cfg.max_grad_norm:  # the norm before clipping, mean over the interval's updates
                    logged["grad_norm"] = totals[1] / max(totals[2], 1)
                writer.scalars(logged, state["step"], "train/")
                bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}",
                                samples_s=f"{speed['samples_per_s']:.1f}", pad=f"{speed['padding_fraction']:.1%}",
                                mfu=f"{speed['mfu']:.2f}")
                loss_sum.zero_()
                norm_sum.zero_()
                loss_count = 0

            stopping = distributed.any_rank(stop.signum is not None, device) if world > 1 else stop.signum is not None
            epoch_done = state["batches_done"] == batches_per_epoch
            if epoch_done:
                state["epoch"], state["batches_done"] = epoch + 1, 0
            state["loop_seconds"] = time.perf_counter() - t_start
            evaluating = state["step"] >= total_steps or epoch_done or bool(
                cfg.eval_steps and state["step"] % cfg.eval_steps == 0)
            saving = evaluating or stopping or (cfg.save_steps and state["step"] % cfg.save_steps == 0)
            if saving:  # evaluation and checkpoints are not training time
                meter.lap(distributed.all_reduce_sum(np.array(meter.counts()), device))
                state["speed"] = dict(meter.totals)
            if evaluating:
                final = run_evaluation(epoch)
            if saving:
                save_checkpoint()
                meter.restart()
            if stopping:
                bar.close()
                name = signal.Signals(stop.signum).name if stop.signum else "a stop signal on another rank"
                log.warning("stopped by %s at step %d: checkpoint saved; continue with --resume auto",
                            name, state["step"])
                writer.close()
                sys.exit(128 + (stop.signum or signal.SIGTERM))
            if state["step"] >= total_steps or state["stopped"]:
                break
    bar.close()
    if state["stopped"] is None:
        planned = cfg.epochs * updates_per_epoch
        state["stopped"] = {"step": state["step"], "reason": "max_steps" if total_steps < planned else "epochs",
                            "message": f"--max-steps {cfg.max_steps} reached" if total_steps < planned
                            else f"all {cfg.epochs} epochs done"}
    # a shared machine's peak drifts: the run's MFU is judged against the mean of probes before and after it
    meter.peak = (peak + measure_peak()) / 2
    speed = meter.overall()

    # -- outputs: last/ is the weights `final` measured; best/ was written when it was best
    if is_main:
        checkpoint.export(raw_model, tokenizer, os.path.join(cfg.output_dir, "last"), export_info)
        results = {
            "best": state["best"], "final": final, "epochs": state["epochs"],
            "best_step": state["best_step"], "steps": state["step"], "world_size": world,
            "precision": precision, "labels": labels.names, "stopped": state["stopped"],
            "class_weights": dict(zip(labels.names, class_weights.tolist())) if class_weights is not None else None,
            "train_seconds": meter.totals["seconds"],  # the training steps alone
            "loop_seconds": state["loop_seconds"],  # with evaluations and checkpoints
            "train_samples_per_s": speed["samples_per_s"],
            "train_tokens_per_s": speed["tokens_per_s"],
            "padding_fraction": speed["padding_fraction"],
            "mfu": speed["mfu"], "peak_flops": meter.peak,
            "config": config.to_dict(cfg),
        }
        _write_json(os.path.join(cfg.output_dir, "results.json"), results)
        final_metrics = {k: v for k, v in (final or {}).items() if k not in ("epoch", "step")}
        if state["best"]:
            final_metrics[f"best_{cfg.metric_for_best}"] = state["best"][cfg.metric_for_best]
        writer.hparams({**config.to_dict(cfg), "world_size": world, "precision_used": precision,
                        "num_labels": len(labels)}, final_metrics, state["step"])
        writer.close()
        log.info("done: best %s %.4f at step %s; outputs in %s", cfg.metric_for_best,
                 state["best"][cfg.metric_for_best], state["best_step"], cfg.output_dir)
    distributed.barrier()


def _warn_if_changed(saved: dict, current: dict, saved_world: int, world: int):
    changed = [k for k in TRAJECTORY_KEYS if saved.get(k) != current.get(k)]
    if changed:
        log.warning("resuming with settings that differ from the checkpoint's: %s: not the same run as before",
                    ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed))
    if saved_world != world:
        log.warning("resuming on %d processes a run saved on %d: data order and RNG streams differ from an "
                    "unbroken run", world, saved_world)


def _write_json(path: str, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
