"""Feature kinds: what a block's output is, told from its profiled shape, and what an aux head needs of it.

A block may output (shapes without the batch dimension):

- ``map``: a feature map (C, H, W) — CNNs;
- ``channels_last``: a feature map (H, W, C) — Swin and other channels-last models;
- ``tokens``: a token sequence (N, D), optionally with ``prefix_tokens`` (a class token, register tokens) before
  the patch tokens, which lie on a ``grid`` (gh, gw) in row-major order — vision transformers;
- ``vector``: a vector (D,) — an MLP on flattened images.

Aux heads pool a kind to a vector (:class:`TokenPool` for tokens); InfoPro's decoder lays it back on a map
(:func:`to_map`). A backbone may declare its layout and prefix tokens (adapters do,
:class:`~mlaan.models.Backbone`); otherwise they are inferred here from the shape and the image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FEATURE_LAYOUTS = ("map", "channels_last", "tokens", "vector")
MAX_PREFIX_TOKENS = 8  # class token + register tokens looked for when a backbone does not declare them


@dataclass(frozen=True)
class FeatureKind:
    """A block output's kind (see the module doc): ``layout`` in :data:`FEATURE_LAYOUTS`, its ``shape`` without
    the batch dimension, the prefix tokens and the patch grid (tokens), or the spatial size (maps)."""

    layout: str
    shape: tuple[int, ...]
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None

    @property
    def channels(self) -> int:
        """Channels of a map, width D of a token or a vector."""
        return self.shape[-1] if self.layout in ("channels_last", "tokens", "vector") else self.shape[0]

    @property
    def spatial(self) -> tuple[int, int] | None:
        """(H, W) of a map, the patch grid of tokens (None when the tokens lie on no known grid), None for a
        vector."""
        if self.layout == "map":
            return self.shape[1], self.shape[2]
        if self.layout == "channels_last":
            return self.shape[0], self.shape[1]
        return self.grid


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1.0)


def _token_grid(n: int, image_hw: tuple[int, int]) -> tuple[int, int] | None:
    """(H // s, W // s) for the smallest patch stride s whose grid has ``n`` cells, None when none does."""
    h, w = image_hw
    for s in range(1, max(h, w) + 1):
        gh, gw = h // s, w // s
        if gh * gw == n and gh >= 1 and gw >= 1:
            return gh, gw
        if gh * gw < n:
            return None
    return None


def classify(shape: tuple[int, ...], image_hw: tuple[int, int], layout: str | None = None,
             prefix_tokens: int | None = None) -> FeatureKind:
    """The kind of a block output of ``shape`` (no batch dimension) for images of ``image_hw`` (H, W).

    ``layout`` (one of :data:`FEATURE_LAYOUTS`) and ``prefix_tokens`` are what the backbone declares, or None to
    infer them: a 1-D shape is a vector, a 2-D one tokens (prefix tokens: the fewest, up to
    :data:`MAX_PREFIX_TOKENS`, that leave a patch grid of the image's aspect), a 3-D one a map, channels-last
    when its first two sizes follow the image's aspect ratio and its last two do not. Raises ValueError for a
    shape of another rank or one that contradicts a declared layout."""
    shape = tuple(int(s) for s in shape)
    if layout is not None and layout not in FEATURE_LAYOUTS:
        raise ValueError(f"unknown feature layout {layout!r}; allowed: {', '.join(FEATURE_LAYOUTS)}")
    h, w = image_hw
    if len(shape) == 1:
        return FeatureKind("vector", shape)
    if len(shape) == 2:
        n = shape[0]
        candidates = [prefix_tokens] if prefix_tokens is not None else range(min(n, MAX_PREFIX_TOKENS + 1))
        for p in candidates:
            grid = _token_grid(n - p, (h, w)) if n - p >= 1 else None
            if grid is not None:
                return FeatureKind("tokens", shape, p, grid)
        return FeatureKind("tokens", shape, prefix_tokens or 0, None)
    if len(shape) == 3:
        if layout in ("map", "channels_last"):
            return FeatureKind(layout, shape)
        if layout is not None:
            raise ValueError(f"a {layout} feature cannot have the 3-d shape {shape}")
        aspect = h / w
        first_two, last_two = _close(shape[0] / shape[1], aspect), _close(shape[1] / shape[2], aspect)
        return FeatureKind("channels_last" if first_two and not last_two else "map", shape)
    raise ValueError(f"features of shape {shape} are none of (C, H, W), (H, W, C), (N, D) or (D,)")


def to_map(x: torch.Tensor, kind: FeatureKind) -> torch.Tensor:
    """Features (B, *kind.shape) as a map (B, C, H, W): channels-last permuted, patch tokens laid back on their
    grid (prefix tokens dropped), a vector as a 1×1 map. ValueError for tokens on no known grid."""
    if kind.layout == "map":
        return x
    if kind.layout == "channels_last":
        return x.permute(0, 3, 1, 2)
    if kind.layout == "vector":
        return x[:, :, None, None]
    if kind.grid is None:
        raise ValueError(f"{kind.shape[0]} tokens lie on no patch grid of the image; cannot lay them on a map")
    patches = x[:, kind.prefix_tokens:]
    return patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], *kind.grid)


class ToMap(nn.Module):
    """:func:`to_map` as a module (no parameters)."""

    def __init__(self, kind: FeatureKind) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_map(x, self.kind)


class TokenPool(nn.Module):
    """Tokens (B, N, D) → (B, D): LayerNorm over D, then the class token when there are prefix tokens, else the
    mean of the tokens — the pooling of ViT/DeiT heads (``global_pool='token'``) and of class-token-free ones
    (``'avg'``)."""

    def __init__(self, dim: int, prefix_tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.prefix_tokens = prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x[:, 0] if self.prefix_tokens > 0 else x.mean(dim=1)
