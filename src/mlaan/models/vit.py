"""Small vision transformers for small images: timm's ``VisionTransformer`` at a patch size that suits 32-pixel
images, cut like any ``timm:`` ViT (stem = patch embedding + class token + position embedding, one block per
transformer block, head = final LayerNorm + linear on the class token). Needs timm (``pip install 'mlaan[timm]'``).

``timm:vit_tiny_patch16_224`` at ``--image-size 32`` sees 2×2 = 4 patches; these see 8×8 = 64. Each entry's facts
sit beside its definition (:data:`VIT_SPECS`), as timm's model configs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at import: the model registry (and `mlaan --help`) reads VIT_SPECS without torch
    from .backbone import Backbone


@dataclass(frozen=True)
class ViTSpec:
    """A small ViT's shape and defaults: ``embed_dim``, ``depth`` (transformer blocks), ``num_heads``,
    ``patch_size`` (pixels), ``image_size`` (its default side) and ``local_modules`` (default K)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    image_size: int
    local_modules: int
    note: str


VIT_SPECS: dict[str, ViTSpec] = {
    # ViT-Ti/4 at 32 px: ViT-Ti's shape (Touvron et al. 2021, DeiT-Ti: 192 wide, 12 blocks, 3 heads, MLP 768)
    # with 4-pixel patches, 64 patch tokens + 1 class token; 5.4 M parameters. K=4: 3 blocks a module, MAN++'s
    # split of 12-block ViTs (the stem rides with the first module's blocks).
    "vit_tiny_patch4_32": ViTSpec(192, 12, 3, 4, 32, 4, "ViT-Ti, 4-px patches, 32 px"),
    # Half as deep for CPU budgets: 6 blocks, 2.7 M parameters; K=3: 2 blocks a module.
    "vit_tiny6_patch4_32": ViTSpec(192, 6, 3, 4, 32, 3, "ViT-Ti's width, 6 blocks, 4-px patches, 32 px"),
    # Sized for a CPU's accuracy study (BENCHMARKS "Transformers"): ViT-Ti's depth and split (12 blocks, K=4,
    # 3 blocks a module), half its width (96, 3 heads of 32), 8-pixel patches: 16 patch tokens + class token;
    # 1.35 M parameters, about 0.3 s an AdamW step of 128 images on one CPU thread (ViT-Ti/4: 4.5 s).
    "vit_micro_patch8_32": ViTSpec(96, 12, 3, 8, 32, 4, "ViT-Ti's depth, 96 wide, 8-px patches, 32 px"),
    # Sized to train to convergence on a CPU thread within hours (issue 32's converged study): ViT-Ti's depth and
    # split again, a third of its width (64, 2 heads of 32), 8-pixel patches: 16 patch tokens + class token;
    # 0.6 M parameters, about 0.23 s an AdamW step of 128 images on one CPU thread.
    "vit_nano_patch8_32": ViTSpec(64, 12, 2, 8, 32, 4, "ViT-Ti's depth, 64 wide, 8-px patches, 32 px"),
}


def small_vit(name: str, num_classes: int = 10, in_channels: int = 3,
              image_size: int | tuple[int, int] = 32) -> Backbone:
    """The ViT ``name`` of :data:`VIT_SPECS` (random init, timm's), built for ``image_size`` (a multiple of its
    patch size) and cut into a :class:`Backbone`; batches of another size are resized to it. ValueError without
    timm."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise ValueError(f"architecture {name!r} is timm's VisionTransformer: pip install 'mlaan[timm]'") from None
    from .adapters import adapt

    spec = VIT_SPECS[name]
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if any(side % spec.patch_size for side in hw):
        raise ValueError(f"{name}: image_size {image_size} is not a multiple of its patch size {spec.patch_size}")
    model = VisionTransformer(img_size=hw, patch_size=spec.patch_size, in_chans=in_channels,
                              num_classes=num_classes, embed_dim=spec.embed_dim, depth=spec.depth,
                              num_heads=spec.num_heads, mlp_ratio=4.0)
    backbone = adapt(model, image_size=image_size, in_channels=in_channels, name=name)
    backbone.resize_inputs = True  # position embeddings fix the token count: other sizes are resized to it
    return backbone
