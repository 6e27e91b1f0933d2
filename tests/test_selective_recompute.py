"""Selective recomputation (``checkpoint_modules=N``): with ``grad_checkpointing``, only the first N local modules
recompute (their aux nets and cascade-window graphs). Results stay bit-identical; the peak lies between the plain
and the fully recomputed step's."""

from __future__ import annotations

import copy

import torch

import mlaan
from mlaan.bench import common, memory
from mlaan.engine.heads import StackedLoss


def test_only_the_first_modules_recompute_and_results_are_bit_identical():
    torch.manual_seed(0)
    plain = mlaan.create_local_model("resnet20", "dgl+mlaan", 4)
    selective = copy.deepcopy(plain)
    selective.options.checkpoint_modules = 2
    selective.set_grad_checkpointing(True)
    flags = {int(j): h.grad_checkpointing for j, h in selective.cascade_heads.items() if isinstance(h, StackedLoss)}
    assert flags == {1: True, 2: False}
    assert [selective.recomputes_module(j) for j in range(4)] == [True, True, False, False]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    assert plain.train_step(x, y)["module_losses"] == selective.train_step(x, y)["module_losses"]
    for p, q in zip(plain.parameters(), selective.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    state, other = plain.state_dict(), selective.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)


def test_selective_recomputation_lowers_the_peak_less_than_all_of_it():
    peaks = [memory.measure_case("resnet20", "dgl+mlaan", 10, batch=8, options=o)["peak_bytes"]
             for o in ({}, {"grad_checkpointing": True, "checkpoint_modules": 2}, {"grad_checkpointing": True})]
    assert peaks[0] > peaks[1] > peaks[2]
    assert common.label({"method": "dgl+mlaan", "options": {"grad_checkpointing": True,
                                                            "checkpoint_modules": 8}}) == "dgl+mlaan +ckpt first=8"


def test_bp_does_not_read_the_choice_of_modules():
    """bp's one module is among the first N for every N >= 1, so checkpoint_modules changes nothing there: a
    `bench frontier --variant sel=checkpoint_modules=4` measured a 'bp sel +ckpt' point identical to bp +ckpt, and
    `mlaan train --method bp` took the flag without a word."""
    from mlaan.engine.options import options_ignored

    on = {"grad_checkpointing": True, "checkpoint_modules": 4}
    assert "checkpoint_modules" in options_ignored("bp", on)
    assert "checkpoint_modules" not in options_ignored("dgl+mlaan", on)
    assert "checkpoint_modules" not in options_ignored("auglocal", on)
