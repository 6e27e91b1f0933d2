"""``balance="memory"`` (issue 15.2): the block profile separates what scales with the batch from what does not,
and the split it gives, at the run's batch size, holds less memory than the even split in the exact accounting
of ``mlaan bench memory``."""

from __future__ import annotations

import pytest

import mlaan
from mlaan.bench.memory import measure_case


def sizes(model) -> list[int]:
    return [len(r) for r in model.split]


def test_profile_separates_activations_from_weight_memory():
    model = mlaan.create_local_model("resnet32", method="dgl", num_local_modules=8)
    profile, blocks = model.profile, model.backbone.blocks
    first, last = 1, 15  # a 32x32x16 block, an 8x8x64 block
    # an image's activations shrink with the resolution; the weights (whose gradients are the fixed part) grow
    assert profile.sample_bytes[first] > 2 * profile.sample_bytes[last]
    assert profile.fixed_bytes[last] > 4 * profile.fixed_bytes[first]
    grads = sum(p.numel() * p.element_size() for p in blocks[last].parameters())
    assert grads <= profile.fixed_bytes[last] < grads + 4096  # + BatchNorm's per-channel statistics
    assert profile.step_bytes(100) == [100 * s + f for s, f in zip(profile.sample_bytes, profile.fixed_bytes)]


def test_memory_split_at_a_training_batch_gives_low_resolution_modules_the_most_blocks():
    model = mlaan.create_local_model("resnet32", method="dgl", num_local_modules=8, balance="memory",
                                     balance_batch_size=128)
    got = sizes(model)
    assert sum(got) == 16 and got[-1] == max(got) and max(got[1:5]) == 1  # 32x32 stage: a block a module
    # at a batch of two the weight gradients outweigh the activations: the split follows the run's batch
    tiny = mlaan.create_local_model("resnet32", method="dgl", num_local_modules=8, balance="memory",
                                    balance_batch_size=2)
    assert sizes(tiny) != got


@pytest.mark.parametrize("arch,k,batch", [("resnet32", 8, 32), ("resnet20", 4, 16)])
def test_memory_split_holds_less_than_the_even_split_in_the_accounting(arch, k, batch):
    """`mlaan bench memory`'s exact accounting of a real training step at the batch the split was made for."""
    peak = {balance: measure_case(arch, "dgl", k, batch, options={"balance": balance})["peak_bytes"]
            for balance in ("blocks", "memory")}
    assert peak["memory"] < peak["blocks"], peak


def test_memory_split_is_balanced_at_the_trainers_batch(tmp_path):
    from mlaan.training.config import TrainConfig

    options = TrainConfig(batch_size=48, balance="memory").engine_options((0.5,), (0.25,))
    assert options["balance_batch_size"] == 48 and options["balance"] == "memory"


def test_bad_balance_batch_is_refused():
    with pytest.raises(ValueError, match="balance_batch_size must be at least 1, got 0"):
        mlaan.create_local_model("resnet20", method="dgl", num_local_modules=4, balance="memory",
                                 balance_batch_size=0)
