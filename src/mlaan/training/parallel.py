"""How a ``--parallel modules`` run is shared among torchrun's processes: the partition of its local modules
(rank 0's, measured when ``--partition time``, broadcast; or the checkpoint's when resuming on as many ranks), the
cut MLM cascades of ``--boundary cut``, which are part of the algorithm and so carried over by every resume, and
the run's checkpoint shards (each stage's rank writes its own — the first replica's, with ``--data-parallel`` —,
rank 0 merges them into ``last.pt`` and then writes the manifest; :mod:`mlaan.training.checkpoint` describes the
format). Data parallelism needs none of this (:func:`mlaan.distributed.prepare_model`). ValueError (one line,
naming the checkpoint) for a resume that would change the algorithm."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import atomic_save, atomic_write_text
from .checkpoint import SHARDS, short_error
from .resume import saved_barriers

if TYPE_CHECKING:
    from ..distributed import DistContext
    from ..distributed.mesh import ReplicaLayout
    from ..distributed.pipeline import ModulePipeline
    from ..engine import LocalModel
    from .config import TrainConfig


@dataclass(frozen=True)
class RunLayout:
    """How this process shares the run (:meth:`of`): one process; data parallelism (each of ``world_size`` ranks
    reads its shard of every batch); one module pipeline (``pipelined``: each rank trains a run of local modules of
    every batch); or R pipeline replicas (``--data-parallel R``: replica r reads shard r and its P stages share it).
    ``replicas``/``mesh`` describe the replicas (:class:`mlaan.distributed.mesh.ReplicaLayout`)."""

    rank: int
    world_size: int
    pipelined: bool
    mesh: ReplicaLayout

    @classmethod
    def of(cls, cfg: TrainConfig, ctx: DistContext) -> RunLayout:
        """The layout of ``cfg.parallel``/``cfg.data_parallel`` on ``ctx``'s processes (ValueError, one line, when
        the replicas do not fit the processes started: :func:`mlaan.distributed.mesh.check_layout`)."""
        from ..distributed import mesh

        replicas = mesh.check_layout(ctx.world_size, cfg.data_parallel, cfg.parallel)
        return cls(ctx.rank, ctx.world_size, cfg.module_parallel and ctx.world_size > 1, replicas)

    @property
    def replicas(self) -> int:
        """The pipeline's replicas, each reading its 1/R of every batch; 1 otherwise."""
        return self.mesh.replicas if self.pipelined else 1

    @property
    def replica(self) -> int:
        """This rank's replica of the pipeline (0 … R−1; 0 without replicas)."""
        return self.mesh.replica(self.rank) if self.pipelined else 0

    @property
    def parallel(self) -> str:
        """"modules", "data" or "none", as the checkpoint's run shape names it."""
        return "modules" if self.pipelined else "data" if self.world_size > 1 else "none"

    @property
    def shards(self) -> int:
        """Data shards of every batch, each read (and augmented) by its own random streams: a rank's, a replica's."""
        return self.replicas if self.pipelined else self.world_size

    @property
    def own_random_streams(self) -> bool:
        """Whether this rank draws random numbers of its own: data parallelism (each rank augments its shard) and
        pipeline replicas (per replica); one pipeline's ranks read the same batches and keep the same streams."""
        return self.shards > 1

    @property
    def stream_rank(self) -> int:
        """Whose random streams this rank draws from: its own, its replica's, or rank 0's."""
        return self.replica if self.pipelined else self.rank

    def replica_context(self, ctx: DistContext) -> DistContext | None:
        """Pipeline replicas: the data-parallel view of this rank (its replica among R) that picks its shard of
        every batch, as data parallelism's rank of that index; None otherwise."""
        from ..distributed import DistContext

        if self.replicas == 1:
            return None
        return DistContext(self.replica, self.replicas, 0, ctx.device, True, ctx.backend)


def carry_barriers(model: LocalModel, ckpt: dict, path: str | os.PathLike | None) -> tuple[int, ...] | None:
    """The resumed run's cut cascades (``--boundary cut``), which are its algorithm: the model gets them
    whoever trains it now (one process, data parallelism, or the pipeline, which checks its ranks against
    them in :func:`build_pipeline`). Returns them (None for a method without cascades)."""
    if not model.spec.cascade:
        return None
    barriers = saved_barriers(ckpt)
    k = len(model.local_modules)
    if list(barriers) != sorted(set(barriers)) or any(not 0 <= b <= k - 2 for b in barriers):
        raise ValueError(f"checkpoint {path}: its cascade_barriers {list(barriers)} are not "
                         f"increasing local modules in 0 to {k - 2} (K={k})")
    model.options.cascade_barriers = barriers
    return barriers


def cut_ranges(barriers: tuple[int, ...] | None, world: int, k: int, path: str | os.PathLike | None) -> list[range]:
    """The partition of ``k`` local modules over ``world`` ranks that a resumed ``--boundary cut`` run must keep:
    its ranks end where its cascades were cut (``barriers``), so that the algorithm stays the one trained so far
    (ValueError, one line, on any other number of ranks)."""
    cuts = barriers or ()
    if len(cuts) != world - 1:
        had = (f"cuts its MLM cascades after local module{'s' if len(cuts) > 1 else ''} "
               f"{', '.join(map(str, cuts))}, the rank boundaries of {len(cuts) + 1} processes"
               if cuts else "never cut its MLM cascades (it trained in one process)")
        keep = f"resume it on {len(cuts) + 1} processes or in one process" if cuts else "resume it in one process"
        raise ValueError(f"checkpoint {path}: this run {had} (--boundary cut); on {world} "
                         f"processes they would be cut elsewhere, another algorithm: {keep}")
    edges = [0, *(b + 1 for b in cuts), k]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def build_pipeline(model: LocalModel, cfg: TrainConfig, ctx: DistContext, ckpt: dict | None,
                   barriers: tuple[int, ...] | None, path: str | os.PathLike | None,
                   layout: ReplicaLayout | None = None) -> ModulePipeline:
    """This rank's share of the local modules: the partition is rank 0's (measured when ``--partition
    time``), broadcast, or the checkpoint's when resuming with as many stages; ``--boundary cut`` puts cascade
    barriers at its boundaries, and a resumed cut run keeps the ones it was trained with (``barriers``, from
    :func:`carry_barriers`). The pipeline releases the modules other ranks train (meta device): move it to the
    device with ``ModulePipeline.to``. ``layout``: pipeline replicas (``--data-parallel R``,
    :mod:`mlaan.distributed.mesh`):
    every replica gets the same partition of the modules over its P = world / R stages, and this rank its
    replica's pipeline group and its stage's data-parallel group (None: one pipeline over every rank)."""
    import torch.distributed as tdist

    from ..distributed import mesh
    from ..distributed import pipeline as pp

    layout = layout or mesh.ReplicaLayout(1, ctx.world_size)
    world = layout.stages
    saved = (ckpt or {}).get("pipeline")
    if ckpt is not None and cfg.boundary == "cut" and model.spec.cascade:
        ranges = cut_ranges(barriers, world, len(model.local_modules), path)
    elif saved is not None and saved.get("ranks") == world:
        ranges = [range(a, b) for a, b in saved["ranges"]]
    else:
        low = pp.min_modules_per_rank(model, cfg.boundary)
        pp.check_split(len(model.local_modules), world, low)  # on every rank, before the broadcast
        shared: list[Any] = [None]
        if ctx.is_main:
            if cfg.partition == "time":  # timed where it trains: the one moment rank 0 holds every module there
                model.to(ctx.device)
            costs = pp.module_costs(model, cfg.partition, cfg.batch_size)
            shared = [[(r.start, r.stop) for r in pp.partition_modules(costs, world, low)]]
        tdist.broadcast_object_list(shared, src=0)
        ranges = [range(a, b) for a, b in shared[0]]
    if cfg.boundary == "cut":
        model.options.cascade_barriers = pp.boundaries(ranges)
    if layout.replicas == 1:
        pipeline = pp.ModulePipeline(model, ranges, ctx.rank, cfg.boundary)
    else:
        pipeline_group, stage_group = mesh.build_groups(layout, ctx.device.type)
        pipeline = pp.ModulePipeline(model, ranges, layout.stage(ctx.rank), cfg.boundary, group=pipeline_group,
                                     stage_group=stage_group)
    if ctx.device.type == "cuda" and cfg.partition == "time" and ctx.is_main:
        torch.cuda.empty_cache()  # the timed whole model's released blocks: back to the device, not kept cached
    return pipeline


def evaluate_pipeline(pipeline: ModulePipeline, cfg: TrainConfig, train_set: Any,
                      test_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], step: int) -> dict[str, float]:
    """The run's evaluation under module parallelism, pipelined (``ModulePipeline.evaluate``; collective): of the
    backbone, or with ``--precise-bn`` of a copy whose BatchNorm statistics each rank re-estimates in its own
    blocks on the very batches one process would use at ``step``
    (:func:`mlaan.training.loop.precise_bn_batches`)."""
    from .loop import has_batchnorm, precise_bn_batches

    backbone = None
    if cfg.precise_bn and has_batchnorm(pipeline.model.backbone):
        loader, draw_seed = precise_bn_batches(train_set, cfg.precise_bn, cfg.batch_size, cfg.seed, step)
        with torch.random.fork_rng(devices=[]):  # the augmentation's draws, as in one process
            torch.random.default_generator.manual_seed(draw_seed)
            backbone = pipeline.precise_batchnorm(images for images, _ in loader)
    return pipeline.evaluate(test_batches, backbone)


# ------------------------------------------------------------------------------------- the checkpoint's shards
def write_shard(folder: str | os.PathLike, shard: Mapping[str, Any]) -> Path:
    """Write one rank's share of a checkpoint (``ModulePipeline.shard_state``) to
    ``folder/shards/rank<r>.pt``, atomically; returns the path."""
    path = Path(folder) / SHARDS / f"rank{shard['rank']}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(dict(shard), path)
    return path


def merge_shards(folder: str | os.PathLike, model: torch.nn.Module, ranks: int) -> dict[str, Any]:
    """The one-process ``model``/``optimizer`` states and the partition (``pipeline``) from the ``ranks`` shards
    in ``folder/shards`` (ValueError naming a missing or damaged shard)."""
    from ..distributed.pipeline import merge_model_states, merge_optimizer_states

    shards = []
    for r in range(ranks):
        path = Path(folder) / SHARDS / f"rank{r}.pt"
        try:
            shards.append(torch.load(path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, zipfile.BadZipFile) as err:
            raise ValueError(f"module-parallel shard {path} cannot be read: {short_error(err)}") from err
    ranges = [range(a, b) for a, b in shards[0]["ranges"]]
    return {"model": merge_model_states(model, ranges, [s["model"] for s in shards]),
            "optimizer": merge_optimizer_states([s["optimizer"] for s in shards])}


def write_manifest(folder: str | os.PathLike, pipeline: Mapping[str, Any], step: int) -> Path:
    """``folder/shards/manifest.json``, written after ``last.pt``: the partition, the step and each shard's
    SHA-256 — the mark that the save of that step is complete."""
    import hashlib

    shards = Path(folder) / SHARDS
    files = [shards / f"rank{r}.pt" for r in range(pipeline["ranks"])]
    manifest = {"format": "mlaan-pipeline-manifest", "step": step, **pipeline,
                "shards": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    path = shards / "manifest.json"
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", path)
    return path
