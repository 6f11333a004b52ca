"""Faults that long jobs meet and the GPU path's logic, checked on CPU: the precision choice from a GPU's
compute capability, the peak by exact device name, padding within the position limit, the token cache's
key, divergence, and a resume on another process count."""
import os

import numpy as np
import pytest
import torch

from bert_finetune import data, metrics, precision, reading, reporting
from conftest import python_m, run_train, torchrun, train_args


@pytest.mark.parametrize("capability,expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                 ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it(capability, expected):
    # V100 (7.0) and T4 (7.5) emulate bf16: torch.cuda.is_bf16_supported() says yes there
    assert precision.resolve("auto", torch.device("cuda"), capability) == expected
    assert precision.resolve("auto", torch.device("cpu"), cpu_flags={"avx2", "avx512f"}) == "fp32"
    assert precision.resolve("fp32", torch.device("cuda"), capability) == "fp32"


@pytest.mark.parametrize("name,bf16", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
                                       ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12),
                                       ("NVIDIA A10", 125e12)])
def test_gpu_peak_by_the_exact_name(name, bf16):
    assert reporting.gpu_peaks(name)["bf16"] == bf16


def test_unknown_gpus_and_half_precision_elsewhere_are_probed_in_that_precision(monkeypatch):
    assert reporting.gpu_peaks("NVIDIA RTX PRO 6000 Blackwell") is None
    assert "bf16" not in reporting.gpu_peaks("Tesla V100-SXM2-16GB")  # probed in bf16, not read as fp32's
    seen = []
    monkeypatch.setattr(reporting, "probe_matmul", lambda device, dtype=torch.float32: seen.append(dtype) or 1.0)
    for p in ("fp32", "bf16", "fp16"):
        reporting.matmul_peak_flops(torch.device("cpu"), p)
    assert seen == [torch.float32, torch.bfloat16, torch.float16]


def test_the_probe_measures_the_dtype_it_is_given():
    assert reporting.probe_matmul(torch.device("cpu"), torch.bfloat16, n=64, repeats=1) > 0


@pytest.mark.parametrize("length,limit,width", [(13, None, 16), (13, 14, 14), (510, 512, 512), (511, 512, 512),
                                                (507, 510, 510), (16, 14, 16)])
def test_padding_to_a_multiple_of_8_stops_at_the_position_limit(length, limit, width):
    collate = data.Collator(0, multiple=8, limit=limit)
    batch = collate([{"input_ids": np.ones(length, dtype=np.int32), "labels": 0, "index": 0},
                     {"input_ids": np.ones(3, dtype=np.int32), "labels": 1, "index": 1}])
    assert batch["input_ids"].shape == (2, width)


def test_head_truncation_keeps_the_head_whatever_the_tokenizer_side(tiny_model, tmp_path):
    from bert_finetune import modeling
    tok = modeling.load_tokenizer(tiny_model)
    text = ["good " + "dog " * 40 + "bad"]
    right = data.tokenize(tok, text, 16)[0]
    tok.truncation_side = "left"  # as some tokenizers ship
    assert data.tokenize(tok, text, 16)[0].tolist() == right.tolist()
    assert tok.convert_ids_to_tokens(right.tolist())[:2] == ["[CLS]", "good"]


def test_the_cache_key_changes_with_the_truncation_side_and_the_code_version(tiny_model, monkeypatch):
    from bert_finetune import modeling
    tok = modeling.load_tokenizer(tiny_model)
    key = data.tokenizer_fingerprint(tok)
    assert data.tokenizer_fingerprint(modeling.load_tokenizer(tiny_model)) == key  # stable across loads
    tok.truncation_side = "left"
    assert data.tokenizer_fingerprint(tok) != key
    tok.truncation_side = "right"
    monkeypatch.setattr(data, "TOKENIZATION_VERSION", data.TOKENIZATION_VERSION + 1)
    assert data.tokenizer_fingerprint(tok) != key


def test_a_nan_metric_never_becomes_the_best():
    assert not metrics.better("accuracy", float("nan"), None)
    assert not metrics.better("loss", float("nan"), 0.5)
    assert metrics.better("loss", 0.4, 0.5) and metrics.better("accuracy", 0.6, None)


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_model, make_csv, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_model, make_csv(n=200), out, "--epochs", 1, "--save-steps", 1, "--lr", "1e30",
                      "--cache-dir", tmp_path / "cache")
    p = python_m("bert_finetune.train", ["--single-gpu", *args])
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the training loss became") and "training diverged" in line, line
    kept = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-step"))
    assert kept and f"the last checkpoint, {kept[-1]}, is kept" in line
    from bert_finetune import checkpoint
    weights, _ = checkpoint.load(str(out / kept[-1]))
    assert all(torch.isfinite(w).all() for w in weights.values())  # nothing saved from the diverged steps


def test_resuming_mid_epoch_on_another_process_count_is_refused_in_one_line(tiny_model, make_csv, tmp_path):
    out = tmp_path / "out"
    common = ["--epochs", 1, "--seed", 5, "--cache-dir", tmp_path / "cache"]
    csv = make_csv(n=200)
    first = run_train(train_args(tiny_model, csv, out, *common, "--max-steps", 3))  # ends mid-epoch
    assert first["steps"] == 3
    p = torchrun(2, train_args(tiny_model, csv, out, *common, "--resume", "auto"))
    # each worker says it in one line and exits 2 (torchrun then adds its own report of the failed workers)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and errors, p.stderr[-3000:]
    assert "was saved by 1 process(es) in the middle of epoch 1: resume it on 1" in errors[0]
    assert "exitcode: 2" in p.stderr


def test_a_failed_checkpoint_write_is_one_line_and_the_run_resumes_bitwise(tiny_model, make_csv, tmp_path,
                                                                           monkeypatch, capsys):
    """The disk fills up during the second checkpoint: torch's zip writer fails as it does (a RuntimeError
    from PytorchStreamWriter). One line, nothing half-written, and --resume auto ends as an unbroken run."""
    from bert_finetune import checkpoint
    from test_resume import assert_bitwise_equal
    csv = make_csv(n=200)
    args = lambda out, *extra: train_args(tiny_model, csv, out, "--epochs", 2, "--save-steps", 4, "--seed", 4,  # noqa
                                          "--cache-dir", tmp_path / "cache", *extra)
    run_train(args(tmp_path / "straight"))
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "full"
    with pytest.raises(SystemExit) as stopped:
        run_train(args(out))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot write {out / 'checkpoint-step000008'}: ") and \
        "file write failed; checkpoint-step000004 is kept" in err[-1], err[-1]
    assert sorted(os.listdir(out)) == ["checkpoint-step000004", "runs"]  # no half-written folder
    monkeypatch.undo()
    run_train(args(out, "--resume", "auto"))
    assert_bitwise_equal(tmp_path / "straight", out)


def test_leftovers_of_a_kill_during_a_save_are_swept_and_best_put_back(tmp_path):
    from bert_finetune import checkpoint
    out = tmp_path / "out"
    for name in ("checkpoint-step000004", "checkpoint-step000008.tmp-4242", "best.old-4242", "last.tmp-17"):
        os.makedirs(out / name)
        (out / name / "model.safetensors").write_bytes(b"x" * 10)
    (out / "results.json.tmp-99").write_text("{")
    checkpoint.sweep(str(out))
    assert sorted(os.listdir(out)) == ["best", "checkpoint-step000004"]  # best/ was cut between its two renames
    (out / "best.old-5").mkdir()
    checkpoint.sweep(str(out))  # best/ exists: the old copy is only a leftover
    assert sorted(os.listdir(out)) == ["best", "checkpoint-step000004"]


def test_a_warning_before_a_checkpoint_that_will_not_fit(tmp_path, caplog):
    from bert_finetune import checkpoint
    with caplog.at_level("WARNING", logger="bert_finetune"):
        assert not checkpoint.warn_if_no_room(str(tmp_path), 1)
        assert checkpoint.warn_if_no_room(str(tmp_path), 10 ** 18)
    assert "the next one will not fit" in caplog.text


def test_label_cells_that_mean_no_label_are_reported_and_1_equals_1_0(tmp_path, caplog):
    rows = [("1", "a good film"), ("0", "a bad film"), ("NA", "no label here"), ("1.0", "great"),
            ("null", "nor here"), ("", "nor here"), ("0.0", "dull"), (" None ", "nor here")]
    path = tmp_path / "labels.csv"
    path.write_text("label,review\n" + "".join(f"{y},{t}\n" for y, t in rows))
    with caplog.at_level("WARNING", logger="bert_finetune"):
        table = reading.read_table(str(path), "review", "label")
    assert sorted(set(table["label"])) == ["0", "1"]  # NA, null, None and empty are not classes
    assert table["row"].tolist() == [2, 3, 5, 8]
    assert "4 row(s) with no label (empty, NA, null, ...) in column 'label', lines 4, 6, 7, 9" in caplog.text
    from bert_finetune.errors import UserError
    with pytest.raises(UserError, match=r"4 row\(s\) with no label .* lines 4, 6, 7, 9 \(--strict\)"):
        reading.read_table(str(path), "review", "label", strict=True)


def test_a_column_named_twice_is_an_error_that_names_it(tmp_path):
    from bert_finetune.errors import UserError
    path = tmp_path / "twice.csv"
    path.write_text("label,review,review\n1,good,other\n0,bad,other\n")
    with pytest.raises(UserError, match=r"twice\.csv: the header names column\(s\) 'review' more than once"):
        reading.read_table(str(path), "review", "label")


def test_fp16_steps_the_scaler_skips_are_counted_not_averaged_into_the_norm(tiny_model, make_csv, tmp_path,
                                                                            monkeypatch):
    """A loss scale far too high: the first steps' fp16 gradients overflow and the GradScaler skips them."""
    from functools import partial
    import json
    from bert_finetune import train
    monkeypatch.setattr(train.torch.amp, "GradScaler", partial(torch.amp.GradScaler, init_scale=2.0 ** 60))
    out = tmp_path / "out"
    r = run_train(train_args(tiny_model, make_csv(n=100), out, "--epochs", 1, "--precision", "fp16"))
    assert r["precision"] == "fp16" and r["skipped_steps"] >= 3  # 2**60 takes several halvings to be usable
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "runs" / os.listdir(out / "runs")[0]))
    acc.Reload()
    assert sum(e.value for e in acc.Scalars("train/skipped_steps")) == r["skipped_steps"]
    assert all(np.isfinite(e.value) for e in acc.Scalars("train/grad_norm"))
    assert json.load(open(out / "best" / "bert_finetune.json"))["step"] == r["best_step"]


def test_best_ahead_of_the_resumed_checkpoint_is_exported_again(tiny_model, make_csv, tmp_path, capsys):
    """Killed after best/ was exported at an evaluation but before the checkpoint that records it: the resumed
    run puts best/ back to what its state says, and ends with best/ and last/ equal to an unbroken run's."""
    import json
    import shutil
    from safetensors.torch import load_file
    from test_resume import assert_bitwise_equal
    csv = make_csv(n=200)
    args = lambda out, *extra: train_args(tiny_model, csv, out, "--epochs", 3, "--seed", 2,  # noqa: E731
                                          "--save-total-limit", 100, "--metric-for-best", "loss", *extra)
    straight = tmp_path / "straight"
    r = run_train(args(straight))
    evaluations = [e["step"] for e in r["evaluations"]]
    # the broken run: its checkpoints up to the first evaluation, and a best/ from a later one
    broken = tmp_path / "broken"
    os.makedirs(broken)
    shutil.copytree(straight / f"checkpoint-step{evaluations[0]:06d}", broken / f"checkpoint-step{evaluations[0]:06d}")
    shutil.copytree(straight / "last", broken / "best")
    assert json.load(open(broken / "best" / "bert_finetune.json"))["step"] == evaluations[-1]
    capsys.readouterr()
    run_train(args(broken, "--resume", "auto"))
    assert f"exported again from step {evaluations[0]}, the best evaluation" in capsys.readouterr().out
    assert_bitwise_equal(straight, broken)
    a, b = load_file(straight / "best" / "model.safetensors"), load_file(broken / "best" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(broken / "best" / "bert_finetune.json"))["step"] == r["best_step"]


def test_a_failed_tensorboard_write_is_one_line(tiny_model, make_csv, tmp_path, monkeypatch, capsys):
    import errno
    from torch.utils.tensorboard import SummaryWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        run_train(train_args(tiny_model, make_csv(n=100), out, "--epochs", 1, "--run-name", "r"))
    assert stopped.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"error: cannot write TensorBoard events in {out / 'runs' / 'r'}: No space left on device"


def test_max_steps_caps_the_schedule_and_a_changed_setting_on_resume_is_named(tiny_model, make_csv, tmp_path,
                                                                              capsys):
    """--max-steps 6 of 2 x 13 planned: warmup is a fifth of 6 (2 steps), the learning rate reaches 0 at step
    6 (not at 26), the run says why it stopped; resuming with another --lr warns and names the change."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "o"
    args = train_args(tiny_model, make_csv(n=130), out, "--epochs", 2, "--max-steps", 6, "--warmup-ratio", 0.2,
                      "--log-steps", 1, "--run-name", "r")
    r = run_train(args)
    assert r["stopped"]["reason"] == "max_steps" and r["stopped"]["step"] == 6
    acc = EventAccumulator(str(out / "runs" / "r"), size_guidance={"scalars": 0})
    acc.Reload()
    lr = [(s.step, s.value) for s in acc.Scalars("train/lr")]  # logged after each step's scheduler update
    peak = 2e-3
    assert [step for step, _ in lr] == [1, 2, 3, 4, 5, 6]
    assert 0 < lr[0][1] < peak  # warming up
    assert [v for _, v in lr[1:]] == pytest.approx([peak, peak * 3 / 4, peak * 2 / 4, peak / 4, 0.0]), lr
    assert "warmup 2" in capsys.readouterr().out
    run_train([*args, "--max-steps", "8", "--lr", "1e-3", "--resume", "auto"])
    logged = capsys.readouterr().out
    assert "resuming with settings that differ from the checkpoint's: " in logged
    assert "lr 0.002 -> 0.001" in logged and "max_steps 6 -> 8" in logged
