"""What a local-learning method is: a small object with one hook, ``make_head``.

The engine asks the method for the auxiliary head of each local module (and, under LAM, for the head that
follows the copied later blocks). Everything else — the split, cascades, EMA twins, the backward schedule —
is the engine's, so a new method is one file that subclasses :class:`LocalMethod` and registers itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn


@dataclass
class LocalOptions:
    """Every knob of the engine and its methods, with the published defaults."""

    window: int = 2  # cascade window w of MLM: modules a cascaded loss reaches
    w_ind: float = 0.001  # weight of the independent loss under MLM
    w_casc: float = 0.999  # weight of the cascaded loss under MLM
    ema_momentum: float = 0.995  # m in θ(E) ← m·θ(E) + (1−m)·θ(real block)
    ema_update: str = "all"  # "all" twins every step, or "last" (the official CIFAR code's behaviour)
    lam_depth: int = 4  # copied later blocks in the earliest LAM aux nets (shrinks toward the output)
    lam_shrink: float = 1.0  # c of the LAM depth schedule: 1.0 ends at one block (one EMA layer of one)
    depth_shrink: float = 0.5  # c in AugLocal's depth schedule (its published value)
    # Classifier shape of every aux head: "linear" (GAP + linear probe, what the official MLAAN code uses, so
    # step times compare with it) or "mlp" (DGL paper's 1×1-conv + MLP classifier; dgl+mlaan at K=16 measured
    # about one BP step more per step with it, BENCHMARKS.md).
    aux_head: str = "linear"
    aux_width: int = 128
    infopro_task: str = "ce"  # "ce" or "contrastive"
    infopro_lambda_recon: tuple[float, float] = (5.0, 0.0)  # λ1 at the first module → at the last
    infopro_lambda_task: tuple[float, float] = (0.5, 0.0)  # λ2 at the first module → at the last
    temperature: float = 0.07
    auglocal_depth: int = 4
    balance: str = "blocks"  # split by block count, or "memory" (InfoPro*)
    balance_batch_size: int = 128  # the training batch whose step memory balance="memory" evens out
    # Recompute in backward instead of keeping activations: the aux nets' blocks (LAM trunks and twins, AugLocal
    # blocks) and the backbone modules whose graphs a cascade window keeps alive. Less peak memory for about one
    # more forward of those blocks (two for the window's modules); results are unchanged.
    grad_checkpointing: bool = False
    image_mean: tuple[float, ...] = (0.0,)
    image_std: tuple[float, ...] = (1.0,)
    extra: dict = field(default_factory=dict)


@dataclass
class AuxContext:
    """What a method needs to know to build the auxiliary head of one local module."""

    module_index: int  # 0-based index of the supervised local module
    num_modules: int  # K
    feature_shape: tuple[int, ...]  # (C, H, W) of the features the head receives
    num_classes: int
    image_shape: tuple[int, int, int]
    options: LocalOptions
    # Fresh (re-initialised) copies of sampled later backbone blocks, shape-chained, for methods whose aux net
    # is made of backbone-like blocks (AugLocal): ``later_blocks(depth) -> (blocks, output feature shape)``.
    later_blocks: Callable[[int], tuple[list[nn.Module], tuple[int, ...]]]

    def interpolate(self, pair: tuple[float, float]) -> float:
        """Linear in the module index: ``pair[0]`` at the first module, ``pair[1]`` at the last (head) one."""
        if self.num_modules <= 1:
            return pair[0]
        t = self.module_index / (self.num_modules - 1)
        return pair[0] + (pair[1] - pair[0]) * t

    def depth(self, depth: int, shrink: float | None = None) -> int:
        """AugLocal's schedule: d_i = max(1, round(d·(1 − i·c/(K−2)) + i·c/(K−2))), c = ``shrink``."""
        c = self.options.depth_shrink if shrink is None else shrink
        if self.num_modules <= 2:
            return depth
        r = self.module_index * c / (self.num_modules - 2)
        return max(1, int(depth * (1 - r) + r + 0.5))


class LocalMethod:
    """Base class; subclasses set ``name``/``description`` and implement :meth:`make_head`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    end_to_end: ClassVar[bool] = False  # True for BP: a single module, no auxiliary heads
    listing_order: ClassVar[int] = 100  # position in help texts and error messages (baselines first)
    aux_blocks: ClassVar[bool] = False  # True when the aux net stacks backbone-like blocks (AugLocal)

    def make_head(self, ctx: AuxContext) -> nn.Module:
        """Return a module called as ``head(features, images, targets) -> scalar loss``."""
        raise NotImplementedError
