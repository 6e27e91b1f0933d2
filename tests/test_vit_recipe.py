"""The transformer recipe (issue 32): the registered small ViTs (timm's VisionTransformer at 4-pixel patches),
``configs/fashion_mnist_vit_tiny_*.yaml`` (one recipe for bp and the local methods: AdamW with its no-decay
groups, warm-up + cosine, label smoothing, clipping), each of which loads and trains a step on synthetic data,
and the MAN++-sized LAM trunk (``lam_depth=2``: two learnable blocks and one EMA twin a module)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

import mlaan  # noqa: E402
from mlaan import models  # noqa: E402
from mlaan.cli import main  # noqa: E402
from mlaan.engine.lam import LeapTrunk  # noqa: E402
from mlaan.training.config import load_yaml, merge  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VIT_CONFIGS = {"bp": "fashion_mnist_vit_tiny_bp.yaml", "dgl": "fashion_mnist_vit_tiny_dgl.yaml",
               "dgl+mlaan": "fashion_mnist_vit_tiny_dgl_mlaan.yaml"}
RECIPE = {"dataset": "fashion-mnist", "arch": "vit_tiny_patch4_32", "opt": "adamw", "betas": (0.9, 0.999),
          "weight_decay": 0.05, "filter_bias_and_bn": True, "label_smoothing": 0.1, "clip_grad": 1.0}
SHARED = ("dataset", "arch", "epochs", "batch_size", "opt", "lr", "betas", "weight_decay", "filter_bias_and_bn",
          "warmup_epochs", "label_smoothing", "clip_grad", "mixup", "cutmix")


def test_the_registered_small_vit_is_timm_vit_tiny_at_4_pixel_patches():
    backbone = models.create("vit_tiny_patch4_32", num_classes=10, in_channels=1)
    source = backbone.source
    assert type(source).__name__ == "VisionTransformer" and source.patch_embed.patch_size == (4, 4)
    assert source.embed_dim == 192 and len(source.blocks) == 12 and source.blocks[0].attn.num_heads == 3
    assert backbone.num_residual_blocks == 12 and backbone.prefix_tokens == 1
    assert models.default_local_modules("vit_tiny_patch4_32") == 4
    assert models.defaults("vit_tiny_patch4_32").image_size == 32
    tokens = backbone.blocks[0](torch.zeros(2, 1, 32, 32))
    assert tokens.shape == (2, 65, 192)  # 8x8 patches + the class token
    assert models.create("vit_tiny6_patch4_32").num_residual_blocks == 6
    with pytest.raises(ValueError, match="multiple of its patch size"):
        models.create("vit_tiny_patch4_32", image_size=30)


def test_position_embedding_class_token_norms_and_biases_are_not_decayed():
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation
        model = mlaan.create_local_model("vit_tiny_patch4_32", "dgl+mlaan", num_local_modules=4, in_channels=1,
                                         lam_depth=2)
    assert model.no_weight_decay() == {"backbone.blocks.0.shell.cls_token", "backbone.blocks.0.shell.pos_embed"}
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.blocks.0.shell.cls_token", "backbone.blocks.0.shell.pos_embed"} <= undecayed
    params = dict(model.named_parameters())
    assert all(params[n].ndim <= 1 or n.endswith((".cls_token", ".pos_embed")) for n in undecayed)  # norms, biases
    assert all(p.ndim >= 2 for p in decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)  # EMA twins in neither


def test_the_three_configs_share_one_recipe_and_differ_only_in_method_and_split():
    loaded = {method: load_yaml(CONFIGS / name) for method, name in VIT_CONFIGS.items()}
    for method, values in loaded.items():
        assert {k: values[k] for k in RECIPE} == RECIPE, method
        assert values["method"] == method
        cfg = merge(values).resolve()  # every value checked as a run would
        assert cfg.local_modules == (1 if method == "bp" else 4)
    for key in SHARED:
        assert len({json.dumps(values[key]) for values in loaded.values()}) == 1, key
    assert loaded["dgl+mlaan"]["lam_depth"] == 2 and loaded["dgl+mlaan"]["window"] == 2


@pytest.mark.parametrize("method", list(VIT_CONFIGS))
def test_each_config_trains_a_step_on_synthetic_data(method, tmp_path):
    out = tmp_path / "run"
    extra = ["--mixup", "0.8", "--cutmix", "1.0"] if method == "dgl+mlaan" else []  # the optional mixup path
    code = main(["train", "--config", str(CONFIGS / VIT_CONFIGS[method]), "--dataset", "synthetic",
                 "--train-samples", "16", "--synthetic-test-size", "16", "--batch-size", "8", "--epochs", "1",
                 "--max-steps", "1", "--threads", "1", "--output-dir", str(out), *extra])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    config = summary["config"]
    assert summary["steps"] == 1 and config["method"] == method and config["arch"] == "vit_tiny_patch4_32"
    assert config["opt"] == "adamw" and config["label_smoothing"] == 0.1 and config["clip_grad"] == 1.0
    assert config["local_modules"] == (1 if method == "bp" else 4)
    assert 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.parametrize("k", [4, 13])
def test_lam_depth_2_bounds_each_trunk_to_two_learnable_blocks_and_one_ema_twin(k):
    with torch.device("meta"):  # shapes only
        model = mlaan.create_local_model("vit_tiny_patch4_32", "dgl+mlaan", num_local_modules=k, in_channels=1,
                                         lam_depth=2)
        default = mlaan.create_local_model("vit_tiny_patch4_32", "dgl+mlaan", num_local_modules=k, in_channels=1)
    trunks = [m for m in model.modules() if isinstance(m, LeapTrunk)]
    assert len(trunks) == k - 2  # a cascaded aux net for modules 1 to K-2 (module 0: none; the last: the head)
    block_params = sum(p.numel() for p in model.backbone.blocks[1].parameters())
    for trunk in trunks:
        assert 1 <= len(trunk.copies) <= 2
        assert sum(p.numel() for p in trunk.twin.module.parameters()) == block_params  # one EMA twin
        assert not any(p.requires_grad for p in trunk.twin.parameters())
    # the default (lam_depth 4) copies more (K=13: four blocks early on, K=4: three in module 1)
    assert max(len(t.copies) for t in default.modules() if isinstance(t, LeapTrunk)) > 2
