"""Selective recomputation (``checkpoint_modules=N``): with ``grad_checkpointing``, only the first N local modules
recompute (their aux nets and cascade-window graphs). Results stay bit-identical; the peak lies between the plain
and the fully recomputed step's."""

from __future__ import annotations

import copy

import pytest
import torch

import mlaan
from mlaan.bench import common, memory
from mlaan.engine.heads import StackedLoss
from mlaan.engine.lam import LeapTrunk


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


# ------------------------------------------------------------------ checkpoint_trunk="lead": only each trunk's lead
def _calls_per_step(model: mlaan.LocalModel, blocks: list[torch.nn.Module], x, y) -> list[int]:
    """How many times each of ``blocks`` began its forward in one training step (2: once more in backward; a
    pre-hook, as checkpoint's recompute stops once it has what backward needs, before a forward hook would fire)."""
    counts = [0] * len(blocks)
    handles = [b.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(blocks)]
    model.train_step(x, y)
    for h in handles:
        h.remove()
    return counts


def _lead_and_rest(model: mlaan.LocalModel) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """The lead blocks (run at the module's resolution) and the later blocks of module 1's cascaded aux trunk."""
    trunk = model.cascade_heads["1"].trunk
    if isinstance(trunk, LeapTrunk):
        return [trunk.copies[0], trunk.twin], list(trunk.copies[1:])
    twins = [model.twin_bank.twins[str(i)] for i in trunk.indices]
    lead = [trunk.lead, twins[0]] if trunk.lead is not None else twins[:1]
    return lead, twins[1:]


@pytest.mark.parametrize("lam_trunk", ["copies", "twins", "copy+twins"])
def test_lead_recomputes_only_each_trunks_first_block_and_changes_no_number(lam_trunk):
    torch.manual_seed(0)
    plain = mlaan.create_local_model("resnet20", "dgl+mlaan", 4, lam_trunk=lam_trunk)
    lead = copy.deepcopy(plain)
    lead.options.checkpoint_trunk = "lead"
    lead.set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    counted, every = copy.deepcopy(lead), copy.deepcopy(plain)
    assert plain.train_step(x, y)["module_losses"] == lead.train_step(x, y)["module_losses"]
    for p, q in zip(plain.parameters(), lead.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    assert all(torch.equal(v, lead.state_dict()[k]) for k, v in plain.state_dict().items())
    first, rest = _lead_and_rest(counted)
    assert rest, "module 1's trunk should have blocks after its lead"
    calls = _calls_per_step(counted, first + rest, x, y)
    assert calls == [2] * len(first) + [1] * len(rest)  # the lead recomputed in backward, the rest kept
    every.set_grad_checkpointing(True)
    assert _calls_per_step(every, [*_lead_and_rest(every)[0], *_lead_and_rest(every)[1]], x, y) == [2] * len(calls)


def test_auglocal_lead_recomputes_only_its_first_aux_block():
    torch.manual_seed(0)
    model = mlaan.create_local_model("resnet20", "auglocal", 4, grad_checkpointing=True, checkpoint_trunk="lead")
    trunk = model.independent_heads[0].trunk
    assert isinstance(trunk, torch.nn.Sequential) and len(trunk) >= 2
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    assert _calls_per_step(model, list(trunk), x, y) == [2] + [1] * (len(trunk) - 1)


def test_recomputing_the_leads_lowers_the_peak_at_most_as_far_as_recomputing_everything():
    peaks = [memory.measure_case("resnet20", "dgl+mlaan", 10, batch=8, options=o)["peak_bytes"]
             for o in ({}, {"grad_checkpointing": True, "checkpoint_trunk": "lead"}, {"grad_checkpointing": True})]
    assert peaks[0] > peaks[1] >= peaks[2]
    on = {"grad_checkpointing": True, "checkpoint_modules": 7, "checkpoint_trunk": "lead"}
    assert common.label({"method": "dgl+mlaan", "options": on}) == "dgl+mlaan +ckpt first=7 trunk=lead"
    assert common.label_with_options({"method": "dgl+mlaan", "options": on}) == "dgl+mlaan +ckpt first=7 trunk=lead"


def test_bp_and_a_run_without_recomputation_do_not_read_the_trunk_choice(capsys):
    from mlaan.cli import main
    from mlaan.engine.options import options_ignored

    assert "checkpoint_trunk" in options_ignored("bp", {"grad_checkpointing": True, "checkpoint_trunk": "lead"})
    assert "checkpoint_trunk" in options_ignored("dgl+mlaan", {"checkpoint_trunk": "lead"})
    # +mlm recomputes window graphs but has no trunk: the choice was taken without a word (and benches timed a
    # 'dgl+mlm +ckpt trunk=lead' point identical to 'dgl+mlm +ckpt')
    assert "checkpoint_trunk" in options_ignored("dgl+mlm", {"grad_checkpointing": True, "checkpoint_trunk": "lead"})
    assert "checkpoint_trunk" not in options_ignored("auglocal", {"grad_checkpointing": True,
                                                                  "checkpoint_trunk": "lead"})
    assert "checkpoint_trunk" not in options_ignored("dgl+mlaan", {"grad_checkpointing": True,
                                                                   "checkpoint_trunk": "lead"})
    assert main(["train", "--checkpoint-trunk", "first", "--print-config"]) == 2
    assert "unknown checkpoint_trunk 'first'; allowed: all, lead" in capsys.readouterr().err
