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


def _grads(seed: int):
    """Parameters of a model's shapes with gradients set: an embedding, matrices, a bias, a tensor whose
    size is not a multiple of the norm's row."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((3000, 384), (384, 1536), (1536,), (7, 9999), (2, 384))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


@pytest.mark.parametrize("max_norm", [1.0, 1e5])
def test_clip_grad_norm_agrees_with_torch(max_norm):
    ours, theirs = _grads(0), _grads(0)
    norm = optim.clip_grad_norm(ours, max_norm)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    exact = torch.cat([p.grad.double().flatten() for p in _grads(0)]).norm()
    assert norm.item() == pytest.approx(want.item(), rel=1e-4)
    assert abs(norm.item() - exact.item()) <= abs(want.item() - exact.item()) + 1e-6 * exact.item()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=0)
    total_after = torch.cat([p.grad.flatten() for p in ours]).norm().item()
    assert total_after == pytest.approx(min(max_norm, norm.item()), rel=1e-4)
    if max_norm > norm:  # nothing to clip: the gradients are untouched, bit for bit
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, _grads(0)))


def test_clip_grad_norm_does_not_depend_on_the_thread_count():
    """Ranks of a job may run different core counts; they must clip by the same bits."""
    threads = torch.get_num_threads()
    try:
        norms = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            norms.append(optim.clip_grad_norm(_grads(1), 1.0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(norms[0], n) for n in norms[1:])


def test_clip_grad_norm_of_a_nan_gradient_is_nan_as_in_torch():
    params = _grads(2)
    params[2].grad[5] = float("nan")
    assert optim.clip_grad_norm(params, 1.0).isnan()
    assert all(p.grad.isnan().all() for p in params)  # as torch's: the step must then be skipped
