"""Module parallelism: each rank trains a contiguous run of local modules, all ranks at the same time.

Local modules are gradient-isolated, so rank r can train batch t while rank r+1 trains batch t−1: activations flow
forward rank to rank by point-to-point messages, one whole batch per message (no micro-batches, so BatchNorm sees
what it sees in one process). Each rank drives the one-process engine's own step over its modules
(:class:`PipelineStep`, a :class:`~mlaan.engine.step.LocalStep` whose cascades cross rank edges by message), so
for the base methods (no cascade) the result is bit-identical to one process.

Where the algorithm reaches across a rank boundary:

- **MLM cascades** (``boundary="exact"``, the default): the first ``window−1`` modules of rank r+1 send their
  cascaded gradient at the boundary activation back to rank r, which adds it and carries it on exactly as one
  process does before it steps: still bit-identical, at the cost of rank r waiting for rank r+1's first modules.
  ``boundary="cut"``: cascades stop at rank boundaries — a different algorithm (the boundary module loses its
  later modules' cascaded losses), equal to the one-process engine with ``cascade_barriers`` at the same places.
- **LAM EMA twins** whose real block lives on the next rank: that rank sends the block's state at the start of
  every step, i.e. as it was after the previous step, so the twin follows it one step late. The engine's
  ``ema_lag=1`` reproduces that lag in one process (for every twin, wherever its block lives), so it stays
  testable and a run can resume with another number of ranks.

Every rank builds the whole model from the same seed (so that its share starts from the one process's weights),
then :class:`ModulePipeline` releases every parameter and buffer of the other ranks' modules to the meta device
(:func:`release_unowned`): a rank keeps materialised only its own blocks, aux nets, EMA twins and snapshots, and only
those ever move to the accelerator (:meth:`ModulePipeline.to`). The optimizer spans all parameters, the released
ones too (meta tensors, no storage); only the rank's own get gradients, and PyTorch's optimizers skip parameters
without one, so the per-rank optimizer states merge by parameter index into the one-process format. Evaluation
runs pipelined too (:meth:`ModulePipeline.evaluate`). Design, exactness argument and costs: docs/PARALLELISM.md.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..engine.lam import LeapTrunk
from ..engine.local_model import LocalModel
from ..engine.phases import EMA_UPDATE, mark
from ..engine.split import runs_from_sizes, split_sizes
from ..engine.step import LocalStep, cascade_reach
from .context import DistContext
from .gradients import GradientAverager
from .modes import BOUNDARY_MODES, PARTITION_MODES

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 8  # dtype code, number of dimensions, up to six sizes


# -------------------------------------------------------------------------------------------- partition
def min_modules_per_rank(model: LocalModel, boundary: str) -> int:
    """Fewest local modules a rank may own: with exact cascades, ``window − 1`` (a cascade then crosses at most
    one rank boundary), else 1."""
    if boundary == "exact" and model.spec.cascade:
        return max(1, model.options.window - 1)
    return 1


def module_costs(model: LocalModel, mode: str, batch_size: int = 128, steps: int = 3) -> list[float]:
    """One cost per local module for :func:`partition_modules`.

    ``"blocks"``: the module's backbone blocks. ``"memory"``: bytes of its training step at ``batch_size`` images
    (its blocks' activations and gradients, from the engine's block profile) plus its parameters and its aux nets'.
    ``"time"``: median seconds of its part of ``steps`` training steps (forward, aux losses, cascades it starts,
    backward) on random data, after one warm-up step; the model's gradients are left cleared and its BatchNorm
    statistics restored. Raises ValueError for another mode.
    """
    if mode == "blocks":
        return [float(len(r)) for r in model.split]
    if mode == "memory":
        step_bytes = model.profile.step_bytes(batch_size)
        costs = []
        for j, units in enumerate(model.split):
            params = sum(p.numel() * p.element_size() for part in model.module_parts(j) for p in part.parameters())
            costs.append(float(sum(step_bytes[i] for i in units) + params))
        return costs
    if mode == "time":
        return _measured_costs(model, batch_size, steps)
    raise ValueError(f"unknown partition {mode!r}; allowed: {', '.join(PARTITION_MODES)}")


def _measured_costs(model: LocalModel, batch_size: int, steps: int) -> list[float]:
    device = next(model.parameters()).device
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    times: list[list[float]] = [[] for _ in model.local_modules]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for step in range(steps + 1):
            images = torch.randn(batch_size, *model.image_shape, device=device)
            targets = torch.randint(0, model.num_classes, (batch_size,), device=device)
            run = model.begin_step(images, targets)
            x = run.images
            for j in run.modules:
                _synchronize(device)
                start = time.perf_counter()
                x = run.run_module(j, x)
                _synchronize(device)
                if step > 0:
                    times[j].append(time.perf_counter() - start)
            run.finish()
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    return [sorted(t)[len(t) // 2] for t in times]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def partition_modules(costs: Sequence[float], ranks: int, min_modules: int = 1) -> list[range]:
    """Contiguous runs of local modules, one per rank, minimising the largest run's cost (exact min-max split);
    each run has at least ``min_modules`` modules. Raises ValueError when the modules do not go round."""
    check_split(len(costs), ranks, min_modules)
    return runs_from_sizes(split_sizes([float(c) for c in costs], ranks, min_modules))


def check_split(k: int, ranks: int, min_modules: int = 1) -> None:
    """ValueError unless ``k`` local modules go round ``ranks`` ranks with at least ``min_modules`` each: what
    every rank can check for itself before rank 0 measures the modules (a rank that waited in a collective for a
    rank 0 that had failed would die of a lost connection, not of the reason)."""
    if ranks < 1:
        raise ValueError(f"need at least one rank, got {ranks}")
    if ranks * min_modules > k:
        raise ValueError(f"K={k} local modules cannot be split over {ranks} ranks with at least "
                         f"{min_modules} each; use fewer ranks or more modules")


def boundaries(ranges: Sequence[range]) -> tuple[int, ...]:
    """The last module of every rank but the last: where ``boundary="cut"`` puts its cascade barriers."""
    return tuple(r.stop - 1 for r in ranges[:-1])


# -------------------------------------------------------------------------------------------- ownership
def _trunk_modules(model: LocalModel) -> dict[int, int]:
    """``id(trunk)`` → the local module whose aux nets hold that LAM trunk."""
    return {id(t): j for j in range(len(model.local_modules)) for part in model.module_parts(j)[1:]
            for t in part.modules() if isinstance(t, LeapTrunk)}


def _block_modules(model: LocalModel) -> dict[int, int]:
    """Backbone block index → the local module that runs it (the head block is not a twin's source)."""
    return {i: j for j, units in enumerate(model.split) for i in units}


def _rank_parts(model: LocalModel, ranges: Sequence[range]) -> list[list[nn.Module]]:
    return [[part for j in run for part in model.module_parts(j)] for run in ranges]


def state_owners(model: LocalModel, ranges: Sequence[range]) -> dict[str, int]:
    """The rank that trains each ``model.state_dict()`` entry (its module's blocks, aux nets, EMA twins)."""
    owner = {id(t): r for r, parts in enumerate(_rank_parts(model, ranges))
             for part in parts for t in [*part.parameters(), *part.buffers()]}
    return {k: owner[id(v)] for k, v in model.state_dict(keep_vars=True).items()}


def release_unowned(model: LocalModel, ranges: Sequence[range], rank: int) -> int:
    """Release, in place, every parameter and buffer of the local modules other ranks train (their blocks, aux nets,
    EMA twins and LAM snapshots: :meth:`LocalModel.module_parts`) to the meta device (``Module.to_empty``): shapes
    and dtypes stay, storage goes, so that this rank's host and device memory hold only its own share. A released
    block or aux net raises RuntimeError, naming its rank, when something runs it. Idempotent. Returns the number
    of elements released (parameters and buffers)."""
    released = 0
    for owner, run in enumerate(ranges):
        if owner == rank:
            continue
        for j in run:
            for part in model.module_parts(j):
                tensors = [t for t in [*part.parameters(), *part.buffers()] if not t.is_meta]
                if not tensors:
                    continue  # released already
                released += sum(t.numel() for t in tensors)
                part.to_empty(device="meta")
                # a block of the view local_modules[j] is run by the backbone itself, not through the view
                for module in (part if part is model.local_modules[j] else [part]):
                    module.register_forward_pre_hook(functools.partial(_released, j=j, owner=owner, rank=rank))
    return released


def _released(module: nn.Module, args: tuple, *, j: int, owner: int, rank: int) -> None:
    raise RuntimeError(f"local module {j} is trained by rank {owner}; rank {rank} released its parameters to the "
                       "meta device (module parallelism: a rank holds only its own modules) and cannot run it")


def owned_parameter_count(model: LocalModel, ranges: Sequence[range], rank: int) -> int:
    """Elements of the parameters rank ``rank`` trains (its blocks and aux nets), each shared tensor once."""
    params = {id(p): p for part in _rank_parts(model, ranges)[rank] for p in part.parameters()}
    return sum(p.numel() for p in params.values())


def optimizer_indices(model: LocalModel, ranges: Sequence[range], rank: int,
                      optimizer: torch.optim.Optimizer) -> list[int]:
    """The indices, in ``optimizer.state_dict()``'s numbering (its parameters group after group), of the
    parameters rank ``rank`` trains."""
    mine = {id(p) for part in _rank_parts(model, ranges)[rank] for p in part.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [i for i, p in enumerate(params) if id(p) in mine]


def merge_model_states(model: LocalModel, ranges: Sequence[range], states: Sequence[dict[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
    """The one-process ``state_dict`` from each rank's (``states[r]``: at least its owned entries): every entry
    from its owner, then every EMA snapshot (``ema_lag=1``) set to its block's state — what one process holds
    after the same step (a rank holds a remote block's snapshot one step older)."""
    merged = {k: states[r][k] for k, r in state_owners(model, ranges).items()}
    for name, trunk in model.named_modules():
        if isinstance(trunk, LeapTrunk) and trunk.source_snapshot is not None:
            for key in trunk.source_snapshot.state_dict():
                merged[f"{name}.source_snapshot.{key}"] = merged[f"backbone.blocks.{trunk.source_index}.{key}"]
    return merged


def merge_optimizer_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One optimizer ``state_dict`` from the ranks' (every rank's optimizer spans all parameters; each holds the
    state of its own only)."""
    merged = {"state": {}, "param_groups": states[0]["param_groups"]}
    for state in states:
        merged["state"].update(state["state"])
    return merged


def check_partition(model: LocalModel, ranges: Sequence[range], boundary: str) -> None:
    """ValueError (one line) unless ``ranges`` cover the local modules in order, each rank owns at least
    :func:`min_modules_per_rank`, ``boundary="cut"`` comes with the model's matching ``cascade_barriers``, and LAM
    twins whose block is on another rank have ``ema_lag=1``."""
    if boundary not in BOUNDARY_MODES:
        raise ValueError(f"unknown boundary {boundary!r}; allowed: {', '.join(BOUNDARY_MODES)}")
    k = len(model.local_modules)
    if [j for run in ranges for j in run] != list(range(k)) or any(len(run) == 0 for run in ranges):
        raise ValueError(f"ranges {[(r.start, r.stop) for r in ranges]} must cover local modules 0..{k - 1} "
                         "in order, each rank at least one")
    low = min_modules_per_rank(model, boundary)
    short = [r for r, run in enumerate(ranges) if len(run) < low]
    if short:
        raise ValueError(f"rank {short[0]} owns {len(ranges[short[0]])} local module(s); exact cascades with "
                         f"window {model.options.window} need at least {low} per rank")
    cuts = set(boundaries(ranges))
    if model.spec.cascade and boundary == "cut" and not cuts <= set(model.options.cascade_barriers):
        raise ValueError(f"boundary='cut' needs the model built with cascade_barriers={tuple(sorted(cuts))}")
    if model.options.ema_lag == 1:
        return
    module_rank = [r for r, run in enumerate(ranges) for _ in run]
    block_module, trunk_module = _block_modules(model), _trunk_modules(model)
    for trunk in model.leap_trunks:
        if module_rank[block_module[trunk.source_index]] != module_rank[trunk_module[id(trunk)]]:
            raise ValueError("LAM EMA twins whose block is on another rank need ema_lag=1 (the twin follows its "
                             "block as it was one step earlier); build the model with ema_lag=1")


# ------------------------------------------------------------------------------------------------- step
class PipelineStep(LocalStep):
    """The engine's step over one rank's contiguous run of local modules ``modules``, built by
    ``model.begin_step(..., step_type=functools.partial(PipelineStep, modules=...))``.

    Cascades that cross the run's edges go by message: one that reaches the run's first module leaves as
    ``(j, gradient at the run's input)`` in :attr:`outbox`, for the previous rank; one from a later rank arrives
    through :meth:`receive_cascade`. Every floating-point operation is the one process's, in the same order, so
    the results are bit-identical. Raises ValueError unless ``modules`` is a contiguous range of the model's.
    """

    def __init__(self, model: LocalModel, images: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0,
                 *, modules: range) -> None:
        super().__init__(model, images, targets, loss_scale)
        if modules.step != 1 or not 0 <= modules.start < modules.stop <= self.num_modules:
            raise ValueError(f"modules must be a contiguous range within 0..{self.num_modules - 1}, got {modules}")
        self.modules = modules
        self.outbox: list[tuple[int, torch.Tensor]] = []

    def cascades_to_receive(self) -> list[int]:
        """The later modules whose cascades reach into this run (in the order they arrive): those whose reach
        (:func:`~mlaan.engine.step.cascade_reach`, the step's own rule) holds the next run's first module, so
        that the gradient goes on into this run's last; a barrier anywhere in between stops it."""
        first_after = self.modules.stop
        later = range(first_after, min(first_after + self.window - 1, self.num_modules))
        return [j for j in later if first_after in cascade_reach(j, self.window, self.barriers)]

    def receive_cascade(self, j: int, grad: torch.Tensor) -> None:
        """Module j's (a later rank's) cascaded gradient at this run's output: add it to the last module's
        output gradient, carry it on through the window, and finish what no later cascade reaches."""
        self._add_output_grad(self.modules.stop - 1, j, grad)
        self._carry(j, grad)
        self._finish_complete(j)

    def _reach(self, j: int) -> tuple[int, ...]:
        # the modules past this run were carried through on their own rank; those before it are the previous's
        return tuple(k for k in super()._reach(j) if k in self.modules)

    def _add_output_grad(self, i: int, j: int, grad: torch.Tensor) -> None:
        if i < self.modules.start:  # the cascade leaves the run: the previous rank carries it on
            self.outbox.append((j, grad))
        else:
            super()._add_output_grad(i, j, grad)


# ------------------------------------------------------------------------------------------------ stage
class ModulePipeline:
    """This rank's share of a module-parallel run: the local modules ``ranges[rank]`` of ``model``.

    ``model`` is the whole :class:`~mlaan.LocalModel`, built identically on every rank (same seed, on the host);
    the pipeline releases, in place, every part of it that another rank trains (:func:`release_unowned`), so build
    the optimizer after it and move the rank's share with :meth:`to`, not ``model.to`` (a meta tensor cannot be
    copied). ``ranges``
    the contiguous module runs of all ranks (:func:`partition_modules`), ``rank`` this process's index in
    ``group`` (default: the default process group, already initialised), i.e. its stage. Messages go through
    ``torch.distributed`` point-to-point calls, staged on the CPU for the gloo backend, to the group's ranks:
    with pipeline replicas (``--parallel modules --data-parallel R``, :mod:`.mesh`) ``group`` is this replica's
    pipeline, stage s its s-th rank, whatever its global rank. Control collectives (epoch sums, stop votes) span
    every process, so that all replicas stop at the same step and their epoch figures add up. ``stage_group``:
    the ranks training this stage in every replica (None: no replicas), over which
    :meth:`gradient_averager` averages.

    Raises ValueError when the ranges do not cover the modules in order, a rank owns fewer than
    :func:`min_modules_per_rank`, ``boundary="cut"`` without the matching ``cascade_barriers``, or LAM twins with
    a block on another rank but ``ema_lag=0``.
    """

    def __init__(self, model: LocalModel, ranges: Sequence[range], rank: int, boundary: str = "exact",
                 group: dist.ProcessGroup | None = None, stage_group: dist.ProcessGroup | None = None) -> None:
        self.model, self.ranges, self.rank, self.boundary, self.group = model, list(ranges), rank, boundary, group
        self.stage_group = stage_group
        self.replicas = dist.get_world_size(stage_group) if stage_group is not None else 1
        check_partition(model, self.ranges, boundary)
        self._check_group()
        self.modules = self.ranges[rank]
        # the group's ranks in global numbering: point-to-point calls name their peers by global rank
        self.peers = dist.get_process_group_ranks(group) if group is not None else list(range(len(self.ranges)))
        self.prev = rank - 1 if rank > 0 else None
        self.next = rank + 1 if rank < len(self.ranges) - 1 else None
        self.owner = [r for r, run in enumerate(self.ranges) for _ in run]  # module index -> rank
        self._backend = dist.get_backend(group)
        self._trunk_module, self._block_module = _trunk_modules(model), _block_modules(model)
        self.released = release_unowned(model, self.ranges, rank)  # elements no longer held by this rank
        # isends in flight with their tensors kept alive (modifying or freeing one before completion is undefined):
        # this step's, and the previous step's, completed at the end of the next step
        self._sends: list[tuple[Any, torch.Tensor]] = []
        self._previous: list[tuple[Any, torch.Tensor]] = []
        self._waited = 0.0  # seconds blocked in receives during the current step
        self._plan = model.step_plan()
        # collectives (metrics, stop votes) go through their own group, beside the point-to-point traffic
        self._control = dist.new_group(backend="gloo")
        self._votes: list[tuple[Any, torch.Tensor]] = []

    def owned_parts(self) -> list[nn.Module]:
        """The backbone blocks and aux nets this rank trains."""
        return _rank_parts(self.model, self.ranges)[self.rank]

    @property
    def device(self) -> torch.device:
        """Where this rank's share is: its first own parameter's device."""
        return next(p for part in self.owned_parts() for p in part.parameters()).device

    @property
    def comm_device(self) -> torch.device:
        """Where messages are staged: the CPU for gloo, the rank's device otherwise (NCCL)."""
        return torch.device("cpu") if self._backend == "gloo" else self.device

    def to(self, device: torch.device | str) -> ModulePipeline:
        """Move this rank's share of the model (every tensor it holds; the released ones stay on the meta device)
        to ``device``. Returns ``self``."""
        # Module.to would try to copy the meta tensors too (NotImplementedError); _apply is what it runs
        self.model._apply(lambda t: t if t.is_meta else t.to(device))
        return self

    def parameter_count(self) -> int:
        """Elements of the parameters this rank trains (:func:`owned_parameter_count`)."""
        return owned_parameter_count(self.model, self.ranges, self.rank)

    def gradient_averager(self, ctx: DistContext) -> GradientAverager | None:
        """Pipeline replicas: what averages this stage's gradients and BatchNorm statistics with the same stage
        of the other replicas after each step (``wait_for_gradients`` of ``mlaan.training.loop.optimizer_step``),
        as ``--parallel data`` does over its ranks; None without replicas. The EMA twins need nothing more: with
        the same averaged gradients every replica's parameters, hence twins and snapshots, stay the same."""
        if self.stage_group is None or self.replicas < 2:
            return None
        return GradientAverager(self.model, ctx, group=self.stage_group, buffer_modules=self.owned_parts())

    def _check_group(self) -> None:
        if dist.get_world_size(self.group) != len(self.ranges):
            raise ValueError(f"{len(self.ranges)} ranges for a process group of {dist.get_world_size(self.group)}")

    def _trunk_rank(self, trunk: LeapTrunk) -> int:
        return self.owner[self._trunk_module[id(trunk)]]

    def _source_rank(self, trunk: LeapTrunk) -> int:
        return self.owner[self._block_module[trunk.source_index]]

    # ------------------------------------------------------------------------------------ ownership
    def owned_state_keys(self) -> list[str]:
        """Keys of ``model.state_dict()`` this rank trains or updates (its blocks, aux nets, EMA twins)."""
        return [k for k, r in state_owners(self.model, self.ranges).items() if r == self.rank]

    # ------------------------------------------------------------------------------------- training
    def train(self, mode: bool = True) -> ModulePipeline:
        """Training (or eval) mode for the model, as ``nn.Module.train``."""
        self.model.train(mode)
        return self

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """This rank's part of one training step on the batch ``images`` (B, C, H, W), ``targets`` (B,) — every
        rank is given the same batch (each reads the same seeded data). Gradients of this rank's modules
        accumulate in ``.grad``. Returns the engine's statistics for this rank's modules plus ``"modules"``
        (their indices), ``"step_s"`` (wall seconds of this call) and ``"wait_s"`` (of which blocked in
        receives). The per-module lists span all K modules, 0.0 for another rank's (None where a module has no
        such loss), and ``loss``/``accuracy`` are 0.0 except on the last rank, so that summing over ranks
        (:meth:`reduce_sums`) gives the one-process figures."""
        start = time.perf_counter()
        self._waited = 0.0
        step = self.model.begin_step(images, targets,
                                     step_type=functools.partial(PipelineStep, modules=self.modules))
        if self.prev is not None:
            x = self._format(self._recv_tensor(self.prev))
            # after the receive, so that each pair of ranks sends and receives in the same order (NCCL would
            # deadlock on two sends facing each other); still before this step's forward moves the blocks
            for tensor in self._snapshots_for_prev():
                self._send(tensor, self.prev)
        else:
            x = step.images
        for j in self.modules:
            x = step.run_module(j, x)
            for _, grad in step.outbox:  # cascades leaving this rank: the previous one waits for them
                self._send(grad, self.prev)
            step.outbox.clear()
        if self.next is not None:
            self._send_tensor(x.detach(), self.next)
            self._receive_snapshots()
            for j in step.cascades_to_receive():
                grad = self._format(self._recv_like(x, self.next))
                step.receive_cascade(j, grad)
        stats = self._whole_model_statistics(step.statistics())
        self._wait_sends(keep_last=True)
        stats["step_s"], stats["wait_s"] = time.perf_counter() - start, self._waited
        return stats

    def _whole_model_statistics(self, own: dict[str, Any]) -> dict[str, Any]:
        plan = self._plan
        stats: dict[str, Any] = {"modules": list(self.modules)}
        last = self.next is None
        stats["loss"] = own["loss"] if last else 0.0
        stats["accuracy"] = own["accuracy"] if last else 0.0
        for name in ("module_losses", "independent_losses", "cascaded_losses"):
            values: list[float | None] = [0.0] * len(plan)
            if name == "cascaded_losses":
                values = [0.0 if p.has_cascaded_loss else None for p in plan]
            for j, v in zip(self.modules, own[name]):
                values[j] = v
            stats[name] = values
        return stats

    def reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """An epoch's sums over all ranks (collective): each rank reports its modules' sums and 0 for the others,
        the last rank the loss and accuracy, and every stage of a replica counts the same images (the count is
        added up over the replicas: the processes' sum divided by the stages)."""
        keys = sorted(sums)
        total = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(total, group=self._control)
        out = dict(zip(keys, total.tolist()))
        if "count" in out:
            out["count"] = out["count"] / len(self.ranges)  # counts are whole numbers: exact
        return out

    def agree_to_stop(self, requested: bool) -> bool:
        """Whether every rank stops now: True at the same step on every rank once any rank asked, a few steps
        later (the vote of step s is read at step s + P + 1, so that no rank waits on a slower one each step)."""
        flag = torch.tensor([float(requested)])
        self._votes.append((dist.all_reduce(flag, group=self._control, async_op=True), flag))
        if len(self._votes) <= len(self.ranges) + 1:
            return False
        work, flag = self._votes.pop(0)
        work.wait()
        return bool(flag.item() > 0)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor
                       ) -> dict[str, Any]:
        """zero_grad → :meth:`train_step` → ``optimizer.step`` (only this rank's parameters have gradients, and the
        optimizer skips the rest) → :meth:`after_optimizer_step`, as ``mlaan.training.loop.optimizer_step`` does in
        one process."""
        optimizer.zero_grad(set_to_none=True)
        stats = self.train_step(images, targets)
        optimizer.step()
        self.after_optimizer_step()
        return stats

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The EMA twins this rank owns follow their block: a local block now (or its snapshot with
        ``ema_lag=1``), a remote one through the snapshot its rank sent this step."""
        with mark(EMA_UPDATE):
            for trunk in self.model.following_trunks():
                if self._trunk_rank(trunk) != self.rank:
                    continue
                local = self._source_rank(trunk) == self.rank
                trunk.follow(self.model.backbone.blocks[trunk.source_index] if local else None)

    def drain(self) -> None:
        """Wait for every message this rank has sent (before a checkpoint, evaluation or exit)."""
        self._wait_sends(keep_last=False)

    # -------------------------------------------------------------------------------------- EMA twins
    def _remote_trunks(self, owner: int) -> list[LeapTrunk]:
        """Following trunks owned by rank ``owner`` whose real block is on the rank after it, in model order."""
        return [t for t in self.model.following_trunks()
                if self._trunk_rank(t) == owner and self._source_rank(t) == owner + 1]

    def _snapshots_for_prev(self) -> list[torch.Tensor]:
        blocks = [self.model.backbone.blocks[t.source_index] for t in self._remote_trunks(self.rank - 1)]
        # copies: the forward about to run moves the BatchNorm statistics in place while the send may be pending
        return [v.detach().clone() for block in blocks for v in block.state_dict().values()]

    def _receive_snapshots(self) -> None:
        for trunk in self._remote_trunks(self.rank):
            tensors = [self._recv_like(v, self.next) for v in trunk.source_snapshot.state_dict().values()]
            trunk.set_snapshot(tensors)

    # ---------------------------------------------------------------------------------- evaluation
    def _stage_blocks(self, backbone: nn.Module) -> list[nn.Module]:
        """This rank's blocks of ``backbone`` (the model's, or a copy of it), in order; the head on the last."""
        units = [i for j in self.modules for i in self.model.split[j]]
        if self.next is None:
            units.append(len(backbone.blocks) - 1)
        return [backbone.blocks[i] for i in units]

    def _forward_stage(self, backbone: nn.Module, blocks: list[nn.Module], images: torch.Tensor,
                       autocast: bool = True) -> torch.Tensor | None:
        """One batch of the plain network through this rank's ``blocks``: the first rank starts from ``images``
        as ``backbone``'s forward does (resized), the others from the previous rank's output; the output goes to
        the next rank. ``autocast``: in the model's autocast dtype, if any (evaluation; precise BN runs in fp32).
        Returns the logits on the last rank, else None."""
        if self.prev is None:
            x = backbone.resize(self._format(images))
        else:
            x = self._format(self._recv_tensor(self.prev))
        dtype = self.model.autocast_dtype if autocast else None
        with torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            for block in blocks:
                x = block(x)
        if self.next is None:
            return x
        self._send_tensor(x, self.next)
        return None

    @torch.no_grad()
    def evaluate(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], backbone: nn.Module | None = None
                 ) -> dict[str, float]:
        """Test loss and top-1 accuracy of the plain backbone, pipelined: every rank of the pipeline reads the same
        ``(images (B, C, H, W), targets (B,))`` batches of ``loader`` and runs them through its own blocks, the
        last rank scores them; the sums are added up over every process (collective: replicas each pass their
        shard). ``backbone``: a copy to evaluate instead (:meth:`precise_batchnorm`'s). Returns ``loss``,
        ``accuracy`` and ``count`` (images scored, all replicas), as ``mlaan.training.loop.evaluate_backbone``."""
        backbone = backbone if backbone is not None else self.model.backbone
        blocks = self._stage_blocks(backbone)
        modes = [b.training for b in blocks]
        for block in blocks:
            block.eval()
        self.drain()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        for images, targets in loader:
            logits = self._forward_stage(backbone, blocks, images)
            if logits is not None:
                targets = targets.to(self.device)
                totals += torch.tensor([F.cross_entropy(logits.float(), targets, reduction="sum").item(),
                                        (logits.argmax(1) == targets).sum().item(), len(targets)],
                                       dtype=torch.float64)
            self._wait_sends(keep_last=True)
        self.drain()
        for block, mode in zip(blocks, modes):
            block.train(mode)
        dist.all_reduce(totals, group=self._control)
        loss_sum, correct, count = totals.tolist()
        n = max(count, 1.0)
        return {"loss": loss_sum / n, "accuracy": correct / n, "count": int(count)}

    @torch.no_grad()
    def precise_batchnorm(self, batches: Iterable[torch.Tensor]) -> nn.Module:
        """A copy of the backbone whose BatchNorm running statistics are re-estimated on ``batches`` (image
        batches (B, C, H, W), the same on every rank of the pipeline), pipelined: each rank resets and averages
        those of its own blocks as ``torch.optim.swa_utils.update_bn`` does in one process (cumulative average,
        train mode). Collective within the pipeline; the model itself is unchanged. For :meth:`evaluate`."""
        backbone = copy.deepcopy(self.model.backbone)  # the released blocks stay on meta: no memory
        blocks = self._stage_blocks(backbone)
        norms = [m for block in blocks for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        modes = [b.training for b in blocks]
        for block in blocks:
            block.train()
        self.drain()
        for images in batches:
            self._forward_stage(backbone, blocks, images, autocast=False)
            self._wait_sends(keep_last=True)
        self.drain()
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for block, mode in zip(blocks, modes):
            block.train(mode)
        return backbone

    def shard_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What this rank contributes to a checkpoint: its model entries and its parameters' optimizer state (in
        the one-process optimizer's numbering); :func:`merge_model_states` and :func:`merge_optimizer_states`
        rebuild the one-process checkpoint from all ranks'. Call after :meth:`drain`."""
        owned = set(self.owned_state_keys())
        state = optimizer.state_dict()
        # only this rank's entries: after a resume the optimizer also holds (stale) state of other ranks' parameters
        mine = set(optimizer_indices(self.model, self.ranges, self.rank, optimizer))
        state["state"] = {i: v for i, v in state["state"].items() if i in mine}
        return {"rank": self.rank, "ranges": [(r.start, r.stop) for r in self.ranges],
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k in owned},
                "optimizer": state}

    def description(self) -> dict[str, Any]:
        """The partition as plain data: ranks (stages), each rank's modules ``[start, stop)``, the boundary mode,
        and the replicas of the pipeline (``--data-parallel``)."""
        return {"ranks": len(self.ranges), "ranges": [[r.start, r.stop] for r in self.ranges],
                "boundary": self.boundary, "replicas": self.replicas}

    # ------------------------------------------------------------------------------------- messages
    def _format(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.model.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        payload = tensor.detach().to(self.comm_device).contiguous()
        self._sends.append((dist.isend(payload, self.peers[dst], group=self.group), payload))

    def _send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        """A tensor whose shape and dtype the receiver does not know: a header first."""
        if tensor.dim() > _HEADER - 2 or tensor.dtype not in _DTYPES:
            raise ValueError(f"cannot send a {tensor.dim()}-d {tensor.dtype} activation between ranks")
        sizes = list(tensor.shape) + [0] * (_HEADER - 2 - tensor.dim())
        header = torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *sizes], dtype=torch.int64)
        self._send(header, dst)
        self._send(tensor, dst)

    def _recv_tensor(self, src: int) -> torch.Tensor:
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.comm_device)
        self._recv(header, src)
        code, ndim, *sizes = header.tolist()
        buffer = torch.empty(sizes[:ndim], dtype=_DTYPES[code], device=self.comm_device)
        self._recv(buffer, src)
        return buffer

    def _recv_like(self, like: torch.Tensor, src: int) -> torch.Tensor:
        """A tensor of ``like``'s shape and dtype from rank ``src`` (on the message device)."""
        buffer = torch.empty(like.shape, dtype=like.dtype, device=self.comm_device)
        self._recv(buffer, src)
        return buffer

    def _recv(self, buffer: torch.Tensor, src: int) -> None:
        start = time.perf_counter()
        dist.recv(buffer, self.peers[src], group=self.group)
        self._waited += time.perf_counter() - start

    def _wait_sends(self, keep_last: bool) -> None:
        """Complete the sends of earlier steps (``keep_last``: those of the step just done may still be in
        flight, so this rank can run one step ahead)."""
        waiting = self._previous if keep_last else [*self._previous, *self._sends]
        for work, _ in waiting:
            work.wait()
        self._previous, self._sends = (self._sends, []) if keep_last else ([], [])
