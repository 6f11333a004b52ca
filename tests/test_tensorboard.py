"""After a real tiny training run, TensorBoard's own reader finds the pictures of every evaluation."""
import io
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from conftest import build_tiny_model, run_train, synthetic_rows, torchrun, train_args, write_csv

LABELS = ("neg", "neu", "pos")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    model = build_tiny_model(str(root / "init"), num_labels=len(LABELS))
    train = write_csv(root / "train.csv", synthetic_rows(150, seed=0, labels=LABELS))
    held = write_csv(root / "eval.csv", synthetic_rows(47, seed=1, labels=LABELS))
    return root, model, train, held


def read_run(out):
    runs = os.listdir(out / "runs")
    assert runs == ["tb"]  # one run folder per training: the HParams summaries live in it too
    acc = EventAccumulator(str(out / "runs" / "tb"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def check_pictures(out, held_size: int):
    r = json.load(open(out / "results.json"))
    eval_steps = [e["step"] for e in r["evaluations"]]
    acc = read_run(out)

    # the confusion matrix as a PNG image at every evaluation
    images = acc.Images("eval/confusion_matrix")
    assert [i.step for i in images] == eval_steps
    from PIL import Image
    with Image.open(io.BytesIO(images[-1].encoded_image_string)) as png:
        assert png.format == "PNG" and png.width == images[-1].width > 100

    # one PR curve per class, over every held-out example (gathered from all ranks)
    assert set(acc.PluginTagToContent("pr_curves")) == {f"eval_pr/{n}" for n in LABELS}
    final = r["final"]
    for name in LABELS:
        events = acc.Tensors(f"eval_pr/{name}")
        assert [e.step for e in events] == eval_steps
        curve = tensor_util.make_ndarray(events[-1].tensor_proto)  # rows: TP, FP, TN, FN, precision, recall
        assert curve.shape[0] == 6
        tp, fp, tn, fn = curve[:4, 0]
        assert tp + fp + tn + fn == held_size and tp + fn == held_size // len(LABELS) + (name != "pos")

    # the misclassified examples as a markdown table; their count agrees with the final accuracy
    assert list(acc.PluginTagToContent("text")) == ["eval/misclassified/text_summary"]
    text = tensor_util.make_ndarray(acc.Tensors("eval/misclassified/text_summary")[-1].tensor_proto).item().decode()
    wrong = round((1 - final["accuracy"]) * held_size)
    if wrong:
        assert text.startswith(f"{wrong} of {held_size} examples misclassified")
        assert "| true | predicted | probability | text |" in text and text.count("\n| ") == min(wrong, 10) + 1
    else:
        assert text == f"No misclassified examples among {held_size}."

    # the training scalars at every log step, the gradient norm before clipping among them
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/mfu"} <= scalars
    assert all(0 < s.value < float("inf") for s in acc.Scalars("train/grad_norm"))

    # the settings and the final metrics in the HParams tab
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"hparams/accuracy", "hparams/macro_f1", "hparams/loss", "hparams/best_accuracy"} <= metric_tags
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(2e-3)
    assert start.hparams["sampler"].string_value == "length"
    assert start.hparams["world_size"].number_value == r["world_size"]
    for tag in metric_tags:  # the values the tab shows are the scalars under the metric tags
        value = acc.Scalars(tag)[-1].value
        key = tag.removeprefix("hparams/")
        want = r["best"]["accuracy"] if key == "best_accuracy" else final[key]
        assert value == pytest.approx(want, rel=1e-6)
    return r


def test_tensorboard_reader_finds_image_pr_curves_text_and_hparams(setup):
    root, model, train, held = setup
    out = root / "single"
    run_train(train_args(model, train, out, "--eval-file", held, "--epochs", 2, "--run-name", "tb"))
    r = check_pictures(out, 47)
    assert len(r["evaluations"]) == 2


def test_under_torchrun_the_pictures_cover_every_rank(setup):
    """Each rank evaluates its shard; rank 0 draws from all of them (47 examples, not ~24)."""
    root, model, train, held = setup
    out = root / "ddp"
    p = torchrun(2, train_args(model, train, out, "--eval-file", held, "--epochs", 1, "--run-name", "tb"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = check_pictures(out, 47)
    assert r["world_size"] == 2


def test_runs_sit_beside_the_job_and_a_resumed_run_goes_on_in_its_own(setup, tmp_path, monkeypatch):
    """`tensorboard --logdir runs` where the jobs started: one run per job, named after its output folder and
    start time; a resumed job writes on in its run, each step once."""
    root, model, train, held = setup
    monkeypatch.chdir(tmp_path)
    common = ["--model", model, "--train-file", train, "--eval-file", held, "--max-length", 32, "--batch-size", 8,
              "--log-steps", 2, "--cache-dir", ""]
    run_train([str(a) for a in (*common, "--output-dir", "first", "--epochs", 1)])
    run_train([str(a) for a in (*common, "--output-dir", "second", "--epochs", 1)])
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert len(runs) == 2 and runs[0].startswith("first-2") and runs[1].startswith("second-2"), runs
    for run in runs:  # the events live in the output folder; runs/ links to them
        assert os.path.islink(tmp_path / "runs" / run)
        assert os.path.samefile(tmp_path / "runs" / run, tmp_path / run.split("-")[0] / "runs" / run)
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "runs"))  # what `tensorboard` runs
    assert sorted(multiplexer.Runs()) == runs
    run_train([str(a) for a in (*common, "--output-dir", "first", "--epochs", 2, "--resume", "auto")])
    assert sorted(os.listdir(tmp_path / "runs")) == runs  # no third run
    acc = EventAccumulator(str(tmp_path / "runs" / runs[0]), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [s.step for s in acc.Scalars("train/loss")]
    r = json.load(open(tmp_path / "first" / "results.json"))
    assert steps == sorted(set(steps)) and steps[-1] == r["evaluations"][-1]["step"] == 38, steps
    assert [e.step for e in acc.Images("eval/confusion_matrix")] == [19, 38]
