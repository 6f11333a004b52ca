"""Logs people can read: log lines never land inside a progress bar, and without a terminal the bar is a
plain line every N seconds."""
import io
import logging

from bert_finetune import reporting
from conftest import python_m, train_args


def test_a_log_line_lifts_the_bar_instead_of_landing_in_it():
    from tqdm import tqdm
    buf = io.StringIO()
    reporting.setup_logging()
    log = logging.getLogger("bert_finetune")
    log.handlers[0].setStream(buf)
    with tqdm(total=10, file=buf, mininterval=0, miniters=1, ncols=80) as bar:
        bar.update(5)
        log.info("eval epoch 1: accuracy 0.9")
        bar.update(5)
    # what a terminal shows of each line is what follows its last carriage return
    shown = [line.split("\r")[-1] for line in buf.getvalue().split("\n")]
    assert any(line.endswith("eval epoch 1: accuracy 0.9") and "%|" not in line for line in shown), shown
    assert "10/10" in buf.getvalue()  # the bar was drawn again below the line


def test_without_a_terminal_progress_is_a_line_every_few_seconds(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(reporting.time, "monotonic", lambda: now[0])
    bar = reporting.progress(total=20, initial=0, enabled=True, every=10)
    assert isinstance(bar, reporting.ProgressLines)  # pytest's captured stderr is no terminal
    with caplog.at_level(logging.INFO, "bert_finetune"):
        for _ in range(20):
            now[0] += 4  # a step every 4 s
            bar.update(1)
            bar.set_postfix(loss="0.5")
        bar.close()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20 * 4 // 12 + 1, lines  # one per 10 s (3 updates), and one at the end
    assert lines[-1].startswith("step 20/20 (100%), 0.25 step/s, 00:00:00 left, loss=0.5")


def test_a_training_log_in_a_file_has_no_carriage_returns(tiny_model, make_csv, tmp_path):
    p = python_m("bert_finetune.train", ["--single-gpu", *train_args(tiny_model, make_csv(n=64), tmp_path / "o",
                                                                      "--epochs", 1)])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\r" not in p.stdout + p.stderr
    assert "step 7/7 (100%)" in p.stdout and "loss=" in p.stdout, p.stdout
