"""BP with activation checkpointing, the memory baseline: ``create_local_model(arch, "bp", grad_checkpointing=True)``
checkpoints every backbone block (or segments of ``checkpoint_segment`` blocks). It must compute exactly what
plain BP computes, move BatchNorm's running statistics once per step, and hold less memory by the accountant."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import mlaan
from mlaan.bench import common, memory
from mlaan.cli import main
from mlaan.engine import parse_method
from mlaan.engine.options import options_ignored


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def two_sgd_steps(model: mlaan.LocalModel, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        losses.append(model.train_step(x, y)["loss"])
        opt.step()
    return losses


@pytest.mark.parametrize("segment", [1, 2, 4, 100])
def test_checkpointed_bp_is_bit_identical_to_bp(segment):
    """Same losses, gradients, weights and BatchNorm statistics after two SGD steps, bit for bit: the recompute runs
    the same kernels on the same inputs (CPU, deterministic), and its BatchNorm updates are put back. A segment
    longer than the network is one checkpoint around it all."""
    torch.manual_seed(0)
    plain = mlaan.create_local_model("resnet20", "bp")
    checkpointed = copy.deepcopy(plain)
    checkpointed.options.checkpoint_segment = segment
    checkpointed.set_grad_checkpointing(True)
    x, y = batch()
    assert two_sgd_steps(plain, x, y) == two_sgd_steps(checkpointed, x, y)
    for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    state, other = plain.state_dict(), checkpointed.state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)


def test_a_segment_spanning_the_whole_network_is_warned_of():
    """A breaker found checkpoint_segment above the block count accepted silently: one checkpoint around the
    whole network holds BP's peak in its backward. resnet20 has 11 blocks (stem, 9 residual blocks, head): a
    segment of 10 leaves only the head (a pool and a linear layer) outside."""
    assert len(mlaan.create_local_model("resnet20", "bp").backbone.blocks) == 11
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlaan.create_local_model("resnet20", "bp", grad_checkpointing=True, checkpoint_segment=9)
        mlaan.create_local_model("resnet20", "bp", checkpoint_segment=11)  # not read without grad_checkpointing
        assert not [w for w in caught if "spans all" in str(w.message)]
        for segment in (10, 50):
            mlaan.create_local_model("resnet20", "bp", grad_checkpointing=True, checkpoint_segment=segment)
    texts = [str(w.message) for w in caught if "spans all" in str(w.message)]
    assert texts == [f"checkpoint_segment={s} spans all 10 backbone blocks before the head: one segment of the whole "
                     "network, whose backward holds every activation as plain BP does; the least memory is near 3 "
                     "blocks a segment" for s in (10, 50)]


def test_checkpointed_bp_moves_batchnorm_statistics_once_per_step():
    model = mlaan.create_local_model("resnet20", "bp", grad_checkpointing=True, checkpoint_segment=3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    model.train_step(*batch())
    assert all(int(m.num_batches_tracked) == 1 for m in norms)
    assert all(not torch.equal(m.running_mean, b) for m, b in zip(norms, before))


def test_checkpointed_bp_is_exact_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    plain = mlaan.create_local_model("resnet20", "bp").set_channels_last(True)
    plain.autocast_dtype = torch.bfloat16
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x, y = batch()
    assert plain.train_step(x, y)["loss"] == checkpointed.train_step(x, y)["loss"]
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), checkpointed.parameters()))


def test_bp_reads_grad_checkpointing_and_its_segment_only_with_it():
    spec = parse_method("bp")
    assert spec.can_recompute and {"grad_checkpointing", "checkpoint_segment"} <= spec.engine_options
    assert "checkpoint_segment" in options_ignored("bp", {})
    assert "checkpoint_segment" not in options_ignored("bp", {"grad_checkpointing": True})
    assert "checkpoint_segment" in options_ignored("dgl+mlaan", {"grad_checkpointing": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlaan.create_local_model("resnet20", "bp", grad_checkpointing=True, checkpoint_segment=3)
    with pytest.warns(UserWarning, match=r"does not read checkpoint_segment=3 \(read only with "
                                         r"grad_checkpointing=True"):
        mlaan.create_local_model("resnet20", "bp", checkpoint_segment=3)
    with pytest.raises(ValueError, match="checkpoint_segment must be at least 1, got 0"):
        mlaan.create_local_model("resnet20", "bp", grad_checkpointing=True, checkpoint_segment=0)


def test_checkpointed_bp_holds_less_memory_by_the_accountant():
    """Every block checkpointed keeps only block inputs for backward; segments of 3 keep fewer inputs but one
    segment's activations at a time: both well under plain BP at this depth (resnet20: 9 blocks + stem)."""
    bp = memory.measure_case("resnet20", "bp", 1, batch=8)
    every = memory.measure_case("resnet20", "bp", 1, batch=8, options={"grad_checkpointing": True})
    seg = memory.measure_case("resnet20", "bp", 1, batch=8,
                              options={"grad_checkpointing": True, "checkpoint_segment": 3})
    saved = "autograd-saved activations"
    for r in (every, seg):
        assert r["peak_bytes"] < 0.75 * bp["peak_bytes"]
        assert r["breakdown"][saved] < 0.5 * bp["breakdown"][saved]
    results = [every, bp, seg]
    memory.add_percentages(results)  # relative to plain BP, wherever it sits in the list
    assert bp["pct_of_bp"] == 100.0 and every["pct_of_bp"] < 75 and seg["pct_of_bp"] < 75


def test_benchmarks_plan_and_name_checkpointed_bp_as_bp():
    cases = [("resnet20", "bp", 1), ("resnet20", "dgl", 4), ("resnet20", "dgl+mlaan", 4)]
    on = common.plan_variants(cases, {}, "on")
    # plain BP stays in the plan, first: every ratio is taken to it
    assert [(m, o.get("grad_checkpointing")) for _, m, _, o in on] == [
        ("bp", False), ("bp", True), ("dgl", None), ("dgl+mlaan", True)]
    assert [m for _, m, _, _ in common.plan_variants(cases, {}, "off")] == ["bp", "dgl", "dgl+mlaan"]
    assert common.label({"method": "bp", "options": {"grad_checkpointing": True}}) == "bp +ckpt"
    assert common.label({"method": "bp", "options": {"grad_checkpointing": True, "checkpoint_segment": 3}}) == (
        "bp +ckpt seg=3")
    assert common.label({"method": "bp", "options": {"checkpoint_segment": 3}}) == "bp"
    assert common.is_reference({"method": "bp", "options": {}})
    assert not common.is_reference({"method": "bp", "options": {"grad_checkpointing": True}})


def test_mlaan_train_runs_checkpointed_bp(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--synthetic-test-size", "64", "--train-samples", "128",
            "--batch-size", "64", "--max-steps", "2", "--arch", "resnet20", "--method", "bp",
            "--grad-checkpointing", "--checkpoint-segment", "2", "--output-dir", str(out)]
    assert main(args) == 0
    _, err = capsys.readouterr()
    assert "does not read" not in err
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["grad_checkpointing"] is True and config["checkpoint_segment"] == 2
