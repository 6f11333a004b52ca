"""The training speed-ups change nothing but speed. FastDropout (CPU training's dropout) drops at the rate
asked, scales to keep the mean, is reproducible from the seed, and leaves the model's function unchanged
where nothing is dropped; a last layer computed at the first token only gives the same logits and the
same gradients."""
import json
import os

import pytest
import torch

from bert_finetune import modeling
from conftest import build_tiny_model, run_train, train_args


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_rate_and_scale(p):
    torch.manual_seed(0)
    drop = modeling.FastDropout(p).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    # 400k Bernoulli draws: the standard error is under 0.001
    assert abs(dropped - p) < 0.005
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4)
    assert abs(y.mean().item() - 1) < 0.01


def test_reproducible_from_the_seed_and_different_between_calls():
    drop = modeling.FastDropout(0.1).train()
    x = torch.randn(64, 128)
    torch.manual_seed(1)
    a, b = drop(x), drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a)
    assert not torch.equal(a, b)


def test_identity_in_eval_mode_and_at_p_zero():
    x = torch.randn(8, 16)
    assert torch.equal(modeling.FastDropout(0.5).eval()(x), x)
    assert torch.equal(modeling.FastDropout(0.0).train()(x), x)


def test_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.randn(32, 64, requires_grad=True)
    drop = modeling.FastDropout(0.25).train()
    y = drop(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float().mul_(drop.scale))


def _batch():
    ids = torch.tensor([[2, 5, 9, 12, 7, 3], [2, 6, 10, 3, 0, 0], [2, 8, 3, 0, 0, 0]])
    return ids, (ids != 0).long()


def test_swapped_model_computes_the_same_function(tmp_path):
    """With dropout rates too small to drop anything, training mode through the swapped dropouts and the
    attention path that applies them gives the logits of the unswapped model, padding masks included."""
    from transformers import AutoModelForSequenceClassification
    path = build_tiny_model(str(tmp_path / "m"))
    kw = dict(hidden_dropout_prob=1e-9, attention_probs_dropout_prob=1e-9)
    reference = AutoModelForSequenceClassification.from_pretrained(path, **kw).eval()
    model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
    assert modeling.use_fast_dropout(model) > 0
    assert model.config._attn_implementation == modeling.FAST_DROPOUT_ATTENTION
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    ids, mask = _batch()
    model.train()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_attention_dropout_is_applied(tmp_path):
    from transformers import AutoModelForSequenceClassification
    path = build_tiny_model(str(tmp_path / "m"))
    model = AutoModelForSequenceClassification.from_pretrained(path, hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.5)
    modeling.use_fast_dropout(model)
    ids, mask = _batch()
    model.train()
    with torch.no_grad():
        torch.manual_seed(3)
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(3)
        again = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, b)
    assert torch.equal(a, again)


def test_exported_model_loads_without_this_package(tiny_model, make_csv, tmp_path):
    """The swap is a training detail: best/ says nothing of it and loads with plain transformers."""
    from transformers import AutoModelForSequenceClassification
    out = tmp_path / "run"
    run_train(train_args(tiny_model, make_csv(n=48), out, "--epochs", "1"))
    with open(os.path.join(out, "best", "config.json")) as f:
        assert modeling.FAST_DROPOUT_ATTENTION not in json.dumps(json.load(f))
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "best"))
    assert model.config._attn_implementation == "sdpa"


def _pair(path, **kw):
    """(reference, speed-up candidate): the same weights, dropout off so that outputs can be compared."""
    from transformers import AutoModelForSequenceClassification
    kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return (AutoModelForSequenceClassification.from_pretrained(path, **kw),
            AutoModelForSequenceClassification.from_pretrained(path, **kw))


def test_first_token_last_layer_gives_the_same_logits_and_gradients(tmp_path):
    reference, model = _pair(build_tiny_model(str(tmp_path / "m"), num_labels=3))
    modeling.use_fast_dropout(model)
    assert modeling.train_last_layer_on_first_token(model)
    ids, mask = _batch()
    labels = torch.tensor([0, 2, 1])
    for m in (reference, model):
        m.train()
        torch.nn.functional.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, labels).backward()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              reference(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    largest = max(p.grad.abs().max() for p in reference.parameters())
    for (name, want), got in zip(reference.named_parameters(), model.parameters()):
        # float rounding differs (other matmul shapes); key biases have a true gradient of 0 (softmax ignores
        # a shift shared by all keys), so theirs is rounding noise alone
        assert torch.allclose(got.grad, want.grad, rtol=1e-4, atol=1e-5 * largest), name
    # the shortcut is for training only: evaluation runs the last layer at every position
    model.eval()
    with torch.no_grad():
        assert model.bert(input_ids=ids, attention_mask=mask).last_hidden_state.shape[1] == ids.shape[1]
        model.train()
        assert model.bert(input_ids=ids, attention_mask=mask).last_hidden_state.shape[1] == 1


def test_first_token_last_layer_only_where_it_is_exact(tmp_path):
    from transformers import AutoModelForTokenClassification
    path = build_tiny_model(str(tmp_path / "m"))
    _, eager = _pair(path, attn_implementation="eager")
    assert not modeling.train_last_layer_on_first_token(eager)
    # a token classifier reads every position
    assert not modeling.train_last_layer_on_first_token(AutoModelForTokenClassification.from_pretrained(path))
