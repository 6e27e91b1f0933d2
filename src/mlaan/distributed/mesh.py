"""Pipeline replicas (``--parallel modules --data-parallel R``): R copies of a P-stage module pipeline on R × P
torchrun processes, each stage averaging its gradients with the same stage of the other replicas.

Rank layout, PyTorch's ``DeviceMesh`` of shape (R, P) with dimensions ``("dp", "pp")``, row-major: global rank
``d·P + s`` is stage ``s`` of replica ``d``. So replica ``d`` holds ranks ``d·P … d·P + P − 1`` (its pipeline
messages — activations, cascaded gradients, EMA snapshots — stay among them), and stage ``s`` is ranks
``s, P + s, 2P + s, …`` (its gradient all-reduce and BatchNorm statistics go among them). With R = 1 this is the
plain pipeline (rank = stage) and no group is built.

:func:`check_layout` says in one line why a layout is refused; :func:`build_groups` builds the two process groups
of this rank (``init_device_mesh``, which works on gloo and CPU tensors as on NCCL), a collective every rank calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist


@dataclass(frozen=True)
class ReplicaLayout:
    """R replicas of a P-stage pipeline on R × P ranks (global rank ``replica·P + stage``)."""

    replicas: int
    stages: int

    @property
    def world_size(self) -> int:
        return self.replicas * self.stages

    def replica(self, rank: int) -> int:
        """The replica (data-parallel index, 0 … R−1) global rank ``rank`` belongs to."""
        return rank // self.stages

    def stage(self, rank: int) -> int:
        """The pipeline stage (0 … P−1) global rank ``rank`` trains."""
        return rank % self.stages

    def replica_ranks(self, replica: int) -> list[int]:
        """The global ranks of one replica's stages, stage by stage: its pipeline group."""
        return [replica * self.stages + s for s in range(self.stages)]

    def stage_ranks(self, stage: int) -> list[int]:
        """The global ranks that train ``stage``, replica by replica: its data-parallel group."""
        return [d * self.stages + stage for d in range(self.replicas)]


def check_layout(world_size: int, data_parallel: int, parallel: str) -> ReplicaLayout:
    """The layout of ``world_size`` processes with ``data_parallel`` (R) replicas; ValueError in one line when
    R < 1, R > 1 without ``parallel="modules"``, ``world_size`` not a multiple of R, or fewer than 2 stages per
    replica (that is data parallelism: ``--parallel data``)."""
    r = data_parallel
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"--data-parallel must be a number of replicas >= 1, got {r!r}")
    if r == 1:
        return ReplicaLayout(1, world_size)
    if parallel != "modules":
        raise ValueError(f"--data-parallel {r} replicates a module pipeline: it needs --parallel modules "
                         "(--parallel data alone already splits every batch over all processes; a resumed run "
                         "keeps its --data-parallel: add --data-parallel 1 to resume it under --parallel data)")
    if world_size % r:
        raise ValueError(f"--data-parallel {r} does not divide the {world_size} processes into equal replicas: "
                         f"start a multiple of {r} processes")
    if world_size // r < 2:
        raise ValueError(f"--data-parallel {r} on {world_size} processes leaves one stage per replica, i.e. no "
                         "pipeline: use --parallel data")
    return ReplicaLayout(r, world_size // r)


def build_groups(layout: ReplicaLayout, device_type: str) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's (pipeline group of its replica, data-parallel group of its stage), from a ``DeviceMesh`` of
    shape (R, P) named ("dp", "pp"). Collective: every rank of the default group calls it, in the same order."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (layout.replicas, layout.stages), mesh_dim_names=("dp", "pp"))
    return mesh.get_group("pp"), mesh.get_group("dp")
