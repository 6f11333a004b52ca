import pytest

from bert_finetune import config
from bert_finetune.errors import UserError


def test_defaults_then_yaml_then_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("batch_size: 4\nlr: 1.0e-4\nstrict: true\n")
    cfg, _ = config.parse(["--config", str(y), "--lr", "3e-5"])
    assert cfg.batch_size == 4 and cfg.lr == 3e-5 and cfg.strict is True and cfg.epochs == config.Config.epochs
    cfg, _ = config.parse(["--config", str(y), "--no-strict"])
    assert cfg.strict is False


def test_committed_configs_parse():
    import glob
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = glob.glob(os.path.join(root, "configs", "*.yaml"))
    assert found
    for path in found:
        config.parse(["--config", path])


@pytest.mark.parametrize("argv,says", [
    (["--no-such-flag", "3"], "no-such-flag"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "two"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--eval-split", "1.5"], "--eval-split"),
    (["--precision", "fp8"], "--precision"),
    (["--metric-for-best", "auc"], "--metric-for-best"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    # the real-world text recipes
    (["--truncation", "middle"], "--truncation"),
    (["--head-tokens", "8"], "--head-tokens"),  # only with head_tail
    (["--head-tokens", "-1"], "--head-tokens"),
    (["--class-weights", "inverse"], "--class-weights"),
    (["--layer-lr-decay", "0"], "--layer-lr-decay"),
    (["--layer-lr-decay", "1.5"], "--layer-lr-decay"),
    (["--eval-steps", "-2"], "--eval-steps"),
    (["--early-stopping-patience", "-1"], "--early-stopping-patience"),
    (["--text-pair-column", "h", "--truncation", "tail"], "--text-pair-column"),
    (["--text-pair-column", "review"], "--text-pair-column"),
])
def test_bad_values_name_the_key(argv, says):
    with pytest.raises(UserError, match=says) as e:
        config.parse(argv)
    assert "\n" not in str(e.value)


def test_unknown_yaml_key_is_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("batch_size: 4\nbatch_sise: 8\n")
    with pytest.raises(UserError, match="batch_sise"):
        config.parse(["--config", str(y)])
