"""The number format a run computes in, chosen from what the hardware has; MFU against that format's peak."""
import logging

import pytest
import torch

from bert_finetune import precision, reporting

CPU = torch.device("cpu")
ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_fp16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
ZEN3 = "flags\t\t: fpu sse2 avx2 fma\n"


@pytest.mark.parametrize("cpuinfo, expected", [(ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (SKYLAKE, "fp32"),
                                               (ZEN3, "fp32"), ("", "fp32")])
def test_auto_on_a_cpu_is_bf16_where_its_flags_name_bf16_units(tmp_path, cpuinfo, expected, caplog):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    flags = precision.read_cpu_flags(str(path))
    with caplog.at_level(logging.INFO, "bert_finetune"):
        assert precision.resolve("auto", CPU, cpu_flags=flags, say=True) == expected
    assert len(caplog.records) == 1  # one line, saying which and why
    line = caplog.records[0].getMessage()
    assert line.startswith(f"--precision auto: {expected} (")
    assert ("avx512_bf16" in line or "amx_bf16" in line) if expected == "bf16" else "no bf16 matmul units" in line
    # evaluation and predict score the saved model in fp32 on any CPU; an explicit choice is kept
    assert precision.resolve("auto", CPU, cpu_flags=flags, scoring=True) == "fp32"
    assert precision.resolve("fp32", CPU, cpu_flags=flags) == "fp32"
    assert precision.cpu_has_fast("bf16", str(path)) == (expected == "bf16")


def test_half_precision_without_units_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, "bert_finetune"):
        assert precision.resolve("bf16", CPU, cpu_flags={"avx2"}) == "bf16"
        assert precision.resolve("bf16", CPU, cpu_flags={"avx512_bf16"}) == "bf16"
    assert len(caplog.records) == 1 and "about 100x slower" in caplog.records[0].getMessage()


def test_mfu_uses_the_peak_of_the_precision_in_use(monkeypatch):
    probed = []
    monkeypatch.setattr(reporting, "probe_matmul", lambda device, dtype: probed.append(dtype) or 1e12)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        reporting.matmul_peak_flops(CPU, name)
        assert probed[-1] == dtype


def test_an_mfu_above_one_is_said_to_be_a_low_probe_once(caplog):
    meter = reporting.Meter(flops_per_token=1e9, peak=1e9)  # 1 token/s would be MFU 1
    batch = {"input_ids": torch.ones(4, 8, dtype=torch.long), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    with caplog.at_level(logging.WARNING, "bert_finetune"):
        meter.add(batch)
        assert meter.lap()["mfu"] > 1
        meter.add(batch)
        meter.lap()
        meter.overall()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "is above 1" in lines[0] and "1 GFLOP/s" in lines[0], lines
