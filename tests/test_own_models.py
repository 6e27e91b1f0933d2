"""Issue 12: your own model — torchvision / timm families, vision transformers, blocks as users write them.

Every family builds with bp, dgl, dgl+mlaan, infopro+mlaan and auglocal at small K on tiny inputs, trains a few
steps with falling loss, isolates its modules (perturbation), evaluates exactly as the user's own model and
exports into the original class. The failing inputs of the issue are regression tests here.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from families import PatchEmbed, hand_vit, torchvision_models
from test_engine import grads_of, same, step
from torch import nn

import mlaan
from mlaan.engine.features import classify

METHODS = ("bp", "dgl", "dgl+mlaan", "infopro+mlaan", "auglocal")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: a second thread only adds synchronisation, which a busy machine makes very slow
    torch.set_num_threads(1)
    yield


def data(n: int = 6, channels: int = 3, size: tuple[int, int] = (16, 16), classes: int = 10):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, channels, *size, generator=g), torch.randint(0, classes, (n,), generator=g)


def train(model: mlaan.LocalModel, x: torch.Tensor, y: torch.Tensor, steps: int = 4, lr: float = 0.05) -> list:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.5)
    losses = []
    for _ in range(steps):
        losses.append(step(model, x, y)["loss"])
        opt.step()
        model.after_optimizer_step()
    return losses


def k_for(method: str) -> int:
    return 1 if method == "bp" else 3


def isolated(model: mlaan.LocalModel, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Module 0's gradients do not change when every module and aux net its losses cannot reach is perturbed."""
    def grads(perturbed: list[int]) -> list[torch.Tensor]:
        m = copy.deepcopy(model)
        torch.manual_seed(5)
        with torch.no_grad():
            for i in perturbed:
                parts = [m.local_modules[i]] + ([m.independent_heads[i]] if i < len(m.independent_heads) else [])
                parts += [m.cascade_heads[str(i)]] if str(i) in m.cascade_heads else []
                for part in parts:
                    for p in part.parameters():
                        p.add_(torch.randn_like(p) * 0.5)
        torch.manual_seed(6)  # the same stochastic depth / dropout draws in both runs
        step(m, x, y)
        return grads_of(m.local_modules[0])

    window = model.options.window if model.spec.cascade else 1
    beyond = list(range(window, len(model.local_modules)))
    return same(grads([]), grads(beyond))


def check_family(build, x, y, image_size=16, tolerance=0.0):
    """The issue's evidence for one family (module-level so timm's test reuses it)."""
    for method in METHODS:
        torch.manual_seed(0)
        user = build()
        model = mlaan.create_local_model(user, method=method, num_local_modules=k_for(method), image_size=image_size)
        assert model.num_classes == 10
        if method in ("dgl", "dgl+mlaan"):
            assert isolated(model, x, y), method
        losses = train(model, x, y)
        assert losses[-1] < losses[0], (method, losses)
        # the user's object is the trained model: same parameters, same eval output
        assert {id(p) for p in user.parameters()} <= {id(p) for p in model.backbone.parameters()}
        model.eval()
        user.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), user(x), rtol=tolerance, atol=tolerance)
    fresh = build()
    fresh.load_state_dict(model.backbone.export_state_dict())  # strict: the original class's keys
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), user(x), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("family", list(torchvision_models()))
def test_torchvision_family(family):
    x, y = data()
    check_family(torchvision_models()[family], x, y)


@pytest.mark.parametrize("class_token", [False, True])
def test_hand_written_vit_trains_with_every_method(class_token):
    x, y = data()
    for method in METHODS:
        torch.manual_seed(0)
        blocks = hand_vit(class_token=class_token)
        model = mlaan.create_local_model(blocks, method=method, num_local_modules=k_for(method), image_size=16)
        kind = model.feature_kinds[1] if model.feature_kinds else None
        if kind is not None:
            assert (kind.layout, kind.prefix_tokens, kind.grid) == ("tokens", int(class_token), (4, 4))
        if method == "dgl+mlaan":
            assert isolated(model, x, y)
        losses = train(model, x, y)
        assert losses[-1] < losses[0], (method, losses)


def test_vit_as_nn_sequential_shares_and_exports():
    x, y = data()
    user = nn.Sequential(*hand_vit(num_classes=10))
    model = mlaan.create_local_model(user, method="dgl+mlaan", num_local_modules=3, image_size=16)
    assert len(model.backbone.blocks) == 6
    train(model, x, y, steps=2)
    fresh = nn.Sequential(*hand_vit(num_classes=10))
    fresh.load_state_dict(model.backbone.export_state_dict())
    user.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), user(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------- the failing inputs
def vgg_like_blocks(num_classes: int = 10) -> list[nn.Module]:
    """What cutting VGG's ``features`` at its convolutions gives: blocks that start with ReLU(inplace=True)."""
    return [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1)),
        nn.Sequential(nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1)),
        nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1)),
        nn.Sequential(nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes)),
    ]


@pytest.mark.parametrize("method", METHODS + ("dgl+mlm", "dgl+lam", "infopro"))
def test_blocks_starting_with_an_inplace_relu(method):
    x, y = data()
    model = mlaan.create_local_model(vgg_like_blocks(), method=method, num_local_modules=k_for(method),
                                     image_size=16)
    losses = train(model, x, y, steps=3)
    assert losses[-1] < losses[0]


def test_inplace_blocks_with_grad_checkpointing_and_eval_logits():
    x, y = data()
    model = mlaan.create_local_model(vgg_like_blocks(), method="dgl+mlaan", num_local_modules=4, image_size=16)
    reference = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    a, b = step(model, x, y), step(reference, x, y)
    assert a["module_losses"] == pytest.approx(b["module_losses"], rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    # the LAM trunk's first copied block starts in place: its EMA twin must still see the module's output
    logits = model.module_logits(x, path="cascaded")
    assert all(t is None or torch.isfinite(t).all() for t in logits)


def test_num_classes_is_taken_from_the_head():
    x, y = data(classes=100)
    y[0] = 42
    model = mlaan.create_local_model(vgg_like_blocks(100), method="dgl", num_local_modules=3, image_size=16)
    assert model.num_classes == 100
    step(model, x, y)  # no "Target 42 is out of bounds"


def test_num_classes_different_from_the_head_is_refused():
    with pytest.raises(ValueError, match=r"num_classes=10, but the head .* outputs 100 class scores"):
        mlaan.create_local_model(vgg_like_blocks(100), method="dgl", num_local_modules=3, num_classes=10,
                                 image_size=16)


def test_in_channels_for_block_lists():
    blocks = vgg_like_blocks()
    blocks[0] = nn.Conv2d(1, 8, 3, padding=1)
    model = mlaan.create_local_model(blocks, method="dgl", num_local_modules=3, image_size=16, in_channels=1)
    assert model.image_shape == (1, 16, 16)
    step(model, *data(channels=1))
    with pytest.raises(ValueError, match=r"block 0 \(stem, Conv2d\) cannot take the images, of shape \(3, 16, 16\)"):
        mlaan.create_local_model(blocks, method="dgl", num_local_modules=3, image_size=16, in_channels=3)


def test_a_backbone_without_any_conv_an_mlp_on_flattened_images():
    mlp = [nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(inplace=True)),
           nn.Sequential(nn.Linear(32, 32), nn.ReLU(inplace=True)), nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
           nn.Linear(32, 10)]
    x, y = data(channels=1, size=(28, 28))
    for method in METHODS:
        model = mlaan.create_local_model(copy.deepcopy(mlp), method=method, num_local_modules=k_for(method))
        assert model.image_shape == (1, 28, 28)  # read from the first Linear
        losses = train(model, x, y, steps=3)
        assert losses[-1] < losses[0], method
    as_one_module = mlaan.create_local_model(nn.Sequential(*copy.deepcopy(mlp)), method="dgl", num_local_modules=2)
    assert as_one_module.image_shape == (1, 28, 28)  # an nn.Sequential, as a list


def test_first_block_without_conv_is_a_one_line_error_not_stop_iteration():
    blocks = [nn.Identity(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))]
    model = mlaan.create_local_model(blocks, method="bp", image_size=16)  # the Linear tells
    assert model.image_shape == (3, 16, 16)
    weightless = [nn.Identity(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())]
    with pytest.raises(ValueError, match="cannot tell the image channels .* pass in_channels="):
        mlaan.create_local_model(weightless, method="bp", image_size=16)


@pytest.mark.parametrize("method", ["dgl+mlaan", "infopro+mlaan", "infopro", "auglocal"])
def test_non_square_images(method):
    x, y = data(size=(16, 24))
    model = mlaan.create_local_model("resnet20", method=method, num_local_modules=3, image_size=(16, 24))
    assert model.image_shape == (3, 16, 24)
    losses = train(model, x, y, steps=3)
    assert losses[-1] < losses[0]


def test_non_square_vit_tokens():
    x, y = data(size=(16, 24))
    blocks = hand_vit(size=(16, 24), class_token=True)
    model = mlaan.create_local_model(blocks, method="infopro+mlaan", num_local_modules=3, image_size=(16, 24))
    assert model.feature_kinds[1].grid == (4, 6)
    train(model, x, y, steps=2)


def test_a_block_that_cannot_feed_the_next_is_named():
    blocks = vgg_like_blocks()
    blocks[3] = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1))
    with pytest.raises(ValueError, match=r"^block 3 \(block, Sequential\) cannot take the output of block 2 "
                                         r"\(block, Sequential\), of shape \(16, 8, 8\): .*"):
        mlaan.create_local_model(blocks, method="dgl", num_local_modules=3, image_size=16)


def test_a_head_that_does_not_score_classes_is_named():
    blocks = vgg_like_blocks()[:-1] + [nn.Identity()]
    with pytest.raises(ValueError, match=r"the head \(block 4, Identity\) outputs shape \(16, 8, 8\)"):
        mlaan.create_local_model(blocks, method="dgl", num_local_modules=3, image_size=16)


def test_image_size_must_be_a_side_or_a_pair():
    with pytest.raises(ValueError, match="image_size must be a positive int or a pair"):
        mlaan.create_local_model(vgg_like_blocks(), method="dgl", num_local_modules=3, image_size=(16, 0))


def test_exported_torchvision_resnet18_loads_into_torchvision():
    import torchvision

    model = mlaan.create_local_model(torchvision.models.resnet18(num_classes=10), method="dgl+mlaan",
                                     num_local_modules=3, image_size=32)
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}  # as a checkpoint holds it
    exported = model.backbone.export_state_dict({k[len("backbone."):]: v for k, v in state.items()})
    torchvision.models.resnet18(num_classes=10).load_state_dict(exported)


def test_unsupported_models_are_refused_in_one_line():
    class Mine(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"cannot cut a .*Mine into blocks: supported are .*; or pass your blocks"):
        mlaan.create_local_model(Mine(), method="dgl")


# ------------------------------------------------------------------------------------------ feature kinds
@pytest.mark.parametrize("shape,image,layout,prefix,grid", [
    ((64, 8, 8), (32, 32), "map", 0, None),
    ((16, 16, 16), (32, 32), "map", 0, None),
    ((8, 8, 96), (32, 32), "channels_last", 0, None),
    ((4, 6, 32), (32, 48), "channels_last", 0, None),
    ((16, 4, 6), (32, 48), "map", 0, None),
    ((64, 192), (32, 32), "tokens", 0, (8, 8)),
    ((65, 192), (32, 32), "tokens", 1, (8, 8)),
    ((50, 8), (224, 224), "tokens", 1, (7, 7)),
    ((25, 8), (32, 48), "tokens", 1, (4, 6)),
    ((128,), (32, 32), "vector", 0, None),
])
def test_feature_kinds_from_shapes(shape, image, layout, prefix, grid):
    kind = classify(shape, image)
    assert (kind.layout, kind.prefix_tokens, kind.grid if layout == "tokens" else None) == (layout, prefix, grid)


def test_patch_embed_stem_is_a_token_stem():
    assert PatchEmbed(3, 8, 4, (4, 4), True)(torch.zeros(2, 3, 16, 16)).shape == (2, 17, 8)


# ----------------------------------------------------------------------------------------------------- timm
def timm_models() -> dict:
    timm = pytest.importorskip("timm")
    vit = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 3, "num_heads": 2, "num_classes": 10}
    return {
        "test_resnet": lambda: timm.create_model("test_resnet", num_classes=10),
        "test_efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=10),
        "test_convnext": lambda: timm.create_model("test_convnext", num_classes=10),
        "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", **vit),
        "vit_avg_no_class_token": lambda: timm.create_model("vit_tiny_patch16_224", class_token=False,
                                                            global_pool="avg", **vit),
        "deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", **vit),
        "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, embed_dim=8,
                                          depths=(1, 1), num_heads=(1, 2), window_size=2, num_classes=10),
    }


@pytest.mark.parametrize("family", ["test_resnet", "test_efficientnet", "test_convnext", "vit_tiny",
                                    "vit_avg_no_class_token", "deit_distilled", "swin"])
def test_timm_family(family):
    build = timm_models()[family]
    size = 16 if family in ("vit_tiny", "vit_avg_no_class_token", "deit_distilled", "swin") else 32
    x, y = data(size=(size, size))
    check_family(build, x, y, image_size=size)


def test_timm_prefix_tokens_are_the_models():
    build = timm_models()["deit_distilled"]
    model = mlaan.create_local_model(build(), method="dgl", num_local_modules=3)
    assert model.image_shape == (3, 16, 16)  # the size the model was built for
    assert model.feature_kinds[1].prefix_tokens == 2  # class + distillation token


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_trains_exports_and_evaluates_a_torchvision_arch(tmp_path, capsys):
    import json

    import torchvision

    from mlaan.cli import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32",
            "--synthetic-image-size", "16", "--batch-size", "32", "--max-steps", "2", "--epochs", "1",
            "--arch", "torchvision:mobilenet_v3_small", "--image-size", "24", "--method", "dgl+mlaan", "-K", "3",
            "--output-dir", str(out)]
    assert main(args) == 0
    assert main(["export", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "net.pt")]) == 0
    meta = json.loads((tmp_path / "net.json").read_text())
    assert meta["image_size"] == 24 and ".source.load_state_dict" in meta["load_with"]
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    net.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))  # the original class's keys
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "net.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_images"] == 32


def test_cli_evaluates_the_export_of_a_timm_vit(tmp_path, capsys):
    """timm's ViTs name their own layers ``blocks.*`` like mlaan's backbones: eval took their exports for
    backbone weights and refused them (missing ``blocks.0.shell.cls_token``)."""
    import json

    pytest.importorskip("timm")
    from mlaan.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-test-size", "16",
                 "--batch-size", "16", "--max-steps", "1", "--epochs", "1", "--arch", "timm:vit_tiny_patch16_224",
                 "--image-size", "32", "-K", "3", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "net.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "net.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == trained["test_accuracy"]


@pytest.mark.parametrize("arch,message", [
    ("torchvision:nope", "unknown or unsupported torchvision model 'nope'"),
    ("torchvision:nope", "; supported: alexnet, convnext_base, "),  # the names themselves, not where to look them up
    # a name of the library's that really has no cut (its forward does not trace): refused when the model is built
    ("timm:crossvit_tiny_240", "cannot cut a timm.models.crossvit.CrossVit into blocks: "),
    ("timm:not_a_model", "timm"),
    ("timm:vit_tiny_patch16_22", "closest supported: vit_tiny_patch16_224, "),
    ("timm:zzzz", "in all (mlaan.models.library_names('timm') lists them)"),
    ("keras:resnet", "unknown architecture 'keras:resnet'"),
])
def test_cli_refuses_unknown_library_names_in_one_line(tmp_path, capsys, arch, message):
    from mlaan.cli import main

    if arch.startswith("timm:") and ("closest" in message or "cannot cut" in message):
        pytest.importorskip("timm")

    code = main(["train", "--dataset", "synthetic", "--arch", arch, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", ["torchvision:densenet121", "timm:poolformer_s12"])
def test_cli_trains_and_exports_a_graph_cut_library_arch(tmp_path, arch):
    """Every classification builder of torchvision and every timm model is a name: a model no family adapter
    takes is cut by its graph (here DenseNet and PoolFormer), trains, and exports its class's own keys."""
    from mlaan.cli import main

    library, _, name = arch.partition(":")
    if library == "timm":
        timm = pytest.importorskip("timm")
        net = timm.create_model(name, num_classes=10)
    else:
        import torchvision

        net = torchvision.models.get_model(name, num_classes=10)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--synthetic-train-size", "16", "--synthetic-test-size", "8",
                 "--synthetic-image-size", "16", "--batch-size", "8", "--max-steps", "1", "--epochs", "1",
                 "--arch", arch, "--image-size", "32", "--method", "dgl+mlaan", "-K", "3",
                 "--output-dir", str(out)]) == 0
    assert main(["export", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "net.pt")]) == 0
    net.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))  # strict: the class's own keys


def test_library_names_are_the_libraries_classification_models():
    for arch in ("torchvision:densenet121", "torchvision:googlenet", "torchvision:squeezenet1_1",
                 "torchvision:mnasnet0_5"):
        assert mlaan.models.check_arch(arch) == arch
    if importlib.util.find_spec("timm") is not None:
        for arch in ("timm:resnetv2_50", "timm:poolformer_s12", "timm:mixer_b16_224", "timm:levit_128s"):
            assert mlaan.models.check_arch(arch) == arch


def test_library_entries_carry_their_defaults():
    d = mlaan.models.defaults("torchvision:vit_b_16")
    assert d.image_size == 224 and d.mean == (0.485, 0.456, 0.406)
    assert mlaan.models.defaults("resnet32") == mlaan.models.ArchDefaults(32, (0.0,), (1.0,), 16)
    assert mlaan.models.default_local_modules("torchvision:resnet18") == 9  # the stem + 8 blocks, one module each
    assert "vgg11_bn" in mlaan.models.library_names("torchvision")
