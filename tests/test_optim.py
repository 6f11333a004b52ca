import pytest
import torch

from bert_finetune import optim


def test_no_decay_on_biases_and_layernorm(tiny_model):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    groups = optim.param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in no_decay)
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in no_decay
    assert decay | no_decay == set(names.values())


def test_schedule_warms_up_then_decays_to_zero():
    f = [optim.lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] > 0 and all(a < b for a, b in zip(f[:10], f[1:11]))
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(1 / 90)
    assert optim.lr_factor(100, 10, 100) == 0.0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_fused_adamw_on_cpu():
    opt = optim.build_optimizer(torch.nn.Linear(4, 2), 1e-3, 0.01)
    assert opt.defaults.get("fused") is True
