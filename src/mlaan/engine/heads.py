"""Auxiliary heads: small networks that turn a module's features into a local loss.

Every head has the same call, ``head(features, images, targets) -> scalar loss``, so methods, LAM trunks
and the training schedule compose without knowing which loss is inside. ``images`` are the normalised
inputs; heads that need pixels (InfoPro's decoder) un-normalise them with the data set's mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .recompute import run_blocks

AUX_HEAD_SHAPES = ("mlp", "linear")


def make_classifier(channels: int, num_classes: int, shape: str = "mlp", width: int = 128) -> nn.Module:
    """Logits from a feature map.

    ``linear``: global average pooling + linear (the probe the official MLAAN code uses).
    ``mlp``: DGL's auxiliary classifier — spatial averaging (to at most 8×8, so its cost stays a fraction of a
    residual block at any resolution), two 1×1 conv–BN–ReLU layers of ``width`` channels, global pooling and a
    two-layer MLP.
    """
    if shape == "linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    if shape == "mlp":
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
    raise ValueError(f"unknown aux_head {shape!r}; allowed: {', '.join(AUX_HEAD_SHAPES)}")


class _SpatialAverage(nn.Module):
    """Average-pool down to ``max_size``×``max_size`` only when the map is larger."""

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] <= self.max_size and x.shape[-2] <= self.max_size:
            return x
        return F.adaptive_avg_pool2d(x, (min(x.shape[-2], self.max_size), min(x.shape[-1], self.max_size)))


class ClassifierLoss(nn.Module):
    """Cross-entropy of an auxiliary classifier (DGL's local loss)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, features: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(features), targets)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores (B, num_classes) of the features: what this aux net predicts."""
        return self.classifier(features)


def supervised_contrastive_loss(
    embeddings: torch.Tensor, targets: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one view; anchors without a positive are skipped."""
    z = F.normalize(embeddings.float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (targets[:, None] == targets[None, :]) & ~self_mask
    counts = positives.sum(1)
    has_positive = counts > 0
    if not has_positive.any():
        return embeddings.sum() * 0.0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[has_positive] / counts[has_positive]
    return -mean_log_prob.mean()


class InfoProLoss(nn.Module):
    """InfoPro's local loss: λ1 · reconstruction + λ2 · task.

    Reconstruction: bilinear upsampling to the image size, conv–BN–ReLU, conv to the image channels; binary
    cross-entropy (on logits, which is autocast-safe) against the un-normalised image. Task: an auxiliary
    classifier's cross-entropy, or a supervised contrastive loss on a 128-d projection.
    """

    def __init__(
        self,
        channels: int,
        image_shape: tuple[int, int, int],
        num_classes: int,
        lambda_recon: float,
        lambda_task: float,
        task: str = "ce",
        head_shape: str = "mlp",
        width: int = 128,
        temperature: float = 0.07,
        image_mean: tuple[float, ...] = (0.0,),
        image_std: tuple[float, ...] = (1.0,),
    ) -> None:
        super().__init__()
        if task not in ("ce", "contrastive"):
            raise ValueError(f"unknown infopro_task {task!r}; allowed: ce, contrastive")
        image_channels, height, width_px = image_shape
        self.image_size = (height, width_px)
        self.lambda_recon, self.lambda_task = lambda_recon, lambda_task
        self.task, self.temperature = task, temperature
        hidden = 12
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, image_channels, 3, padding=1),
        )
        outputs = num_classes if task == "ce" else 128
        self.task_head = make_classifier(channels, outputs, head_shape, width)
        self.register_buffer("mean", _per_channel(image_mean, image_channels), persistent=False)
        self.register_buffer("std", _per_channel(image_std, image_channels), persistent=False)

    def forward(self, features: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(features, size=self.image_size, mode="bilinear", align_corners=True)
        recon_logits = self.decoder(upsampled)
        pixels = (images * self.std + self.mean).clamp(0.0, 1.0)
        recon = F.binary_cross_entropy_with_logits(recon_logits.float(), pixels.float())
        task_out = self.task_head(features)
        if self.task == "ce":
            task_loss = F.cross_entropy(task_out, targets)
        else:
            task_loss = supervised_contrastive_loss(task_out, targets, self.temperature)
        return self.lambda_recon * recon + self.lambda_task * task_loss

    def logits(self, features: torch.Tensor) -> torch.Tensor | None:
        """Class scores (B, num_classes) of the task head; None for the contrastive task (it embeds, not
        classifies)."""
        return self.task_head(features) if self.task == "ce" else None


def _per_channel(values: tuple[float, ...], channels: int) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"image mean/std has {t.numel()} values for {channels} image channels")
    return t.reshape(1, channels, 1, 1).clone()


class StackedLoss(nn.Module):
    """Blocks in front of a loss head: AugLocal's aux net, or a LAM trunk followed by the method's head."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.grad_checkpointing = False  # recompute each trunk block in backward (``mlaan.engine.recompute``)

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.grad_checkpointing = enable
        if hasattr(self.trunk, "grad_checkpointing"):  # a LAM trunk checkpoints its own blocks and twin
            self.trunk.grad_checkpointing = enable

    def forward(self, features: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and isinstance(self.trunk, nn.Sequential):
            features = run_blocks(self.trunk, features, grad_checkpointing=True)
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
