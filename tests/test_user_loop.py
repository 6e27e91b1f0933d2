"""The conventions a user's own training loop brings (issue 30): targets as class indices or probabilities (timm's
Mixup/CutMix), label smoothing in every cross-entropy, parameter groups and ``no_weight_decay`` (timm's
optimizer factory), per-module gradient clipping, ``loss_scale`` for gradient accumulation, and ``mlaan train``'s
``--opt``/``--clip-grad``/``--mixup``/``--cutmix``/``--label-smoothing``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlaan
from mlaan.training import make_trainer
from mlaan.training.config import TrainConfig
from mlaan.training.loop import make_mixup, make_optimizer

C = 10  # classes
METHODS = ["bp", "dgl", "dgl+mlaan", "infopro+mlaan", "auglocal"]


def tiny_blocks(batchnorm: bool = True) -> list[nn.Module]:
    """A 16×16 conv net of a stem, three blocks and a head: small enough for many steps on one thread."""
    def conv(cin: int, cout: int) -> nn.Module:
        norm = nn.BatchNorm2d(cout) if batchnorm else nn.Identity()
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm), norm, nn.ReLU())

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, C))
    return [conv(3, 8), conv(8, 8), conv(8, 8), conv(8, 8), head]


def tiny_model(method: str, seed: int = 0, batchnorm: bool = True, **options) -> mlaan.LocalModel:
    torch.manual_seed(seed)
    k = 1 if method == "bp" else 3
    return mlaan.create_local_model(tiny_blocks(batchnorm), method, k, image_size=16, **options)


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, C, (n,), generator=g)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("method", METHODS)
def test_probability_targets_train_as_their_class_indices(method):
    """One-hot probabilities (B, C) give every loss and gradient that class indices (B,) give (every aux loss,
    cascaded loss and the output's), and the same batch accuracy (argmax of the targets)."""
    x, y = batch()
    by_index, by_probability = tiny_model(method), tiny_model(method)
    a = by_index.train_step(x, y)
    b = by_probability.train_step(x, F.one_hot(y, C).float())
    assert a["accuracy"] == b["accuracy"]
    assert a["module_losses"] == pytest.approx(b["module_losses"], rel=1e-5)
    assert_same_grads(grads(by_index), grads(by_probability))


@pytest.mark.parametrize("method", METHODS)
def test_label_smoothing_reaches_every_cross_entropy(method):
    """``label_smoothing=0.1`` on class indices == no smoothing on the smoothed probabilities: every parameter's
    gradient agrees, so the output's, every aux classifier's and every cascaded cross-entropy smooth (one loss
    left unsmoothed would move its module's gradient). Probability targets are used as given."""
    eps = 0.1
    x, y = batch()
    smoothed = F.one_hot(y, C).float() * (1 - eps) + eps / C
    a, b = tiny_model(method, label_smoothing=eps), tiny_model(method)
    stats_a, stats_b = a.train_step(x, y), b.train_step(x, smoothed)
    assert stats_a["module_losses"] == pytest.approx(stats_b["module_losses"], rel=1e-5)
    assert_same_grads(grads(a), grads(b))
    c = tiny_model(method, label_smoothing=eps)  # probabilities are not smoothed again
    c.train_step(x, smoothed)
    assert_same_grads(grads(c), grads(b))


def test_label_smoothing_is_an_option_with_a_range():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        tiny_model("dgl", label_smoothing=1.0)


@pytest.mark.parametrize("bad", [
    torch.zeros(8, C + 1), torch.zeros(9, C), torch.zeros(7, dtype=torch.long), torch.zeros(8),
    torch.zeros(8, C, dtype=torch.long), torch.zeros(8, 1, 1, dtype=torch.long), [0] * 8,
], ids=["classes+1", "batch+1", "short-indices", "float-indices", "integer-probabilities", "3-d", "list"])
def test_targets_of_the_wrong_shape_are_refused_before_any_backward(bad):
    """Before: the batch-accuracy line raised after every backward had run (a caller who caught it stepped on
    those gradients). Now a one-line ValueError, and no parameter has a gradient."""
    model = tiny_model("dgl+mlaan")
    x, _ = batch()
    with pytest.raises(ValueError, match="targets"):
        model.train_step(x, bad)
    assert not grads(model)


def test_batch_accuracy_of_probability_targets_when_batch_equals_classes():
    """With B == C, ``argmax(1) == targets`` broadcast (B, C) silently (accuracy 0 was reported); now the
    accuracy is against the targets' argmax, what class indices give."""
    x, y = batch(C)
    model = tiny_model("dgl")
    by_index = model.train_step(x, y)["accuracy"]
    logits = model.module_logits(x)[-1]  # the backbone's, from the same train-mode batch statistics
    assert by_index == pytest.approx((logits.argmax(1) == y).float().mean().item())
    mixed = 0.7 * F.one_hot(y, C).float() + 0.3 * F.one_hot(y.roll(1), C).float()
    assert model.train_step(x, mixed)["accuracy"] == pytest.approx(by_index)


def test_infopro_contrastive_refuses_probability_targets_before_any_backward():
    model = tiny_model("infopro", infopro_task="contrastive")
    x, y = batch()
    with pytest.raises(ValueError, match="needs class indices"):
        model.train_step(x, F.one_hot(y, C).float())
    assert not grads(model)
    model.train_step(x, y.int())  # any integer dtype of class indices
    assert grads(model)


# ------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("method", ["bp", "dgl+mlaan", "auglocal"])
def test_two_steps_of_half_the_batch_with_loss_scale_half_equal_one_step(method):
    """Gradient accumulation: two ``train_step``s of 32 images with ``loss_scale=0.5`` give the gradient of one of
    64 (before: twice it). The net has no BatchNorm: BatchNorm normalises by the statistics of the batch it sees,
    so two half batches compute another function than the whole one (not a property of the accumulation)."""
    x, y = batch(64)
    whole, halves = tiny_model(method, batchnorm=False), tiny_model(method, batchnorm=False)
    whole.train_step(x, y)
    for part in (slice(0, 32), slice(32, 64)):
        halves.train_step(x[part], y[part], loss_scale=0.5)
    assert_same_grads(grads(whole), grads(halves), atol=1e-6)


def test_loss_scale_scales_the_gradient_not_the_reported_losses():
    x, y = batch()
    a, b = tiny_model("dgl+mlaan"), tiny_model("dgl+mlaan")
    stats_a, stats_b = a.train_step(x, y), b.train_step(x, y, loss_scale=0.25)
    assert stats_a["module_losses"] == stats_b["module_losses"]
    assert_same_grads({n: g * 0.25 for n, g in grads(a).items()}, grads(b))
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="loss_scale"):
            b.train_step(x, y, loss_scale=bad)


# ----------------------------------------------------------------------------------------------- clipping
def test_per_module_clipping_does_not_depend_on_another_modules_gradients():
    """A global ``clip_grad_norm_(model.parameters())`` scales every module by one norm, coupling the isolated
    modules; ``model.clip_grad_norm_`` clips each module with its aux nets on its own."""
    x, y = batch()
    model = tiny_model("dgl+mlaan")
    model.train_step(x, y)
    original = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    own = [[p for part in model.module_parts(j) for p in part.parameters() if p.grad is not None] for j in range(3)]
    norms = model.clip_grad_norm_(0.01)
    assert norms.shape == (3,)
    for j in range(3):
        assert norms[j] == pytest.approx(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(original[p]) for p in own[j]])).item(), rel=1e-5)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in own[j]]))
        assert after.item() == pytest.approx(0.01, rel=1e-3)
    clipped_0 = [p.grad.clone() for p in own[0]]
    for p, g in original.items():  # again, with module 2's gradient 1000× larger
        p.grad = g * 1000 if any(p is q for q in own[2]) else g.clone()
    model.clip_grad_norm_(0.01)
    for p, before in zip(own[0], clipped_0):
        assert torch.equal(p.grad, before)


def test_bp_clips_one_global_norm():
    x, y = batch()
    model = tiny_model("bp")
    model.train_step(x, y)
    params = [p for p in model.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    norms = model.clip_grad_norm_(0.5)
    assert norms.shape == (1,) and norms[0].item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ optimizer groups
def test_param_groups_and_the_parameters_of_backbone_and_aux_nets():
    """Decay on weights only (not norms, biases); EMA twins (frozen) in no group; backbone and aux parameters
    split the trainable ones."""
    model = tiny_model("dgl+mlaan")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen, "dgl+mlaan has EMA twins"
    decay, no_decay = model.param_groups(weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable
    backbone, aux = {id(p) for p in model.backbone_parameters()}, {id(p) for p in model.aux_parameters()}
    assert backbone and aux and not backbone & aux and backbone | aux == trainable


def test_make_optimizer_sgd_is_the_papers_and_adamw_takes_the_groups():
    model = tiny_model("dgl+mlaan")
    sgd = make_optimizer(model)
    assert len(sgd.param_groups) == 1 and sgd.param_groups[0]["weight_decay"] == 1e-4  # every parameter decays
    assert len(sgd.param_groups[0]["params"]) == len([p for p in model.parameters() if p.requires_grad])
    adamw = make_optimizer(model, lr=1e-3, weight_decay=0.05, opt="adamw")
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.999)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert len(make_optimizer(model, opt="sgd", filter_bias_and_bn=True).param_groups) == 2
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(model, opt="adam")


def test_no_weight_decay_forwards_the_timm_models_names():
    """timm's ``create_optimizer_v2(local_model, "adamw")`` decayed a ViT's ``cls_token``/``pos_embed``: the local
    model did not forward the backbone's ``no_weight_decay()``. Now it names them as its own parameters."""
    timm = pytest.importorskip("timm")
    optim = pytest.importorskip("timm.optim")

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=C)
    model = mlaan.create_local_model(net, "dgl", 2)
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {id(params[n]) for n in names} == {id(net.cls_token), id(net.pos_embed)}
    for optimizer in (optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05),
                      torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)):
        decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert id(net.cls_token) not in decayed and id(net.pos_embed) not in decayed
        assert id(net.blocks[0].attn.qkv.weight) in decayed


# ---------------------------------------------------------------------------------------------------- mixup
def test_mixup_gives_probability_targets_and_an_odd_batch_keeps_its_last_image():
    pytest.importorskip("timm")
    mix = make_mixup(0.2, 0.0, 0.1, C)
    x, y = batch(7)
    mixed, targets = mix(x, y)
    assert mixed.shape == x.shape and targets.shape == (7, C)
    torch.testing.assert_close(targets.sum(1), torch.ones(7))
    assert torch.equal(mixed[-1], x[-1])
    expected = torch.full((C,), 0.01)
    expected[y[-1]] = 0.91
    torch.testing.assert_close(targets[-1], expected)
    assert make_mixup(0.0, 0.0, 0.1, C) is None


def test_mixup_without_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    monkeypatch.setitem(__import__("sys").modules, "timm.data", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[timm\]'"):
        make_mixup(0.2, 0.0, 0.0, C)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install -e '\.\[timm\]'"):
        TrainConfig(mixup=0.2).resolve()


# -------------------------------------------------------------------------------------------- mlaan train
def test_recipe_options_are_checked():
    assert TrainConfig(opt="adamw").resolve().filter_bias_and_bn is True
    assert TrainConfig().resolve().filter_bias_and_bn is False
    for bad, match in (({"opt": "adam"}, "opt"), ({"clip_grad": 0.0}, "clip_grad"), ({"mixup": -1.0}, "mixup"),
                       ({"betas": (0.9, 1.0)}, "betas"), ({"label_smoothing": -0.1}, "label_smoothing"),
                       ({"clip_grad": 1.0, "parallel": "modules"}, "--parallel modules")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).resolve()


RUN = {"dataset": "synthetic", "synthetic_train_size": 64, "synthetic_test_size": 32, "synthetic_image_size": 16,
       "arch": "resnet20", "method": "dgl+mlaan", "local_modules": 2, "batch_size": 32, "epochs": 1,
       "warmup_epochs": 0, "device": "cpu", "threads": 1}


def test_train_with_adamw_clipping_mixup_and_label_smoothing_and_resume_keeps_the_optimizer(tmp_path):
    """``mlaan train --opt adamw --clip-grad 1 --mixup 0.2 --cutmix 0.2 --label-smoothing 0.1``: the run trains
    (finite losses), its config records the recipe, a resume with ``--opt sgd`` is refused, and a plain resume
    continues with AdamW's state."""
    pytest.importorskip("timm")
    out = str(tmp_path / "run")
    recipe = {"opt": "adamw", "lr": 1e-3, "weight_decay": 0.05, "clip_grad": 1.0, "mixup": 0.2, "cutmix": 0.2,
              "label_smoothing": 0.1}
    trainer = make_trainer(None, {**RUN, **recipe, "output_dir": out, "max_steps": 1}, None, log=lambda m: None)
    try:
        assert isinstance(trainer.optimizer, torch.optim.AdamW) and len(trainer.optimizer.param_groups) == 2
        trainer.fit()
    finally:
        trainer.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_loss"] == pytest.approx(record["train_loss"])  # finite, not NaN
    config = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]
    assert {k: config[k] for k in recipe} == recipe and config["filter_bias_and_bn"] is True
    with pytest.raises(ValueError, match=r"opt: \"adamw\" in the run, \"sgd\" given"):
        make_trainer(None, {"output_dir": out, "opt": "sgd"}, "auto", log=lambda m: None)
    resumed = make_trainer(None, {"output_dir": out}, "auto", log=lambda m: None)  # the run's own recipe
    try:
        assert isinstance(resumed.optimizer, torch.optim.AdamW) and resumed.cfg.clip_grad == 1.0
        assert resumed.optimizer.state  # AdamW's moments, loaded
        resumed.fit()
    finally:
        resumed.close()
