"""The module pipeline's messages agree on both ends: the cascades a rank waits for are exactly the ones the next
rank sends it, for any window and any cascade barriers (a rank that waited for a cascade never sent would hang in
its receive). One process: each rank's PipelineStep is run in turn, the next rank's outbox read directly."""

import functools

import pytest
import torch

from mlaan import create_local_model
from mlaan.distributed.pipeline import PipelineStep


def _sent_and_awaited(k: int, window: int, barriers: tuple[int, ...], cut: int) -> tuple[list[int], list[int]]:
    """(modules whose cascades the run ``cut..k-1`` sends to the run ``0..cut-1``, those the earlier run awaits)."""
    torch.manual_seed(0)
    model = create_local_model("resnet20", method="dgl+mlaan", num_local_modules=k, image_size=16, window=window,
                               cascade_barriers=barriers)
    images, targets = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    first = model.begin_step(images, targets, step_type=functools.partial(PipelineStep, modules=range(0, cut)))
    x = images
    for j in first.modules:
        x = first.run_module(j, x)
    second = model.begin_step(images, targets, step_type=functools.partial(PipelineStep, modules=range(cut, k)))
    for j in second.modules:
        x = second.run_module(j, x)
    second.finish()
    return [j for j, _ in second.outbox], first.cascades_to_receive()


@pytest.mark.parametrize("window,barriers", [(2, ()), (3, ()), (3, (2,)), (3, (3,)), (4, (3,)), (4, (2, 4))])
def test_a_rank_awaits_exactly_the_cascades_the_next_rank_sends(window, barriers):
    sent, awaited = _sent_and_awaited(k=6, window=window, barriers=barriers, cut=2)
    assert sent == awaited


def test_a_barrier_inside_the_next_ranks_window_stops_the_later_cascade():
    # K=6, window 3, a barrier after module 2: module 3's cascade stops at module 3, so rank 0 (modules 0-1)
    # receives module 2's only (it used to wait for module 3's too, and hang)
    sent, awaited = _sent_and_awaited(k=6, window=3, barriers=(2,), cut=2)
    assert sent == awaited == [2]
