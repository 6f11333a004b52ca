"""torchrun beyond one node: two agents on 127.0.0.1 as two nodes; elastic restarts resume by themselves."""
import json
import os
import shutil
import signal
import subprocess
import time

from conftest import ROOT, env, free_port, torchrun, train_args
from test_resume import assert_bitwise_equal, checkpoints, descendants, kill_job


def test_two_nodes_equal_one_node_bitwise(tiny_model, make_csv, tmp_path):
    csv = make_csv(n=200)
    args = lambda out: train_args(tiny_model, csv, out, "--epochs", 2, "--seed", 5)  # noqa: E731
    one = torchrun(2, args(tmp_path / "one"), OMP_NUM_THREADS=1)
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    nodes = [subprocess.Popen(["bash", os.path.join(ROOT, "launch.sh"), "1", *map(str, args(tmp_path / "two"))],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env(OMP_NUM_THREADS=1, PET_NNODES=2, PET_NODE_RANK=rank, PET_RDZV_BACKEND="c10d",
                                      PET_RDZV_ENDPOINT=f"127.0.0.1:{port}", PET_RDZV_ID=f"test{port}"))
             for rank in (0, 1)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert json.load(open(tmp_path / "two" / "results.json"))["world_size"] == 2
    assert_bitwise_equal(tmp_path / "one", tmp_path / "two")


def test_elastic_restart_resumes_and_finishes_bitwise(tiny_model, make_csv, tmp_path):
    """A job started with --resume PATH loses a worker after rotation has deleted PATH: the restart continues
    from the newest checkpoint (not PATH again) and ends bitwise equal to an unbroken run."""
    csv = make_csv(n=400)
    args = lambda out: train_args(tiny_model, csv, out, "--epochs", 2, "--save-steps", 4, "--seed", 8)  # noqa: E731
    straight = torchrun(2, [*args(tmp_path / "straight"), "--save-total-limit", 100])
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "elastic"
    os.makedirs(out)
    shutil.copytree(tmp_path / "straight" / "checkpoint-step000004", out / "checkpoint-step000004")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch.sh"), "2", *map(str, args(out)), "--resume",
                             out / "checkpoint-step000004"], cwd=ROOT, env=env(PET_MAX_RESTARTS=1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while "checkpoint-step000012" not in checkpoints(out):  # by then rotation has deleted step 4
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before a worker could be killed"
        time.sleep(0.02)
    workers = [p for p in descendants(proc.pid) if "bert_finetune.train" in open(f"/proc/{p}/cmdline").read()
               and "torchrun" not in open(f"/proc/{p}/cmdline").read()]
    os.kill(workers[-1], signal.SIGKILL)
    try:
        log = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0, log[-3000:]
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 2 and "checkpoint-step000004" in resumed[0], resumed
    assert "checkpoint-step000004" not in resumed[1] and "checkpoint-step0000" in resumed[1], resumed
    assert_bitwise_equal(tmp_path / "straight", out)
