"""Issue 30, parts 1 and 2: any model cut by its own forward (its traced graph, at single-tensor cut points).

A family's subclass with its own forward is cut by that forward (never by its class); the models the issue names
as refused train under dgl, dgl+mlaan and infopro+mlaan: the loss falls on a fixed batch, the user's object is the
trained model (its eval output equals the local model's) and the export loads strictly into a fresh instance.
Tiny instances of the named models' classes (the same forward, fewer / narrower blocks) train with falling loss; the
named builders at full width (32-pixel images) are cut, stepped twice under dgl and checked equal to the user's
object (a few seconds each).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_own_models import data, isolated, train
from torch import nn
from torchvision.models import resnet

import mlaan
from mlaan.models.graph_cut import cut_points, trace

METHODS = ("dgl", "dgl+mlaan", "infopro+mlaan")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


class CifarResNet18(resnet.ResNet):
    """The issue's subclass: torchvision's ResNet with a 3x3 stem and a forward that skips the max-pool (narrowed:
    one block per stage, 8x fewer channels in them)."""

    def __init__(self) -> None:
        super().__init__(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.fc = nn.Linear(512 // 8, 10)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        return super()._make_layer(block, planes // 8, blocks, stride, dilate)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_densenet():
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)


def tiny_mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=3, embed_dim=32)


def tiny_poolformer():
    from timm.models.metaformer import GroupNorm1, MetaFormer

    return MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), downsample_norm=None, mlp_act=nn.GELU,
                      mlp_bias=True, norm_layers=GroupNorm1, layer_scale_init_values=1e-5,
                      res_scale_init_values=None, use_mlp_head=False, num_classes=10)


def tiny_resnetv2():
    import timm

    return timm.create_model("resnetv2_50", num_classes=10, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))


def tiny_levit():
    import timm

    return timm.create_model("levit_128s", num_classes=10, img_size=32, embed_dim=(32, 48, 64), key_dim=8,
                             num_heads=(2, 3, 4), depth=(1, 1, 1))


# name → (builder, image side, lr, needs timm)
MODELS = {
    "cifar_resnet18_subclass": (CifarResNet18, 32, 0.05, False),
    "densenet": (tiny_densenet, 32, 0.05, False),
    "googlenet": (lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False), 32,
                  0.02, False),
    "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(num_classes=10), 32, 0.005, False),
    "mnasnet0_5": (lambda: torchvision.models.mnasnet0_5(num_classes=10), 64, 0.005, False),  # 32 px: 1x1 maps
    "resnetv2": (tiny_resnetv2, 32, 0.05, True),
    "poolformer": (tiny_poolformer, 32, 0.05, True),
    "mixer": (tiny_mixer, 32, 0.05, True),
    "levit": (tiny_levit, 32, 0.05, True),
}


def build(name: str) -> nn.Module:
    make, _, _, needs_timm = MODELS[name]
    if needs_timm:
        pytest.importorskip("timm")
    torch.manual_seed(0)
    return make()


def check_trains(name: str, method: str, steps: int = 4, k: int = 3) -> mlaan.LocalModel:
    """The issue's evidence: same function before any step, loss falls, the user's object is the trained model,
    the export loads strictly into a fresh instance."""
    _, size, lr, _ = MODELS[name]
    net = build(name)
    x, y = data(size=(size, size))
    model = mlaan.create_local_model(net, method=method, num_local_modules=k, image_size=size)
    assert {id(p) for p in net.parameters()} <= {id(p) for p in model.backbone.parameters()}
    net.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    model.train()
    if method == "dgl":  # no gradient crosses a cut: module 0's are those of its own loss alone
        assert isolated(model, x, y), name
    losses = train(model, x, y, steps=steps, lr=lr)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], (name, method, losses)
    net.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
        fresh = build(name)
        fresh.load_state_dict(model.backbone.export_state_dict())  # strict: the class's own keys
        fresh.eval()
        torch.testing.assert_close(fresh(x), net(x), rtol=1e-5, atol=1e-5)
    return model


# ------------------------------------------------------------------------------ part 1: a subclass's own forward
def test_subclass_with_its_own_forward_is_cut_by_that_forward():
    net = build("cifar_resnet18_subclass")
    x, _ = data(size=(32, 32))
    model = mlaan.create_local_model(net, method="dgl", num_local_modules=3, image_size=32)
    net.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)  # the max-pool stays skipped
    # the family's blocks are the preferred cut points: stem (conv-bn-relu, no max-pool), 4 blocks, head
    assert len(model.backbone.blocks) == 6
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.backbone.modules())


def test_subclass_of_a_family_keeps_the_family_cut_when_its_forward_is_the_familys():
    class Renamed(resnet.ResNet):  # only the constructor differs: cut by the adapter, as before
        def __init__(self):
            super().__init__(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)

    model = mlaan.create_local_model(Renamed(), method="dgl", num_local_modules=3, image_size=32)
    assert not any(type(b).__name__ == "GraphBlock" for b in model.backbone.blocks)


def test_timm_subclass_with_its_own_forward():
    timm = pytest.importorskip("timm")

    class Scaled(timm.models.resnet.ResNet):
        def forward(self, x):
            return self.forward_head(self.forward_features(x * 2.0))

    base = timm.create_model("test_resnet", num_classes=10)
    base.__class__ = Scaled  # the same instance, now with its own forward
    model = mlaan.create_local_model(base, method="dgl+mlaan", num_local_modules=3, image_size=32)
    assert all(type(b).__name__ == "GraphBlock" for b in model.backbone.blocks)
    x, _ = data(size=(32, 32))
    base.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_subclass_trains_with_every_method(method):
    check_trains("cifar_resnet18_subclass", method)


# --------------------------------------------------------------------------- part 2: the models refused before
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", [n for n in MODELS if n != "cifar_resnet18_subclass"])
def test_named_model_trains(name, method):
    check_trains(name, method)


def test_a_compiled_model_is_unwrapped():
    net = build("cifar_resnet18_subclass")
    compiled = torch.compile(net)  # lazy: nothing is compiled until it is called, and it is never called here
    x, y = data(size=(32, 32))
    model = mlaan.create_local_model(compiled, method="dgl", num_local_modules=3, image_size=32)
    assert model.backbone.source is net
    assert set(model.backbone.export_state_dict()) == set(net.state_dict())  # no "_orig_mod." prefix
    losses = train(model, x, y, steps=3)
    assert losses[-1] < losses[0]
    net.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- the graph itself
class TrainOnlyDropout(nn.Module):
    """A submodule whose traced graph differs between train() and eval(): it must run as one node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.dropout(self.conv(x), 0.5, training=self.training)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = TrainOnlyDropout()
        self.last = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)
        self.unused = nn.Linear(4, 4)  # in the state_dict, never called

    def forward(self, x):
        x = F.relu(self.last(self.mid(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_a_hand_written_model_is_cut_at_its_childrens_boundaries():
    net = Plain()
    graph, leaves = trace(net)
    assert leaves == {"mid"}  # F.dropout(training=self.training) runs as the module's own code
    model = mlaan.create_local_model(net, method="dgl+mlaan", num_local_modules=3, image_size=16)
    assert len(model.backbone.blocks) == 4  # stem, mid, last (+ relu), mean + fc
    x, y = data()
    losses = train(model, x, y, steps=3)
    assert losses[-1] < losses[0]
    net.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    fresh = Plain()
    fresh.load_state_dict(model.backbone.export_state_dict())  # the unused Linear too
    assert not hasattr(net, "_tensor_constant0")


def test_a_model_on_the_meta_device_or_in_bfloat16_is_probed_on_its_own():
    with torch.device("meta"):
        on_meta = Plain()
    assert len(mlaan.models.adapt(on_meta, image_size=16).blocks) == 4
    assert len(mlaan.models.adapt(Plain().to(torch.bfloat16), image_size=16).blocks) == 4


def test_cut_points_are_single_tensor_points():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + y  # y spans b: the only cut is none

    graph, _ = trace(Skip())
    assert cut_points(graph) == []  # no tensor meta needed to know there is none


@pytest.mark.parametrize("forward,why", [
    (lambda self, x: self.fc(x.mean((2, 3))) + self.conv(x).mean((2, 3)).sum(1, keepdim=True),
     "no point of its forward is crossed by a single tensor"),
    (lambda self, x: self.fc(self.conv(x).mean((2, 3))) if x.sum() > 0 else x,
     "its forward does not trace with torch.fx"),
    (lambda self, x: (self.fc(self.conv(x).mean((2, 3))), x), "its forward returns a tuple"),
])
def test_models_without_a_usable_cut_are_refused_in_one_line(forward, why):
    class NoCut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 1), nn.Linear(3, 10)

    NoCut.forward = forward
    with pytest.raises(ValueError, match=r"^cannot cut a .*NoCut into blocks: supported are .*, but " + why) as error:
        mlaan.create_local_model(NoCut(), method="dgl", image_size=16)
    assert "pass your blocks as a list" in str(error.value) and "\n" not in str(error.value)


def test_auxiliary_outputs_in_training_are_refused_naming_the_fix():
    net = torchvision.models.googlenet(num_classes=10, init_weights=False)  # aux_logits=True: a tuple in train()
    with pytest.raises(ValueError, match=r"in train\(\) its forward returns a GoogLeNetOutputs .*aux_logits=False"):
        mlaan.create_local_model(net, method="dgl", image_size=32)


# --------------------------------------------------------------------------- the named builders at full width
@pytest.mark.parametrize("name", ["densenet121", "googlenet", "squeezenet1_1", "mnasnet0_5"])
def test_torchvision_named_builder_full_width(name):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    net = torchvision.models.get_model(name, num_classes=10, **kwargs)
    step_full_width(net, 32)


@pytest.mark.parametrize("name,kwargs", [
    ("resnetv2_50", {}),
    ("poolformer_s12", {}),
    ("mixer_b16_224", {"img_size": 32}),
    ("levit_128s", {"img_size": 32}),
])
def test_timm_named_builder_full_width(name, kwargs):
    timm = pytest.importorskip("timm")
    step_full_width(timm.create_model(name, num_classes=10, **kwargs), 32)


def step_full_width(net: nn.Module, size: int) -> None:
    x, y = data(n=4, size=(size, size))
    model = mlaan.create_local_model(net, method="dgl", num_local_modules=3, image_size=size)
    losses = train(model, x, y, steps=2, lr=0.01)
    assert all(torch.isfinite(torch.tensor(losses)))
    net.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    assert set(model.backbone.export_state_dict()) == set(net.state_dict())
