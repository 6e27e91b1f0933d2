"""InfoPro's local loss (:class:`InfoProLoss`) and the supervised contrastive loss of its contrastive task.

The method itself, its options and its ``make_head`` are in :mod:`mlaan.engine.methods.infopro`, which imports
this module (and torch) only when a head is built; the leading underscore keeps the method discovery from
importing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import make_classifier


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
