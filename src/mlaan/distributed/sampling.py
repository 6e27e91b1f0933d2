"""Which samples each rank reads: a shuffled 1/N of every training epoch, a disjoint shard of the evaluation set."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler, Sampler

from .context import DistContext


def make_train_sampler(dataset: Sized, ctx: DistContext, seed: int = 0) -> Sampler | None:
    """A shuffling ``DistributedSampler`` under torchrun (each rank a disjoint 1/N of every epoch, padded to
    equal length), None in a single process (let the DataLoader shuffle). Call ``sampler.set_epoch(epoch)``
    at the start of each epoch, or every epoch has the same order."""
    if not ctx.enabled:
        return None
    return DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=False
    )


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + N, rank + 2N, …``: disjoint shards covering the data set once, no padding, so
    summed ``correct``/``total`` counts give the exact accuracy over the whole evaluation set."""

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_eval_sampler(dataset: Sized, ctx: DistContext) -> Sampler | None:
    """A :class:`ShardSampler` under torchrun (evaluate 1/N per rank, then ``reduce_metrics`` the counts),
    None in a single process."""
    if not ctx.enabled:
        return None
    return ShardSampler(dataset, ctx.rank, ctx.world_size)
