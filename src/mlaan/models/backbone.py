"""A backbone as the engine sees it: an ordered list of blocks (stem, residual blocks, head).

Keeping the network a flat ``nn.ModuleList`` is what lets the engine cut it anywhere: a split into local
modules is just a list of index ranges, and the plain backbone's ``state_dict`` stays loadable into an
ordinary model of the same architecture (keys are ``blocks.<i>.…``).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierHead(nn.Sequential):
    """Global average pooling, flatten, linear: the head every ResNet here ends with."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))


class Backbone(nn.Module):
    """``blocks[0]`` is the stem, ``blocks[1:-1]`` the residual blocks, ``blocks[-1]`` the head.

    ``image_size``: the training images' side, or (H, W). ``in_channels``: the images' channels (None: read from
    the first convolution or linear layer). ``feature_layout`` ("map" or "channels_last") and ``prefix_tokens``
    declare what the blocks output (None: inferred, :func:`mlaan.engine.features.classify`). ``source``: the
    user's model the blocks were cut from (an adapter's, :func:`mlaan.models.adapt`), sharing its parameters;
    it is not a submodule, and :meth:`export_state_dict` writes its state_dict.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        name: str = "custom",
        image_size: int | tuple[int, int] = 32,
        in_channels: int | None = None,
        feature_layout: str | None = None,
        prefix_tokens: int | None = None,
        source: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) < 2:
            raise ValueError(f"a backbone needs at least a stem and a head, got {len(blocks)} block(s)")
        self.blocks = nn.ModuleList(blocks)
        self.name = name
        self.image_size = image_size
        _ = self.image_hw  # checks image_size
        self.in_channels = in_channels
        self.feature_layout = feature_layout
        self.prefix_tokens = prefix_tokens
        self.__dict__["source"] = source  # not a submodule: its parameters are the blocks' own
        # resize image batches of another size to image_size (bilinear) in forward: a model trained at
        # --image-size on a data set of another size (set by mlaan.models.create for torchvision:/timm: names,
        # and for a registered arch given an image_size)
        self.resize_inputs = False
        # warn (once) when a batch is resized: silent resizing hides a wrong image_size or data set. Off where the
        # caller asked for the resize (mlaan train --image-size; mlaan eval on the run's own data set)
        self.warn_on_resize = True

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, C, H, W) resized to ``image_hw`` when :attr:`resize_inputs` and their size differs; the
        first such batch is warned of (:attr:`warn_on_resize`)."""
        if self.resize_inputs and images.dim() == 4 and tuple(images.shape[-2:]) != self.image_hw:
            self._warn_resize(tuple(images.shape[-2:]))
            return F.interpolate(images, size=self.image_hw, mode="bilinear", align_corners=False, antialias=True)
        return images

    def _warn_resize(self, hw: tuple[int, ...]) -> None:
        """A UserWarning naming both sizes, the first time only (a warning per batch would drown the output)."""
        if not self.warn_on_resize:
            return
        self.warn_on_resize = False
        (h, w), (th, tw) = hw, self.image_hw
        warnings.warn(f"{self.name} was built for {th}x{tw} images but got a batch of {h}x{w}: batches are resized "
                      f"to {th}x{tw} (bilinear; said once)", UserWarning, stacklevel=3)

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the training images. ValueError for an ``image_size`` that is not a positive side or pair."""
        size = self.image_size
        hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
        if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hw):
            raise ValueError(f"image_size must be a positive int or a pair (H, W) of them, got {size!r}")
        return hw

    def export_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights as the original model's class names them: ``source.state_dict()`` when the blocks were cut
        from a model (``state``, a state_dict of this backbone, e.g. from a checkpoint, renamed key by key), else
        this backbone's own (keys ``blocks.<i>.…``). Raises ValueError when a source tensor is in no block."""
        own = self.state_dict(keep_vars=True)
        if self.source is None:
            return {k: v.detach() for k, v in own.items()} if state is None else dict(state)
        by_id = {id(v): k for k, v in own.items()}
        source = self.source.state_dict(keep_vars=True)
        out = OrderedDict()
        for key, value in source.items():
            if id(value) not in by_id:
                raise ValueError(f"{self.name}: {key} of the source model is in none of the backbone's blocks")
            out[key] = value.detach() if state is None else state[by_id[id(value)]]
        if hasattr(source, "_metadata"):  # versions some classes' loading reads (torchvision MNASNet's)
            out._metadata = source._metadata
        return out

    @property
    def num_residual_blocks(self) -> int:
        """Blocks between stem and head; a split may have 1 to this + 1 modules."""
        return len(self.blocks) - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resize(x)
        for block in self.blocks:
            x = block(x)
        return x
