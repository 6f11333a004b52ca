"""Kill, preempt, corrupt: a resumed run ends bitwise equal to an unbroken one."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, env, python_m, train_args

STEPS = 120


def args_for(model, csv, out, *extra):
    # dropout stays on (the tiny model's default 0.1): RNG state must be restored for equality
    return train_args(model, csv, out, "--epochs", 3, "--max-steps", STEPS, "--save-steps", 3, "--seed", 11,
                      "--eval-split", 0.25, *extra)


def weights(out):
    return load_file(os.path.join(out, "last", "model.safetensors"))


def assert_bitwise_equal(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = {k: (wa[k] - wb[k]).abs().max().item() for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diff, f"{len(diff)} tensors differ, max {max(diff.values()):.3g}"


def checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-step") and ".tmp" not in n) \
        if os.path.isdir(out) else []


def descendants(pid: int) -> list:
    """pid's children, grandchildren...: torchrun's workers live in sessions of their own."""
    out = []
    for child in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split():
        out += [int(child)] + descendants(int(child))
    return out


def kill_job(proc):
    """SIGKILL the whole job at once, as when a machine is lost."""
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def start(cmd, **environ):
    return subprocess.Popen(cmd, env=env(**environ), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_checkpoints(proc, out, n, timeout=120):
    t0 = time.time()
    while len(checkpoints(out)) < n:
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()[-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def train_cmd(args, nproc=1):
    if nproc == 1:
        return [sys.executable, "-m", "bert_finetune.train", "--single-gpu", *map(str, args)]
    return ["bash", os.path.join(ROOT, "launch.sh"), str(nproc), *map(str, args)]


_UNBROKEN = {}  # (process count, flags, training data) -> the unbroken run's output folder, shared by the tests


def unbroken(tmp_path, model, csv, nproc=1, *extra):
    """The reference run the interrupted ones must equal, trained once per settings and data in the session."""
    flags = tuple(map(str, extra))
    flags = () if flags == ("--precision", "fp32") else flags  # fp32 is the tests' default (train_args)
    with open(csv, "rb") as f:
        key = (nproc, flags, model, f.read())
    if key in _UNBROKEN:
        return _UNBROKEN[key]
    out = tmp_path / "straight"
    p = subprocess.run(train_cmd(args_for(model, csv, out, *extra), nproc), env=env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert json.load(open(out / "results.json"))["precision"] == (extra[1] if extra else "fp32")
    _UNBROKEN[key] = out
    return out


@pytest.mark.parametrize("nproc, precision", [(1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_sigkill_then_resume_is_bitwise_equal(tiny_model, make_csv, tmp_path, nproc, precision):
    """Also in bf16 autocast (on a CPU without bf16 units: slow, and exact all the same)."""
    csv = make_csv(n=400)
    flags = ["--precision", precision]
    straight = unbroken(tmp_path, tiny_model, csv, nproc, *flags)
    out = tmp_path / "broken"
    proc = start(train_cmd(args_for(tiny_model, csv, out, *flags), nproc))
    wait_for_checkpoints(proc, out, 2)
    kill_job(proc)
    assert not os.path.exists(out / "last"), "killed too late"
    killed_at = checkpoints(out)[-1]
    p = subprocess.run(train_cmd(args_for(tiny_model, csv, out, *flags, "--resume", "auto"), nproc), env=env(),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"resumed from {out / killed_at}" in p.stdout, (killed_at, p.stdout[:3000])
    assert_bitwise_equal(straight, out)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_says_so_and_resumes_bitwise(tiny_model, make_csv, tmp_path, nproc):
    """SIGTERM (to the one process, or to one worker of two: the other learns it in the step's all-reduce)
    saves a checkpoint at the step it names, and the resume continues from exactly that one."""
    csv = make_csv(n=400)
    straight = unbroken(tmp_path, tiny_model, csv, nproc)
    out = tmp_path / "term"
    proc = start(train_cmd(args_for(tiny_model, csv, out), nproc))
    wait_for_checkpoints(proc, out, 1)
    if nproc == 1:
        proc.send_signal(signal.SIGTERM)
    else:
        workers = [p for p in descendants(proc.pid) if "torchrun" not in open(f"/proc/{p}/cmdline").read()
                   and "bert_finetune.train" in open(f"/proc/{p}/cmdline").read()]
        os.kill(workers[-1], signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode not in (0, None)
    stopped = re.search(r"stopped by (SIGTERM|a stop signal on another rank) at step (\d+): checkpoint saved; "
                        r"continue with --resume auto", log)
    assert stopped and "Traceback" not in log.split("torch.distributed.elastic")[0], log[-3000:]
    if nproc == 2:
        assert "stopped by SIGTERM" in log and "stopped by a stop signal on another rank" in log  # both ranks
    saved = out / f"checkpoint-step{int(stopped.group(2)):06d}"
    assert checkpoints(out)[-1] == saved.name and not os.path.exists(out / "last")
    p = subprocess.run(train_cmd(args_for(tiny_model, csv, out, "--resume", "auto"), nproc), env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"resumed from {saved}: step {int(stopped.group(2))}," in p.stdout
    assert_bitwise_equal(straight, out)


def test_damaged_newest_checkpoint_falls_back(tiny_model, make_csv, tmp_path):
    csv = make_csv(n=400)
    straight = unbroken(tmp_path, tiny_model, csv)
    out = tmp_path / "broken"
    proc = start(train_cmd(args_for(tiny_model, csv, out)))
    wait_for_checkpoints(proc, out, 2)
    kill_job(proc)
    newest = out / checkpoints(out)[-1]
    victim = newest / "model.safetensors"
    os.truncate(victim, os.path.getsize(victim) // 2)
    p = python_m("bert_finetune.train", ["--single-gpu", *args_for(tiny_model, csv, out, "--resume", "auto")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"checkpoint {newest} is damaged: model.safetensors is truncated" in p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert_bitwise_equal(straight, out)


def test_resume_auto_without_checkpoints_starts_fresh_and_refuses_to_start_over(tiny_model, make_csv, tmp_path):
    csv = make_csv(n=100)
    out = tmp_path / "fresh"
    p = python_m("bert_finetune.train", ["--single-gpu", *train_args(tiny_model, csv, out, "--epochs", 1,
                                                                     "--resume", "auto")])
    assert p.returncode == 0 and "starting fresh" in p.stdout
    # rerunning over an earlier run's checkpoints without --resume is refused, nothing touched
    before = {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs}
    p = python_m("bert_finetune.train", ["--single-gpu", *train_args(tiny_model, csv, out, "--epochs", 1)])
    assert p.returncode == 2 and "--resume auto" in p.stderr
    assert before == {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs}


def test_resume_from_a_named_checkpoint_is_bitwise_and_says_so(tiny_model, make_csv, tmp_path):
    """Killed after several checkpoints, resumed from an older one named by path (not the newest): the
    log names it and the run ends bitwise equal to an unbroken one."""
    csv = make_csv(n=400)
    straight = unbroken(tmp_path, tiny_model, csv)
    out = tmp_path / "broken"
    proc = start(train_cmd(args_for(tiny_model, csv, out, "--save-total-limit", 100)))
    wait_for_checkpoints(proc, out, 3)
    kill_job(proc)
    named = out / checkpoints(out)[0]
    p = subprocess.run(train_cmd(args_for(tiny_model, csv, out, "--save-total-limit", 100, "--resume", named)),
                       env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"resumed from {named}: step 3," in p.stdout, p.stdout[:3000]
    assert_bitwise_equal(straight, out)


def test_rotation_keeps_newest_and_best(tmp_path):
    from bert_finetune import checkpoint
    for step in (1, 2, 3, 4, 5):
        checkpoint.save(str(tmp_path), step, {"w": torch.zeros(2)}, {"step": step})
    checkpoint.rotate(str(tmp_path), 2, protect=[str(tmp_path / "checkpoint-step000001")])
    assert checkpoints(tmp_path) == ["checkpoint-step000001", "checkpoint-step000005"]
    # a damaged newest one is not counted as the newest valid: the previous valid one survives
    checkpoint.save(str(tmp_path), 6, {"w": torch.zeros(2)}, {"step": 6})
    os.truncate(tmp_path / "checkpoint-step000006" / "training_state.pt", 10)
    checkpoint.rotate(str(tmp_path), 1)
    assert "checkpoint-step000005" in checkpoints(tmp_path)
    assert checkpoint.find_resume("auto", str(tmp_path)).endswith("checkpoint-step000005")


@pytest.mark.parametrize("sig,timeout", [(signal.SIGKILL, 60), (signal.SIGSTOP, 120)])
def test_a_dead_or_frozen_rank_ends_the_job(tiny_model, make_csv, tmp_path, sig, timeout):
    """A rank that dies (SIGKILL): torchrun ends the job. A rank that hangs (SIGSTOP): the other fails in its
    next collective after --dist-timeout seconds and exits, instead of waiting for the 30-minute default
    (torchrun then ends the job once its own 30 s grace for the frozen worker is over)."""
    csv = make_csv(n=400)
    out = tmp_path / "job"
    proc = start(train_cmd(train_args(tiny_model, csv, out, "--epochs", 1000, "--save-steps", 5,
                                      "--dist-timeout", 5), 2))
    wait_for_checkpoints(proc, out, 1)
    workers = [p for p in descendants(proc.pid) if "torchrun" not in open(f"/proc/{p}/cmdline").read()
               and "bert_finetune.train" in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 2
    os.kill(workers[-1], sig)
    t0 = time.time()
    try:
        if sig == signal.SIGKILL:
            proc.wait(timeout=timeout)
            assert proc.returncode != 0
        else:  # the other worker gives up; torchrun then takes its own 30 s to SIGKILL the stopped one
            while _state(workers[0]) not in ("", "Z") and time.time() - t0 < timeout:
                time.sleep(0.2)
            assert _state(workers[0]) in ("", "Z"), "the other worker still waits for the frozen one"
    finally:
        for pid in workers:  # a stopped worker takes only SIGKILL
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            kill_job(proc)
    assert time.time() - t0 < timeout


def _state(pid: int) -> str:
    """A process's state letter (R, S, T stopped, Z exited but not yet reaped), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_a_same_size_corruption_and_a_missing_manifest_are_caught(tmp_path):
    from bert_finetune import checkpoint
    for step in (1, 2, 3):
        checkpoint.save(str(tmp_path), step, {"w": torch.full((64,), float(step))}, {"step": step})
    newest, middle = tmp_path / "checkpoint-step000003", tmp_path / "checkpoint-step000002"
    blob = bytearray((newest / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF  # one bit pattern changed, the size the same
    (newest / "model.safetensors").write_bytes(bytes(blob))
    assert checkpoint.problem(str(newest)) == "model.safetensors is corrupted (checksum mismatch)"
    os.remove(middle / "manifest.json")
    assert "no readable manifest.json" in checkpoint.problem(str(middle))
    assert checkpoint.find_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-step000001")
