"""The training speed-ups change nothing but speed. FastDropout (CPU training's dropout) drops at the rate
asked, scales to keep the mean, is reproducible from the seed, and leaves the model's function unchanged
where nothing is dropped; a last layer computed at the first token only gives the same logits and the
same gradients."""
import json
import os

import pytest
import torch

from bert_finetune import speedups
from conftest import build_tiny_model, run_train, train_args


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_rate_and_scale(p):
    torch.manual_seed(0)
    drop = speedups.FastDropout(p).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    # 400k Bernoulli draws: the standard error is under 0.001
    assert abs(dropped - p) < 0.005
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4)
    assert abs(y.mean().item() - 1) < 0.01


def test_reproducible_from_the_seed_and_different_between_calls():
    drop = speedups.FastDropout(0.1).train()
    x = torch.randn(64, 128)
    torch.manual_seed(1)
    a, b = drop(x), drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a)
    assert not torch.equal(a, b)


def test_identity_in_eval_mode_and_at_p_zero():
    x = torch.randn(8, 16)
    assert torch.equal(speedups.FastDropout(0.5).eval()(x), x)
    assert torch.equal(speedups.FastDropout(0.0).train()(x), x)


def test_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.randn(32, 64, requires_grad=True)
    drop = speedups.FastDropout(0.25).train()
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
    assert speedups.use_fast_dropout(model) > 0
    assert model.config._attn_implementation == speedups.FAST_DROPOUT_ATTENTION
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
    speedups.use_fast_dropout(model)
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
        assert speedups.FAST_DROPOUT_ATTENTION not in json.dumps(json.load(f))
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
    speedups.use_fast_dropout(model)
    assert speedups.train_last_layer_on_first_token(model)
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
    assert not speedups.train_last_layer_on_first_token(eager)
    # a token classifier reads every position
    assert not speedups.train_last_layer_on_first_token(AutoModelForTokenClassification.from_pretrained(path))


def _first_batch():
    ids, mask = _batch()
    return {"input_ids": ids, "attention_mask": mask}


def test_self_check_keeps_speedups_that_compute_the_same_and_draws_no_random_numbers(tmp_path):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(build_tiny_model(str(tmp_path / "m")))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    kept = speedups.enable(model, _first_batch(), [speedups.FAST_CPU_DROPOUT, speedups.FIRST_TOKEN_LAST_LAYER])
    assert kept == ["fast CPU dropout", "last layer at the first token"]
    assert torch.equal(torch.get_rng_state(), before)  # exact resume: the check leaves the RNG where it was
    assert any(isinstance(m, speedups.FastDropout) for m in model.modules())
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, speedups.FastDropout))  # rates restored


def test_self_check_switches_off_a_broken_patch(tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(build_tiny_model(str(tmp_path / "m")))
    ids, mask = _batch()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    broken = speedups._first_token_layer
    monkeypatch.setattr(speedups, "_first_token_layer", lambda *a, **k: broken(*a, **k) * 1.5)
    with caplog.at_level("WARNING", logger="bert_finetune"):
        kept = speedups.enable(model, _first_batch(), [speedups.FAST_CPU_DROPOUT, speedups.FIRST_TOKEN_LAST_LAYER])
    assert kept == ["fast CPU dropout"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'last layer at the first token' switched off" in warnings[0]
    # undone: training mode runs the last layer whole again
    model.train()
    assert model.bert(input_ids=ids, attention_mask=mask).last_hidden_state.shape[1] == ids.shape[1]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)


def test_self_check_catches_a_head_that_reads_more_than_the_first_token(tmp_path, caplog):
    """A model that passes the name test but pools every position: the shortcut would change its output."""
    import transformers

    class BertForSequenceClassification(transformers.BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            pooled = (hidden * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
            return transformers.modeling_outputs.SequenceClassifierOutput(logits=self.classifier(pooled))

    model = BertForSequenceClassification.from_pretrained(build_tiny_model(str(tmp_path / "m")))
    with caplog.at_level("WARNING", logger="bert_finetune"):
        assert speedups.enable(model, _first_batch(), [speedups.FIRST_TOKEN_LAST_LAYER]) == []
    assert "switched off" in caplog.text


def test_a_run_with_a_broken_speedup_trains_like_one_without_it(tiny_model, make_csv, tmp_path, monkeypatch):
    """End to end: the check fires in a real run, says so, and the run is the unpatched model's, bitwise."""
    from safetensors.torch import load_file
    csv = make_csv(n=64)
    common = ("--epochs", "1", "--eval-split", "0.25")
    monkeypatch.setattr(speedups, "FIRST_TOKEN_LAST_LAYER", speedups.SpeedUp("last layer at the first token",
                                                                             lambda m: False, lambda m: None))
    plain = run_train(train_args(tiny_model, csv, tmp_path / "plain", *common))
    monkeypatch.undo()
    broken = speedups._first_token_layer
    monkeypatch.setattr(speedups, "_first_token_layer", lambda *a, **k: broken(*a, **k) + 1.0)
    checked = run_train(train_args(tiny_model, csv, tmp_path / "checked", *common))
    assert plain["speedups"] == checked["speedups"] == ["fast CPU dropout"]
    a, b = (load_file(tmp_path / d / "last" / "model.safetensors") for d in ("plain", "checked"))
    assert all(torch.equal(a[k], b[k]) for k in a)
