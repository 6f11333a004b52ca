"""Fine-tune a BERT-family classifier: one loop for one device and for torchrun/DDP.

    python -m bert_finetune.train --single-gpu [--config configs/X.yaml] [--key value ...]
    bash launch.sh N [same flags]

Reads top to bottom. main() checks every input before anything is written, sets up the processes and
runs a Trainer. The Trainer builds the data, the model and the optimizer, restores a checkpoint, runs
the epoch loop (train()) and writes the results (finish()). It is the small Trainer class of the
pytorch/examples DDP tutorial: the built pieces live on one object, so each step of the loop is a short
method, the loop itself fits on a screen, and what a checkpoint must carry is one TrainState instead of
variables spread over closures. Single process and DDP share every line but setup and a few
`world_size > 1` branches.
"""
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from . import (PROCESS_START, checkpoint, config, data, distributed, inference, metrics, modeling, multilabel, optim,
               precision, reporting, rng, speedups, visuals)
from .errors import UserError, WriteError, cli
from .evaluate import evaluate
from .sampling import LengthGroupedSampler, steps_per_epoch
from .state import TrainState, after_step

log = logging.getLogger("bert_finetune")


# ---------------------------------------------------------------- setup

@dataclass
class Job:
    """The inputs, read and checked before anything is written or any process group forms."""
    model_name: str
    tokenizer: object
    model_config: object
    tables: data.Tables


def check_inputs(cfg: config.Config) -> Job:
    model_name = modeling.resolve(cfg.model)
    tokenizer = modeling.load_tokenizer(model_name, cfg.trust_remote_code)
    model_config = modeling.load_config(model_name, cfg.trust_remote_code)
    modeling.check_max_length(cfg.max_length, model_config)
    data.resolve_head_tokens(cfg, tokenizer)  # a --head-tokens that does not fit fails here
    return Job(model_name, tokenizer, model_config, data.load_tables(cfg))


def check_output_dir(cfg: config.Config, restarted: bool) -> str | None:
    """Where to resume from (or None); refuses to start over an earlier run's checkpoints."""
    out = cfg.output_dir
    checkpoint.make_output_dir(out)
    checkpoint.sweep(out)  # what a process killed while saving left behind
    # after an elastic restart, continue from the newest checkpoint, not again from --resume PATH (which may
    # be older, or rotated away by now)
    spec = "auto" if restarted else cfg.resume
    if spec:
        path = checkpoint.find_resume(spec, out)
        if path is None:
            log.info("--resume auto: no checkpoint in %s, starting fresh", out)
        return path
    if checkpoint.list_checkpoints(out):
        raise UserError(f"--output-dir {out} holds checkpoints of an earlier run: pass --resume auto to continue it, "
                        f"or choose another --output-dir")
    return None


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves, and raises Preempted."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum


class Preempted(Exception):
    """A stop signal ended the run once its checkpoint was saved (signum None: it reached another rank)."""

    def __init__(self, signum: int | None, step: int):
        super().__init__(signum, step)
        self.signum, self.step = signum, step


SINGLE_GPU = (("--single-gpu",), {"action": "store_true", "dest": "single_gpu",
                                  "help": "one process on one device (no torchrun)"})


@cli
def main(argv=None):
    cfg, extra = config.parse(argv, extra=[SINGLE_GPU])
    single = getattr(extra, "single_gpu", False)
    rank = 0 if single else int(os.environ.get("RANK", "0"))
    reporting.setup_logging(rank)
    job = check_inputs(cfg)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume_from = check_output_dir(cfg, restarted) if rank == 0 else None

    dist = distributed.setup(cfg.dist_timeout, single=single)
    try:
        distributed.barrier()  # rank 0 has created the output dir by now
        if not os.path.isdir(cfg.output_dir):
            raise UserError(f"--output-dir {cfg.output_dir}: missing on this node (rank {dist.rank}) although rank 0 "
                            f"created it: the output dir must be on storage that every node shares")
        trainer = Trainer(cfg, dist, job, distributed.broadcast(resume_from))
        try:
            trainer.train()
            trainer.finish()
        finally:
            trainer.writer.close()
    except Preempted as stop:
        cause = signal.Signals(stop.signum).name if stop.signum else "a stop signal on another rank"
        log.warning("stopped by %s at step %d: checkpoint saved; continue with --resume auto", cause, stop.step)
        sys.exit(128 + (stop.signum or signal.SIGTERM))
    finally:
        distributed.teardown()


# ---------------------------------------------------------------- the run

class Trainer:
    """One training run: what it is built from, where it stands (self.state), and the steps of its loop."""

    def __init__(self, cfg: config.Config, dist: distributed.Dist, job: Job, resume_from: str | None):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.precision = precision.resolve(cfg.precision, self.device, say=dist.is_main)
        precision.allow_tf32(self.device)
        self.tokenizer, self.model_config = job.tokenizer, job.model_config
        self._build_data(job.tables)
        job.tables = None  # tokenized: their texts need not stay in memory
        self._build_model(job)
        self._build_optimizer()
        self.state = TrainState()
        rng.seed_everything(cfg.seed + dist.rank)  # dropout differs across ranks
        self.saved_rng = self._restore(resume_from) if resume_from else None
        self.checkpoint_bytes, self.warned_room = 0, False  # the last checkpoint's size; warned of no room once
        self.model = self._wrap(self.raw_model)
        self._build_reporting()
        self.setup_report["peak_rss_mb"] = reporting.peak_rss_mb()
        self.setup_report["pss_mb"] = reporting.proportional_mb()  # shared pages counted once over the processes
        self.setup_report["ready_s"] = round(time.time() - PROCESS_START, 2)  # to the first training step
        self.setup_reports = distributed.gather(self.setup_report)
        log.info("set up: %s", "; ".join(f"rank {r['rank']} {r['tokenized'] and 'tokenized' or 'read the cache'} "
                                          f"(data {r['data_s']:.1f} s), ready at {r['ready_s']:.1f} s, peak memory "
                                          f"{r['peak_rss_mb']:.0f} MB, now {r['pss_mb']:.0f} MB of its own"
                                          for r in self.setup_reports))

    def _build_data(self, tables: data.Tables):
        """Tokenize once per node, unpadded: each node's first rank tokenizes into the token cache while the others
        wait, then they read it memory-mapped. Batches are padded to their own longest example."""
        cfg, dist, t0 = self.cfg, self.dist, time.perf_counter()
        self.labels = tables.labels
        self.multi_label = self.labels.multi_label
        with distributed.node_leader_first(dist.local_rank == 0, enabled=bool(cfg.cache_dir)):
            self.train_set = data.encode_table(self.tokenizer, tables.train, self.labels, tables.train_source, cfg,
                                               keep_texts=False, progress=dist.is_main)
            # the texts of the examples shown in TensorBoard, on the rank that writes it
            self.eval_set = data.encode_table(self.tokenizer, tables.held_out, self.labels, tables.held_out_source,
                                              cfg, keep_texts=dist.is_main)
        self.setup_report = {"rank": dist.rank, "data_s": round(time.perf_counter() - t0, 2),
                             "tokenized": sum(len(d) for d in (self.train_set, self.eval_set)
                                              if d.input_ids.computed)}
        log.info("data: %d train / %d held-out examples, %d labels (%s), %s in %.1f s", len(self.train_set),
                 len(self.eval_set), len(self.labels), ", ".join(self.labels.names),
                 "tokenized" if self.setup_report["tokenized"] else "token ids from the cache",
                 self.setup_report["data_s"])
        self.collate = inference.collator(self.tokenizer, self.device, self.model_config)
        self.sampler = LengthGroupedSampler(self.train_set.lengths, cfg.batch_size, dist.world_size, dist.rank,
                                            cfg.seed, group_by_length=cfg.sampler == "length")
        # its own generator: creating a DataLoader iterator must not draw from the global RNG (exact resume)
        self.train_loader = DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=self.sampler,
                                       collate_fn=self.collate, pin_memory=self.device.type == "cuda",
                                       generator=torch.Generator())
        self.held_out = inference.length_sorted_loader(self.eval_set, cfg.eval_batch_size, self.collate, self.device,
                                                       dist.world_size, dist.rank)
        self.batches_per_epoch = len(self.train_loader)
        self.planned_steps = cfg.epochs * steps_per_epoch(self.batches_per_epoch, cfg.grad_accum)
        self.total_steps = min(self.planned_steps, cfg.max_steps) if cfg.max_steps else self.planned_steps

    def _build_model(self, job: Job):
        cfg = self.cfg
        rng.seed_everything(cfg.seed)  # the same on every rank, so the new classifier head starts identical
        job.model_config.num_labels = len(self.labels)
        job.model_config.id2label = dict(enumerate(self.labels.names))
        job.model_config.label2id = dict(self.labels.ids)
        # what transformers' pipeline reads to apply a sigmoid per label instead of a softmax
        if self.multi_label:
            job.model_config.problem_type = data.MULTI_LABEL_PROBLEM
        elif getattr(job.model_config, "problem_type", None) == data.MULTI_LABEL_PROBLEM:
            job.model_config.problem_type = None  # a multi-label model fine-tuned again as single-label
        self.raw_model = modeling.load_classifier(job.model_name, job.model_config, cfg.trust_remote_code,
                                                  new_head=True)
        self.raw_model.to(self.device)
        if cfg.freeze_embeddings:
            frozen = self.raw_model.get_input_embeddings().weight.requires_grad_(False)
            log.info("--freeze-embeddings: the %.1fM word-embedding parameters are not trained", frozen.numel() / 1e6)
        candidates = [speedups.FIRST_TOKEN_LAST_LAYER]
        if self.device.type == "cpu" and not cfg.compile:  # torch.compile makes its own dropout kernels
            candidates.insert(0, speedups.FAST_CPU_DROPOUT)
        # a few examples show whether a speed-up changes the logits as well as a whole batch would, in a quarter
        # of the start-up time
        first = self.collate([self.train_set[i] for i in range(min(len(self.train_set), 8))])
        batch = {k: first[k].to(self.device) for k in inference.MODEL_INPUTS if k in first}
        self.speedups = speedups.enable(self.raw_model, batch, candidates)
        if self.speedups:
            log.info("speed-ups, each checked on the first batch: %s", ", ".join(self.speedups))
        self.export_info = {"max_length": cfg.max_length, "text_column": cfg.text_column,
                            "label_column": cfg.label_column, "text_pair_column": cfg.text_pair_column,
                            "truncation": cfg.truncation, "head_tokens": data.resolve_head_tokens(cfg, self.tokenizer)}
        if self.multi_label:  # how evaluate reads label sets from a file, as training did
            self.export_info.update({"task": cfg.task, "label_sep": cfg.label_sep,
                                     "label_columns": config.label_column_names(cfg) or None})

    def _build_optimizer(self):
        """AdamW over weight-decay groups, linear warmup and decay, the fp16 GradScaler, class weights."""
        cfg = self.cfg
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.optimizer = optim.build_optimizer(self.raw_model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay)
        self.scheduler = optim.build_scheduler(self.optimizer, self.warmup_steps, self.total_steps)
        log.info("learning rates: %s", optim.describe_lrs(self.optimizer.param_groups))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast = precision.autocast(self.precision, self.device)
        # evaluation scores as the evaluate and predict CLIs do (fp32 on a CPU under auto: see precision.resolve)
        self.eval_precision = precision.resolve(cfg.precision, self.device, scoring=True)
        self.eval_autocast = precision.autocast(self.eval_precision, self.device)
        self.class_weights, self.loss_weights = None, None
        if cfg.class_weights == "balanced":
            if self.multi_label:  # BCE's pos_weight: negatives / positives per label
                self.class_weights = multilabel.positive_weights(self.train_set.labels)
            else:
                self.class_weights = data.balanced_class_weights(self.train_set.labels, len(self.labels))
            self.loss_weights = torch.tensor(self.class_weights, dtype=torch.float32, device=self.device)
            log.info("%s (balanced): %s", "positive weights" if self.multi_label else "class weights",
                     ", ".join(f"{n} {w:.4f}" for n, w in zip(self.labels.names, self.class_weights)))
        # multi-label: "tuned", or one threshold for every label
        fixed = config.threshold_value(cfg.threshold) if self.multi_label else None
        self.thresholds = "tuned" if fixed is None else np.full(len(self.labels), fixed)

    def _restore(self, path: str) -> dict | None:
        """Weights (before DDP wraps the model), optimizer, schedule, scaler and state from a checkpoint;
        returns this rank's saved RNG states, which train() sets last (None on another process count)."""
        weights, saved = checkpoint.load(path)
        progress = saved["train_state"] if "train_state" in saved else saved["progress"]
        if saved["world_size"] != self.dist.world_size and progress["batches_done"]:
            # each rank's position is a count of its own batches of an order that depends on the process count
            raise UserError(f"checkpoint {path} was saved by {saved['world_size']} process(es) in the middle of epoch "
                            f"{progress['epoch'] + 1}: resume it on {saved['world_size']} (on {self.dist.world_size} "
                            f"some examples of the epoch would be skipped or seen twice), or from a checkpoint "
                            f"saved at an epoch's end")
        self.state.load_state_dict(progress)
        if self.dist.is_main:
            self._reconcile_best()
        self.raw_model.load_state_dict(weights)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        warn_if_changed(saved["config"], config.to_dict(self.cfg), saved["world_size"], self.dist.world_size)
        log.info("resumed from %s: step %d, epoch %d, batch %d", path, self.state.step, self.state.epoch + 1,
                 self.state.batches_done)
        return saved["rng"][self.dist.rank] if saved["world_size"] == self.dist.world_size else None

    def _reconcile_best(self):
        """best/ as the restored state says: a job killed between exporting best/ and writing the checkpoint
        that records it left a best/ that the resumed run does not know. Export it again from the checkpoint
        of the state's best step (rotation keeps that one), or remove it when there is no best yet."""
        best_dir = os.path.join(self.cfg.output_dir, "best")
        on_disk = inference.saved_settings(best_dir).get("step") if os.path.isdir(best_dir) else None
        if on_disk == self.state.best_step:
            return
        if self.state.best_step is None:
            shutil.rmtree(best_dir)
            log.warning("removed %s (step %s): the checkpoint resumed from has no best evaluation yet", best_dir,
                        on_disk)
            return
        source = checkpoint.path_for(self.cfg.output_dir, self.state.best_step)
        if checkpoint.problem(source) is not None:
            log.warning("%s is from step %s, not the best step %d, whose checkpoint is gone: it will be replaced "
                        "at the next better evaluation", best_dir, on_disk, self.state.best_step)
            return
        self.raw_model.load_state_dict(checkpoint.load(source)[0])
        checkpoint.export(self.raw_model, self.tokenizer, best_dir, self._export_extra(self.state.best))
        log.warning("%s was from step %s, after the checkpoint resumed from: exported again from step %d, the best "
                    "evaluation that checkpoint records", best_dir, on_disk, self.state.best_step)

    def _wrap(self, model):
        if self.dist.world_size > 1:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            model = torch.compile(model, dynamic=True)
        return model

    def _build_reporting(self):
        cfg, dist = self.cfg, self.dist
        # a resumed run goes on in its own TensorBoard run; what the killed process logged after the checkpoint
        # (steps redone now) is purged, so that each curve is drawn once
        self.state.run_name = cfg.run_name or self.state.run_name or \
            f"{os.path.basename(os.path.abspath(cfg.output_dir))}-{time.strftime('%Y%m%d-%H%M%S')}"
        logdir = os.path.join(cfg.output_dir, "runs", self.state.run_name)
        purge = self.state.step + 1 if self.state.step else None
        self.writer = reporting.Writer(logdir if dist.is_main else None, purge_step=purge)
        if dist.is_main:
            reporting.link_run(logdir, os.path.join(cfg.logging_dir, self.state.run_name))
        self.peak = self._measure_peak()
        self.meter = reporting.Meter(reporting.train_flops_per_token(self.raw_model), self.peak, self.state.speed,
                                     reduce=self._sum_over_ranks)
        log.info("model %s: %.1fM parameters; %s on %s x %d; %d steps (%d per epoch), warmup %d; peak %.0f GFLOP/s",
                 self.raw_model.name_or_path, sum(p.numel() for p in self.raw_model.parameters()) / 1e6,
                 self.precision, self.device.type, dist.world_size, self.total_steps,
                 steps_per_epoch(self.batches_per_epoch, cfg.grad_accum), self.warmup_steps, self.peak / 1e9)

    # ------------------------------------------------------------ the loop

    def train(self):
        """Micro-steps, one optimizer step per accumulation group, then what after_step() says: log,
        evaluate, save. A stop signal saves a checkpoint and raises Preempted."""
        cfg, state = self.cfg, self.state
        if self.saved_rng is not None:  # restored last, once nothing else will draw from them
            rng.set_state(self.saved_rng)
        stop = StopRequest()
        self.model.train()
        self._start_interval()
        bar = reporting.progress(self.total_steps, state.step, self.dist.is_main)
        t_start = time.perf_counter() - state.loop_seconds
        try:
            for epoch in range(state.epoch, cfg.epochs):
                if state.finished(self.total_steps):
                    break
                first_batch = state.batches_done if epoch == state.epoch else 0
                self.sampler.set_epoch(epoch)
                self.sampler.skip(first_batch * cfg.batch_size)
                for batch_idx, batch in enumerate(self.train_loader, start=first_batch):
                    # the last accumulation group of an epoch may be short: scale by its real size
                    group_start = batch_idx - batch_idx % cfg.grad_accum
                    group_size = min(cfg.grad_accum, self.batches_per_epoch - group_start)
                    is_update = batch_idx + 1 == group_start + group_size
                    self._micro_step(batch, group_size, sync=is_update)
                    if not is_update:
                        continue
                    self._optimizer_step()
                    state.step, state.batches_done = state.step + 1, batch_idx + 1
                    bar.update(1)
                    stopping = distributed.any_rank(stop.signum is not None)
                    todo = after_step(state.step, state.batches_done, self.batches_per_epoch, self.total_steps,
                                      cfg.log_steps, cfg.eval_steps, cfg.save_steps, stopping)
                    if todo.log:
                        self._log(bar)
                    elif todo.save:
                        self._check_finite(self._sum_over_ranks(np.array([self.loss_sum.item()]))[0])
                    if todo.epoch_done:
                        state.epoch, state.batches_done = epoch + 1, 0
                    state.loop_seconds = time.perf_counter() - t_start
                    if todo.save:
                        with self.meter.paused():  # evaluation and checkpoints are not training time
                            state.speed = dict(self.meter.totals)
                            if todo.evaluate:
                                self._evaluate(epoch)
                            self._save_checkpoint()
                    if stopping:
                        raise Preempted(stop.signum, state.step)
                    if state.finished(self.total_steps):
                        break
        finally:
            bar.close()

    def _micro_step(self, batch: dict, group_size: int, sync: bool):
        """Forward, loss and backward of one batch; under DDP the gradients are all-reduced only when `sync`
        (the last micro-step of an accumulation group)."""
        self.meter.add(batch)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "index"}
        targets = batch.pop("labels")
        no_sync = self.model.no_sync() if not sync and self.dist.world_size > 1 else nullcontext()
        with no_sync:
            with self.autocast():
                logits = self.model(**batch).logits
            # our own loss, not the model's: it takes the class weights (multi-label: per-label positive weights)
            if self.multi_label:
                loss = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.loss_weights)
            else:
                loss = F.cross_entropy(logits.float(), targets, weight=self.loss_weights)
            loss = loss / group_size
            self.scaler.scale(loss).backward()
        self.loss_sum += loss.detach()

    def _optimizer_step(self):
        """Unscale, clip, step, update the loss scale, advance the schedule, clear the gradients."""
        if self.cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            norm = optim.clip_grad_norm(self.raw_model.parameters(), self.cfg.max_grad_norm)
            # an inf or nan norm is a step the fp16 GradScaler skips: counted, not averaged into the curve
            finite = torch.isfinite(norm).to(self.norms.device)
            self.norm_sum += torch.where(finite, norm.to(self.norm_sum.device), 0.0)
            self.norms += finite
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1

    def _log(self, bar):
        """The interval's loss and gradient norm (mean over updates and ranks), learning rate and speed."""
        totals = self._sum_over_ranks(np.array([self.loss_sum.item(), self.norm_sum.item(), self.norms.item(),
                                                self.updates, *self.meter.counts()]))
        self._check_finite(totals[0])
        loss, norm_sum, norms, updates = totals[:4]
        speed = self.meter.lap(totals[4:])
        logged = {"loss": loss / max(updates, 1), "lr": self.scheduler.get_last_lr()[0], **speed}
        if self.cfg.max_grad_norm:  # the norm before clipping, over the steps whose norm was finite
            logged["grad_norm"] = norm_sum / max(norms, 1)
            if self.precision == "fp16":  # every rank counts every step: the sums are world_size x the count
                skipped = int(round((updates - norms) / self.dist.world_size))
                logged["skipped_steps"] = skipped
                self.state.skipped_steps += skipped
        self.writer.scalars(logged, self.state.step, "train/")
        bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}",
                        samples_s=f"{speed['samples_per_s']:.1f}", pad=f"{speed['padding_fraction']:.1%}",
                        mfu=f"{speed['mfu']:.2f}")
        self._start_interval()

    def _start_interval(self):
        """Sums over the steps since the last log, kept on the device: reading them would wait for it."""
        self.loss_sum, self.norm_sum, self.norms = (torch.zeros((), device=self.device) for _ in range(3))
        self.updates, self.logged_step = 0, self.state.step

    def _check_finite(self, loss_sum: float):
        """A nan or infinite loss in fp32 or bf16 ends the run before anything is evaluated or saved from it, so
        the last checkpoint stays the last good one. (In fp16 the GradScaler skips such steps itself.)"""
        if self.precision == "fp16" or math.isfinite(loss_sum):
            return
        kept = checkpoint.list_checkpoints(self.cfg.output_dir)
        raise UserError(f"the training loss became {loss_sum} between steps {self.logged_step + 1} and "
                        f"{self.state.step} (--lr {self.cfg.lr:g}, --precision {self.precision}): training diverged; "
                        f"{f'the last checkpoint, {os.path.basename(kept[-1])}, is kept' if kept else 'nothing saved'}"
                        f"; try a lower --lr")

    def _evaluate(self, epoch: int):
        """Score the held-out set; log it; export best/ when it improved; decide on early stopping."""
        cfg, state = self.cfg, self.state
        result = evaluate(self.raw_model, self.held_out, len(self.labels), self.device, self.eval_autocast,
                          thresholds=self.thresholds, tuned_too=True)
        m = result.metrics
        record = {"epoch": epoch + 1, "step": state.step, **m}
        if self.multi_label:  # plain floats: checkpoints load with weights_only=True
            record["thresholds"] = {n: float(t) for n, t in zip(self.labels.names, result.thresholds)}
            record["per_label"] = {n: {k: float(result.per_label[k][i]) for k in ("precision", "recall", "f1")}
                                   | {"support": int(result.per_label["support"][i])}
                                   for i, n in enumerate(self.labels.names)}
        state.evaluations.append(record)
        log.info("eval epoch %d step %d: %s", epoch + 1, state.step, " ".join(f"{k} {v:.4f}" for k, v in m.items()))
        self.writer.scalars(m, state.step, "eval/")
        # pictures on rank 0; each rank holds only its shard's predictions
        shares = distributed.gather((result.indices, result.labels, result.probs))
        if self.multi_label:
            visuals.log_multi_label_evaluation(self.writer, state.step, result, self.labels.names, shares)
        else:
            visuals.log_evaluation(self.writer, state.step, result.confusion, self.labels.names, shares,
                                   self.eval_set.texts)
        improved = metrics.better(cfg.metric_for_best, m[cfg.metric_for_best],
                                  state.best and state.best[cfg.metric_for_best])
        waited = 0 if improved else state.evals_without_improvement + 1
        # rank 0 decides and every rank follows it, so that all ranks stop at the same step
        improved, waited = distributed.broadcast((improved, waited))
        state.evals_without_improvement = waited
        if improved:
            state.best, state.best_step = record, state.step
            if self.dist.is_main:
                checkpoint.export(self.raw_model, self.tokenizer, os.path.join(cfg.output_dir, "best"),
                                  self._export_extra(record))
        elif cfg.early_stopping_patience and waited >= cfg.early_stopping_patience:
            state.stopped = {
                "step": state.step, "reason": "early_stopping",
                "message": f"early stopping: {cfg.metric_for_best} has not improved for {waited} evaluations "
                           f"(--early-stopping-patience {cfg.early_stopping_patience}); best "
                           f"{state.best[cfg.metric_for_best]:.4f} at step {state.best_step}"}
            log.info("%s", state.stopped["message"])
        distributed.barrier()

    def _save_checkpoint(self):
        """Rank 0 writes the weights and the whole training state, with every rank's RNG states."""
        cfg, state = self.cfg, self.state
        rngs = distributed.gather(rng.get_state())
        if self.dist.is_main:
            if self.checkpoint_bytes and not self.warned_room:
                self.warned_room = checkpoint.warn_if_no_room(cfg.output_dir, self.checkpoint_bytes)
            try:
                path = checkpoint.save(cfg.output_dir, state.step, self.raw_model.state_dict(), {
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "train_state": state.state_dict(), "rng": rngs,
                    "config": config.to_dict(cfg), "world_size": self.dist.world_size})
            except WriteError as e:
                kept = checkpoint.list_checkpoints(cfg.output_dir)
                raise WriteError(f"{e}; {os.path.basename(kept[-1]) if kept else 'no checkpoint'} is "
                                            f"kept: continue with --resume auto once it can be written") from None
            self.checkpoint_bytes = checkpoint.size_of(path)
            best = checkpoint.path_for(cfg.output_dir, state.best_step) if state.best_step is not None else None
            checkpoint.rotate(cfg.output_dir, cfg.save_total_limit, protect=[best])
            log.info("saved checkpoint %s", path)
        distributed.barrier()

    def _export_extra(self, record: dict | None, step: int | None = None) -> dict:
        """bert_finetune.json of an exported folder: the settings, the step, and (multi-label) the thresholds
        of the evaluation `record`, which predict and evaluate apply."""
        extra = {**self.export_info, "step": step if step is not None else record["step"]}
        if self.multi_label:
            extra["thresholds"] = (record or {}).get("thresholds")
        return extra

    def _sum_over_ranks(self, values: np.ndarray) -> np.ndarray:
        return distributed.all_reduce_sum(values, self.device)

    def _measure_peak(self) -> float:
        """The job's matmul peak: each rank's, summed."""
        return float(self._sum_over_ranks(np.array([reporting.matmul_peak_flops(self.device, self.precision)]))[0])

    # ------------------------------------------------------------ the end

    def finish(self):
        """Why the run stopped, its speed, last/ (the weights the final evaluation measured) and results.json."""
        cfg, state = self.cfg, self.state
        if state.stopped is None:
            capped = self.total_steps < self.planned_steps
            state.stopped = {"step": state.step, "reason": "max_steps" if capped else "epochs",
                             "message": f"--max-steps {cfg.max_steps} reached" if capped
                             else f"all {cfg.epochs} epochs done"}
        # a shared machine's peak drifts and a busy moment lowers a probe: the best of those before and after
        self.meter.peak = max(self.peak, self._measure_peak())
        speed = self.meter.overall()
        peaks = distributed.gather(reporting.peak_rss_mb())
        if self.dist.is_main:
            checkpoint.export(self.raw_model, self.tokenizer, os.path.join(cfg.output_dir, "last"),
                              self._export_extra(state.final, state.step))
            checkpoint.write_json(os.path.join(cfg.output_dir, "results.json"), self._results(speed, peaks))
            final_metrics = {k: v for k, v in (state.final or {}).items()
                             if k not in ("epoch", "step") and isinstance(v, (int, float))}
            if state.best:
                final_metrics[f"best_{cfg.metric_for_best}"] = state.best[cfg.metric_for_best]
            self.writer.hparams({**config.to_dict(cfg), "world_size": self.dist.world_size,
                                 "precision_used": self.precision, "num_labels": len(self.labels)},
                                final_metrics, state.step)
            best = f"{state.best[cfg.metric_for_best]:.4f}" if state.best else "none (no finite evaluation)"
            log.info("done: best %s %s at step %s; outputs in %s", cfg.metric_for_best, best, state.best_step,
                     cfg.output_dir)
        distributed.barrier()

    def _results(self, speed: dict, peaks: list) -> dict:
        state = self.state
        weights = self.class_weights
        return {
            "best": state.best, "final": state.final, "evaluations": state.evaluations,
            "best_step": state.best_step, "steps": state.step, "world_size": self.dist.world_size,
            "precision": self.precision, "eval_precision": self.eval_precision, "labels": self.labels.names,
            "stopped": state.stopped,
            "class_weights": dict(zip(self.labels.names, weights.tolist())) if weights is not None and not
            self.multi_label else None,
            **({"task": "multi_label", "pos_weights": dict(zip(self.labels.names, weights.tolist()))
                if weights is not None else None} if self.multi_label else {}),
            "speedups": self.speedups,
            "skipped_steps": state.skipped_steps,  # fp16: steps the GradScaler skipped
            "train_seconds": self.meter.totals["seconds"],  # the training steps alone
            "loop_seconds": state.loop_seconds,  # with evaluations and checkpoints
            "train_samples_per_s": speed["samples_per_s"],
            "train_tokens_per_s": speed["tokens_per_s"],
            "padding_fraction": speed["padding_fraction"],
            "mfu": speed["mfu"], "peak_flops": self.meter.peak,
            # per rank: the data set-up (texts tokenized here, 0 = read from the token cache) and peak memory
            "setup": self.setup_reports, "peak_rss_mb": peaks,
            "config": config.to_dict(self.cfg),
        }


def warn_if_changed(saved: dict, current: dict, saved_world: int, world: int):
    changed = [k for k in config.trajectory_keys() if saved.get(k) != current.get(k)]
    if changed:
        log.warning("resuming with settings that differ from the checkpoint's: %s: not the same run as before",
                    ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed))
    if saved_world != world:
        log.warning("resuming on %d processes a run saved on %d at an epoch's end: every example of the next "
                    "epochs is seen once, but data order and RNG streams differ from an unbroken run",
                    world, saved_world)


if __name__ == "__main__":
    main()
