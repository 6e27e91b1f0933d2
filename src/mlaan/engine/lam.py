"""LAM, Leap Augmented Modules: aux nets built from copies of later backbone blocks, whose first copied
block is augmented by an EMA twin of the real block, so early modules learn against what later ones compute
(:class:`LeapTrunk`, the paper's, ``lam_trunk="copies"``). ``lam_trunk="twins"`` keeps the later blocks and drops
the copies: the trunk is the EMA twins of the later blocks alone (:class:`TwinTrunk`), one twin per block shared
by every trunk that passes through it (:class:`TwinBank`), so the aux nets hold no trainable trunk and at most
one frozen backbone's worth of weights, whatever K. ``lam_trunk="copy+twins"`` keeps one trained copy, of the
first later block, ahead of the twins.

Also home of the block sampler shared with AugLocal: pick ``depth`` later blocks uniformly, always starting
with the block right after the module and always including every block that changes shape, so that the
chain of picked blocks fits together.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .recompute import checkpointed, run_blocks, run_trunk
from .split import BlockProfile


def sample_later_blocks(last_unit: int, depth: int, num_units: int, profile: BlockProfile) -> list[int]:
    """Indices of ``depth`` blocks after ``last_unit`` (units are ``blocks[:num_units]``, the head excluded).

    AugLocal's uniform sampling, index round(l + (n − l − 1)/d · i) for i = 1..d, plus two rules that make the
    chain shape-consistent: the first pick is ``last_unit + 1`` (its input is the module's output), and every
    shape-changing block up to the last pick is included; if those alone exceed ``depth`` the chain is cut short.
    """
    later = list(range(last_unit + 1, num_units))
    if not later or depth < 1:
        return []
    depth = min(depth, len(later))
    step = (num_units - last_unit - 1) / depth
    targets = sorted({int(last_unit + step * i + 0.5) for i in range(1, depth + 1)} & set(later))
    end = max(targets)
    mandatory = [last_unit + 1] + [t for t in range(last_unit + 2, end + 1) if profile.changes_shape(t)]
    if len(mandatory) >= depth:
        return mandatory[:depth]
    preferred = [t for t in reversed(targets) if t not in mandatory]
    fillers = [t for t in range(end, last_unit + 1, -1) if t not in mandatory and t not in preferred]
    chosen = (preferred + fillers)[: depth - len(mandatory)]
    return sorted(mandatory + chosen)


def lam_picks(last_unit: int, depth: int, num_units: int, profile: BlockProfile, sampling: str = "uniform"
              ) -> list[int]:
    """The later blocks a LAM trunk of ``depth`` runs after the unit ``last_unit``: ``"uniform"``
    (:func:`sample_later_blocks`, the paper's) or ``"adjacent"``, the ``depth`` blocks right after it (cut short
    at the head), each fed what it is fed in the backbone."""
    if sampling == "adjacent":
        return list(range(last_unit + 1, min(last_unit + 1 + max(depth, 0), num_units)))
    return sample_later_blocks(last_unit, depth, num_units, profile)


def reinitialised_copy(block: nn.Module) -> nn.Module:
    """A block of the same shape with fresh parameters (AugLocal's "new blocks")."""
    fresh = copy.deepcopy(block)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    return fresh


class EMATwin(AveragedModel):
    """An exponential moving average of a real backbone block, parameters and BatchNorm buffers alike.

    It never gets a gradient nor an optimizer update; :meth:`follow` applies θ ← m·θ + (1−m)·θ(real).
    In training its BatchNorms normalise with batch statistics (as the real block does) without touching
    their running buffers, which only the EMA moves.
    """

    def __init__(self, source: nn.Module, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {momentum}")
        super().__init__(source, multi_avg_fn=get_ema_multi_avg_fn(momentum), use_buffers=True)
        self.momentum = momentum
        # The twin starts as an exact copy, which counts as the first average: the very first update is
        # already m·old + (1−m)·new rather than AveragedModel's initial copy.
        self.n_averaged.fill_(1)
        self.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.track_running_stats = False

    @torch.no_grad()
    def follow(self, source: nn.Module) -> None:
        self.update_parameters(source)


class LeapTrunk(nn.Module):
    """Copies A₁…A_d of later blocks; a₁ = A₁(z) + E₁(z) with E₁ the EMA twin of the real block A₁ copies.

    With ``lag=1`` the twin follows its real block as it was one step earlier: :attr:`source_snapshot` (no
    gradient, in the state_dict) holds the block's parameters and buffers from the previous step. Module
    parallelism needs that lag when the real block is trained on another rank.
    """

    def __init__(self, blocks: list[nn.Module], source_index: int, momentum: float, lag: int = 0) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a LAM trunk needs at least one block")
        if lag not in (0, 1):
            raise ValueError(f"lag must be 0 or 1, got {lag}")
        self.copies = nn.ModuleList(copy.deepcopy(b) for b in blocks)
        self.twin = EMATwin(blocks[0], momentum)
        self.source_index = source_index  # index of the twin's real block in ``backbone.blocks``
        self.lag = lag
        self.source_snapshot = copy.deepcopy(blocks[0]).requires_grad_(False) if lag else None
        self.grad_checkpointing = False  # recompute each block in backward (see ``mlaan.engine.recompute``)
        self.lead_only = False  # with it, only the lead (copy + twin): checkpoint_trunk="lead"

    @torch.no_grad()
    def follow(self, source: nn.Module | None) -> None:
        """The EMA update after an optimizer step: the twin moves toward ``source`` (the real block), or with
        ``lag=1`` toward the snapshot of the previous step, which then becomes ``source``'s present state.
        ``source=None`` (lag 1 only): the real block lives elsewhere and sends its state with
        :meth:`set_snapshot`; only the twin moves."""
        if self.source_snapshot is None:
            if source is None:
                raise ValueError("a trunk without lag follows its real block: pass it")
            self.twin.follow(source)
            return
        self.twin.follow(self.source_snapshot)
        if source is not None:
            self.set_snapshot(list(source.state_dict().values()))

    @torch.no_grad()
    def set_snapshot(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite :attr:`source_snapshot` with a block state (tensors in ``state_dict`` order): how a
        module-parallel rank installs the state of a real block trained elsewhere."""
        for mine, theirs in zip(self.source_snapshot.state_dict().values(), tensors, strict=True):
            mine.copy_(theirs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = leap_block(self.copies[0], self.twin, z, self.grad_checkpointing)
        return run_blocks(self.copies[1:], a, self.grad_checkpointing and not self.lead_only)


def leap_block(block_copy: nn.Module, twin: nn.Module, z: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """A₁(z) + E₁(z), a LAM trunk's lead (MLAAN, §LAM): the trained copy of the first later block plus its EMA
    twin, on the module's output z (B, C, H, W); each recomputed in backward when ``grad_checkpointing``."""
    if grad_checkpointing:
        return checkpointed(block_copy, z) + checkpointed(twin, z)
    return block_copy(z) + twin(z)


class TwinBank(nn.Module):
    """One :class:`EMATwin` per backbone block that a trunk of twins runs (``lam_trunk="twins"``), keyed by the
    block's index in ``backbone.blocks``, shared by every :class:`TwinTrunk` through that block.

    Sharing changes no number: the twins of one block in two trunks would start as the same copy and follow the
    same block with the same momentum, so they would stay bit-identical. It bounds the aux nets' frozen weights
    by one backbone whatever K (the copies of :class:`LeapTrunk` grow with K, with gradients and optimiser state).
    """

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.twins = nn.ModuleDict()

    def twin_of(self, index: int, block: nn.Module) -> EMATwin:
        """The twin of ``block`` (``backbone.blocks[index]``), made on first request."""
        key = str(index)
        if key not in self.twins:
            self.twins[key] = EMATwin(block, self.momentum)
        return self.twins[key]

    @torch.no_grad()
    def follow(self, blocks: nn.ModuleList) -> None:
        """The EMA update after an optimizer step: each twin θ ← m·θ + (1−m)·θ(real), its real block taken from
        ``blocks`` (``backbone.blocks``)."""
        for key, twin in self.twins.items():
            twin.follow(blocks[int(key)])


class TwinTrunk(nn.Module):
    """z ↦ E_d(…E_1(z)): the EMA twins of the later blocks A₁…A_d alone, with no trained copy. The gradient flows
    through the twins into the local module (what the later network, as it averages out, makes of its output);
    the twins themselves are never trained. They live in the model's :class:`TwinBank`, not in the trunk, so
    that a shared twin has one state_dict entry.

    With ``lead`` (``lam_trunk="copy+twins"``), z ↦ E_d(…E_2(A₁(z) + E₁(z))): the first later block is a trained
    copy A₁ with its twin added, as the paper's trunk begins (:class:`LeapTrunk`), the rest twins. The frozen
    trunk leaves only the head to fit the aux loss, which cost ResNet-32 accuracy (BENCHMARKS, LAM trunk of EMA
    twins); one trained block per aux net is meant to give it capacity at a fraction of the copies' blocks.

    In evaluation too the twins' BatchNorms normalise with batch statistics, as in training: a twin's running
    statistics are its real block's, measured on that block's own input, while a trunk skips blocks and one twin
    serves trunks at several depths, so they fit none of its inputs (with them, the early modules' aux nets of a
    ResNet-32 scored near chance in ``mlaan eval --modules``: 14–29% against 70–75% with batch statistics).
    """

    def __init__(self, bank: TwinBank, indices: list[int], lead: nn.Module | None = None) -> None:
        super().__init__()
        if not indices:
            raise ValueError("a LAM trunk needs at least one block")
        self.indices = tuple(indices)  # of the twins' real blocks in ``backbone.blocks``
        self._bank = (bank,)  # a tuple hides it from nn.Module's registry: the LocalModel holds the bank
        # a trained copy of block indices[0], starting as that block is (as LeapTrunk's copies do); None: twins only
        self.lead = copy.deepcopy(lead) if lead is not None else None
        self.grad_checkpointing = False  # recompute each block in backward (see ``mlaan.engine.recompute``)
        self.lead_only = False  # with it, only the lead (copy + twin, or the first twin): checkpoint_trunk="lead"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        twins = [self._bank[0].twins[str(i)] for i in self.indices]
        if self.lead is None:
            with contextlib.nullcontext() if self.training else batch_statistics(twins):
                return run_trunk(twins, z, self.grad_checkpointing, self.lead_only)
        # A1(z) + E1(z) exactly as LeapTrunk's first block, in evaluation too: z is the input of E1's real block,
        # so E1's running statistics (its block's, averaged) fit it; the later twins' do not (see above)
        a = leap_block(self.lead, twins[0], z, self.grad_checkpointing)
        with contextlib.nullcontext() if self.training else batch_statistics(twins[1:]):
            return run_blocks(twins[1:], a, self.grad_checkpointing and not self.lead_only)


@contextlib.contextmanager
def batch_statistics(twins: list[EMATwin]) -> Iterator[None]:
    """Within it, the BatchNorms of ``twins`` normalise with batch statistics whatever the model's mode; they
    update no running buffer (an :class:`EMATwin` does not track them: only its EMA moves them)."""
    norms = [m for twin in twins for m in twin.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training]
    for norm in norms:
        norm.train()
    try:
        yield
    finally:
        for norm in norms:
            norm.eval()
