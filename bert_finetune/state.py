"""Where a run stands (TrainState, saved in every checkpoint) and what happens after each optimizer step
(after_step: log, evaluate, save), decided from numbers alone so that tests can check it without a model."""
from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based); equals the epoch count once all are done
    batches_done: int = 0  # batches of that epoch already trained on, per rank
    best: dict | None = None  # the best evaluation's record (step, epoch and metrics)
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped: dict | None = None  # {step, reason, message} once the run has ended
    evaluations: list = field(default_factory=list)  # every evaluation's record, in order
    loop_seconds: float = 0.0  # wall clock of the loop, evaluations and checkpoints included
    speed: dict | None = None  # the throughput meter's totals (reporting.Meter)
    skipped_steps: int = 0  # fp16: optimizer steps the GradScaler skipped (inf/nan gradients)
    run_name: str = ""  # the TensorBoard run this training writes to, kept across resumes

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, saved: dict):
        """A checkpoint's state; those written before `evaluations` was named so keep it under `epochs`."""
        saved = dict(saved)
        if "evaluations" not in saved and "epochs" in saved:
            saved["evaluations"] = saved.pop("epochs")
        names = {f.name for f in fields(self)}
        for key, value in saved.items():
            if key in names:
                setattr(self, key, value)

    def finished(self, total_steps: int) -> bool:
        return self.step >= total_steps or self.stopped is not None

    @property
    def final(self) -> dict | None:
        """The last evaluation: the run always evaluates at its last step, so once finished this measures last/."""
        return self.evaluations[-1] if self.evaluations else None


@dataclass(frozen=True)
class Actions:
    log: bool  # write the interval's loss, learning rate and speed
    evaluate: bool  # score the held-out set (best/ may change)
    save: bool  # write a checkpoint
    epoch_done: bool


def after_step(step: int, batches_done: int, batches_per_epoch: int, total_steps: int, log_steps: int,
               eval_steps: int = 0, save_steps: int = 0, stop_requested: bool = False) -> Actions:
    """What follows optimizer step `step` (1-based), which ended after `batches_done` batches of the epoch.

    Every epoch's end and the run's last step evaluate; so does every eval_steps-th step. Every evaluation
    is followed by a checkpoint, as are every save_steps-th step and a requested stop (preemption).
    """
    last = step >= total_steps
    epoch_done = batches_done == batches_per_epoch
    evaluate = last or epoch_done or bool(eval_steps and step % eval_steps == 0)
    save = evaluate or stop_requested or bool(save_steps and step % save_steps == 0)
    return Actions(log=step % log_steps == 0 or last, evaluate=evaluate, save=save, epoch_done=epoch_done)
