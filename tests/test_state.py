"""The loop's policy (what follows each optimizer step) and TrainState's round trip, without a model."""
import pytest

from bert_finetune.state import TrainState, after_step


def plan(total_steps, batches_per_epoch, log_steps=5, eval_steps=0, save_steps=0, stop_at=None):
    """after_step over a whole run of one batch per step: {step: (log, evaluate, save, epoch_done)}."""
    out = {}
    for step in range(1, total_steps + 1):
        done = (step - 1) % batches_per_epoch + 1
        a = after_step(step, done, batches_per_epoch, total_steps, log_steps, eval_steps, save_steps,
                       stop_requested=step == stop_at)
        out[step] = (a.log, a.evaluate, a.save, a.epoch_done)
    return out


def test_every_epoch_end_and_the_last_step_evaluate_and_save():
    p = plan(total_steps=10, batches_per_epoch=4, log_steps=3)
    assert [s for s, (_, ev, _, _) in p.items() if ev] == [4, 8, 10]  # 10 is the last step, mid-epoch (max_steps)
    assert [s for s, (_, _, sv, _) in p.items() if sv] == [4, 8, 10]
    assert [s for s, (_, _, _, ep) in p.items() if ep] == [4, 8]
    assert [s for s, (lg, _, _, _) in p.items() if lg] == [3, 6, 9, 10]  # every log_steps, and the last


def test_eval_steps_and_save_steps_add_their_own():
    p = plan(total_steps=12, batches_per_epoch=6, log_steps=100, eval_steps=4, save_steps=5)
    assert [s for s, (_, ev, _, _) in p.items() if ev] == [4, 6, 8, 12]
    # every evaluation is followed by a checkpoint; save_steps adds 5 and 10 without evaluating
    assert [s for s, (_, _, sv, _) in p.items() if sv] == [4, 5, 6, 8, 10, 12]
    assert not p[5][1] and not p[10][1]


def test_a_stop_request_saves_without_evaluating():
    p = plan(total_steps=10, batches_per_epoch=10, stop_at=3)
    assert p[3] == (False, False, True, False)
    assert [s for s, (_, _, sv, _) in p.items() if sv] == [3, 10]


@pytest.mark.parametrize("step,done", [(7, 7), (3, 1)])
def test_nothing_happens_between(step, done):
    a = after_step(step, done, batches_per_epoch=8, total_steps=100, log_steps=5)
    assert not (a.log or a.evaluate or a.save or a.epoch_done)


def test_train_state_round_trip_and_the_old_name():
    s = TrainState(step=7, epoch=1, batches_done=3, best={"accuracy": 0.9, "step": 4}, best_step=4,
                   evaluations=[{"step": 4, "accuracy": 0.9}])
    again = TrainState()
    again.load_state_dict(s.state_dict())
    assert again == s and again.final == {"step": 4, "accuracy": 0.9}
    # checkpoints written before the rename keep the evaluations under "epochs"
    old = {k: v for k, v in s.state_dict().items() if k != "evaluations"} | {"epochs": s.evaluations}
    older = TrainState()
    older.load_state_dict(old)
    assert older == s
    assert not s.finished(10) and s.finished(7)
    s.stopped = {"reason": "early_stopping"}
    assert s.finished(10)
