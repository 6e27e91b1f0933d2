"""Auxiliary heads: small networks that turn a module's features into a local loss.

Every head has the same call, ``head(features, images, targets) -> scalar loss``, so methods, LAM trunks
and the training schedule compose without knowing which loss is inside. ``images`` are the normalised
inputs. A method's own loss lives in its method file (InfoPro's in ``methods/infopro.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureKind, TokenPool, ToMap
from .options import AUX_HEAD_SHAPES
from .phases import AUX_TRUNK_FORWARD, mark
from .recompute import run_trunk


def _linear_classifier(channels: int, num_classes: int, width: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _mlp_classifier(channels: int, num_classes: int, width: int) -> nn.Module:
    return nn.Sequential(
        _SpatialAverage(8),
        nn.Conv2d(channels, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, width),
        nn.ReLU(inplace=True),
        nn.Linear(width, num_classes),
    )


_CLASSIFIERS = {"mlp": _mlp_classifier, "linear": _linear_classifier}
assert AUX_HEAD_SHAPES == tuple(_CLASSIFIERS), "the aux_head values EngineOptions accepts are the shapes built here"


def make_classifier(channels: int, num_classes: int, shape: str = "mlp", width: int = 128) -> nn.Module:
    """Logits (B, num_classes) from a feature map (B, channels, H, W).

    ``linear``: global average pooling + linear (the probe the official MLAAN code uses).
    ``mlp``: DGL's auxiliary classifier — spatial averaging (to at most 8×8, so its cost stays a fraction of a
    residual block at any resolution), two 1×1 conv–BN–ReLU layers of ``width`` channels, global pooling and a
    two-layer MLP. ``shape`` is one of :data:`AUX_HEAD_SHAPES` (KeyError otherwise).
    """
    return _CLASSIFIERS[shape](channels, num_classes, width)


def _token_classifier(kind: FeatureKind, num_classes: int, shape: str, width: int) -> nn.Module:
    dim = kind.channels
    pool = TokenPool(dim, kind.prefix_tokens)
    if shape == "linear":
        return nn.Sequential(pool, nn.Linear(dim, num_classes))
    return nn.Sequential(pool, nn.Linear(dim, width), nn.GELU(), nn.Linear(width, num_classes))


def _vector_classifier(kind: FeatureKind, num_classes: int, shape: str, width: int) -> nn.Module:
    dim = kind.channels
    if shape == "linear":
        return nn.Linear(dim, num_classes)
    return nn.Sequential(nn.Linear(dim, width), nn.ReLU(inplace=True), nn.Linear(width, width), nn.ReLU(inplace=True),
                         nn.Linear(width, num_classes))


def make_feature_classifier(kind: FeatureKind, num_classes: int, shape: str = "mlp", width: int = 128) -> nn.Module:
    """Logits (B, num_classes) from features of any kind (:mod:`mlaan.engine.features`).

    Maps: :func:`make_classifier`; channels-last maps are permuted to (B, C, H, W) first. Tokens (B, N, D): the
    head of a vision transformer — LayerNorm, the class token (mean of the tokens when there is none), then
    ``linear``: one linear layer, ``mlp``: linear–GELU–linear of ``width`` hidden units. Vectors (B, D):
    ``linear``, or an MLP of two ``width`` hidden layers. ``shape`` is one of :data:`AUX_HEAD_SHAPES`.
    """
    if shape not in _CLASSIFIERS:
        raise KeyError(shape)
    if kind.layout == "map":
        return make_classifier(kind.channels, num_classes, shape, width)
    if kind.layout == "channels_last":
        return nn.Sequential(ToMap(kind), make_classifier(kind.channels, num_classes, shape, width))
    if kind.layout == "tokens":
        return _token_classifier(kind, num_classes, shape, width)
    return _vector_classifier(kind, num_classes, shape, width)


class _SpatialAverage(nn.Module):
    """Average-pool down to ``max_size``×``max_size`` only when the map is larger."""

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] <= self.max_size and x.shape[-2] <= self.max_size:
            return x
        return F.adaptive_avg_pool2d(x, (min(x.shape[-2], self.max_size), min(x.shape[-1], self.max_size)))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The cross-entropy every built-in loss uses: ``targets`` are class indices (B,), smoothed by
    ``label_smoothing``, or probabilities (B, C) (timm's Mixup/CutMix targets), used as given and in fp32 (they
    carry their own smoothing)."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return F.cross_entropy(logits.float(), targets.float())


class ClassifierLoss(nn.Module):
    """Cross-entropy of an auxiliary classifier (DGL's local loss), :func:`cross_entropy` with
    ``label_smoothing``."""

    def __init__(self, classifier: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.classifier = classifier
        self.label_smoothing = label_smoothing

    def forward(self, features: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self.classifier(features), targets, self.label_smoothing)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores (B, num_classes) of the features: what this aux net predicts."""
        return self.classifier(features)


class StackedLoss(nn.Module):
    """Blocks in front of a loss head: AugLocal's aux net, or a LAM trunk followed by the method's head."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.grad_checkpointing = False  # recompute each trunk block in backward (``mlaan.engine.recompute``)
        self.lead_only = False  # with it, only the trunk's first block (checkpoint_trunk="lead")

    def set_grad_checkpointing(self, enable: bool, lead_only: bool = False) -> None:
        """Recompute the trunk's blocks in backward (``enable``): every one, or with ``lead_only`` the first."""
        self.grad_checkpointing, self.lead_only = enable, lead_only
        if hasattr(self.trunk, "grad_checkpointing"):  # a LAM trunk checkpoints its own blocks and twin
            self.trunk.grad_checkpointing, self.trunk.lead_only = enable, lead_only

    def forward(self, features: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with mark(AUX_TRUNK_FORWARD):
            if self.grad_checkpointing and isinstance(self.trunk, nn.Sequential):
                features = run_trunk(self.trunk, features, True, self.lead_only)
            else:
                features = self.trunk(features)
        return self.head(features, images, targets)

    def logits(self, features: torch.Tensor) -> torch.Tensor | None:
        """The head's class scores after the trunk (None where the head has none)."""
        return aux_logits(self.head, self.trunk(features))


def aux_logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor | None:
    """Class scores (B, num_classes) an auxiliary head predicts from ``features``, or None when it does not
    classify (a contrastive head, or a method's own head without a ``logits`` method)."""
    logits = getattr(head, "logits", None)
    return logits(features) if callable(logits) else None
