"""``lam_trunk="twins"``: LAM aux nets whose trunk is the EMA twins of the later blocks alone, shared across aux
nets (mlaan.engine.lam.TwinBank / TwinTrunk). The objective, isolation, EMA arithmetic, sharing, checkpoints."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import mlaan
from mlaan.engine.lam import EMATwin, LeapTrunk, TwinTrunk
from mlaan.engine.reference import reference_gradients


def batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def twins_model(method: str = "dgl+mlaan", k: int = 6, lam_trunk: str = "twins", **options) -> mlaan.LocalModel:
    torch.manual_seed(0)
    return mlaan.create_local_model("resnet20", method, k, lam_trunk=lam_trunk, **options)


def trunks(model: mlaan.LocalModel) -> list[TwinTrunk]:
    return [m for m in model.modules() if isinstance(m, TwinTrunk)]


def step(model: mlaan.LocalModel, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    return model.train_step(x, y)


@pytest.mark.parametrize("method,k,window,lam_trunk", [
    ("dgl+mlaan", 5, 2, "twins"), ("dgl+lam", 4, 2, "twins"), ("dgl+mlaan", 4, 3, "twins"),
    ("dgl+mlaan", 5, 2, "copy+twins"), ("dgl+lam", 4, 2, "copy+twins"),
])
def test_the_step_equals_the_objective(method, k, window, lam_trunk):
    model = twins_model(method, k, window=window, lam_trunk=lam_trunk)
    x, y = batch()
    expected = reference_gradients(copy.deepcopy(model), x, y)
    step(model, x, y)
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-6, msg=name)


def test_one_twin_per_later_block_shared_by_every_trunk_and_nothing_trained_in_a_trunk():
    model = twins_model(k=6)
    assert not model.leap_trunks and trunks(model)  # no copies: every LAM trunk is a trunk of twins
    bank = model.twin_bank.twins
    used = {i for t in trunks(model) for i in t.indices}
    assert used == {int(key) for key in bank}
    assert sum(len(t.indices) for t in trunks(model)) > len(bank)  # some twin is shared by two trunks
    for t in trunks(model):
        assert list(t.parameters()) == [] and list(t.buffers()) == []  # the bank holds them, once
    twin_ids = {id(p) for p in model.twin_bank.parameters()}
    assert not any(p.requires_grad for p in model.twin_bank.parameters())
    assert twin_ids.isdisjoint(id(p) for p in model.aux_parameters())
    assert twin_ids.isdisjoint(id(p) for g in model.param_groups(0.05) for p in g["params"])
    # at most one frozen backbone, however many aux nets
    assert sum(p.numel() for p in model.twin_bank.parameters()) <= sum(p.numel() for p in model.backbone.parameters())
    for key, twin in bank.items():
        real = model.backbone.blocks[int(key)].state_dict()
        assert all(torch.equal(v, real[n]) for n, v in twin.module.state_dict().items())


def test_copy_then_twins_trains_one_copy_of_the_first_later_block_per_trunk():
    """lam_trunk="copy+twins": each trunk is the paper's first trunk block (a trained copy A1 of the first later
    block plus its EMA twin) followed by twins. The copy starts as its block is, is an aux-net parameter (optimised
    and weight-decayed as the copies are), gets a gradient; the twins, shared in the bank, get none."""
    model = twins_model(k=6, lam_trunk="copy+twins")
    twins_only = twins_model(k=6)
    assert not model.leap_trunks and trunks(model)
    assert [t.indices for t in trunks(model)] == [t.indices for t in trunks(twins_only)]  # the same sampled blocks
    assert model.twin_bank.twins.keys() == twins_only.twin_bank.twins.keys()
    aux = {id(p) for p in model.aux_parameters()}
    for t in trunks(model):
        block = model.backbone.blocks[t.indices[0]].state_dict()
        assert all(torch.equal(v, block[k]) for k, v in t.lead.state_dict().items())
        assert t.lead is not model.backbone.blocks[t.indices[0]]
        assert all(p.requires_grad and id(p) in aux for p in t.lead.parameters())
    lead_numel = sum(p.numel() for t in trunks(model) for p in t.lead.parameters())
    assert sum(p.numel() for p in model.aux_parameters()) == sum(p.numel() for p in twins_only.aux_parameters()) \
        + lead_numel
    x, y = batch()
    step(model, x, y)
    assert all(p.grad is None for p in model.twin_bank.parameters())
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.lead.parameters()) for t in trunks(model))
    # A1(z) + E1(z), then E2 ... Ed: the twins-only trunk's chain, its first twin's output plus the copy's
    t = next(t for t in trunks(model) if len(t.indices) > 1)
    twins = [model.twin_bank.twins[str(i)] for i in t.indices]
    z = torch.randn(4, *trunk_input_shape(model, t))
    with torch.no_grad():
        expected = t.lead(z) + twins[0](z)
        for twin in twins[1:]:
            expected = twin(expected)
        assert torch.equal(t(z), expected)


def test_a_copy_then_twins_trunk_of_depth_one_is_the_papers_trunk_in_training_and_evaluation():
    """A1(z) + E1(z) is the paper's first trunk block, E1 with its running statistics in evaluation (its input is
    its block's), so a trunk of one block computes what the copies' trunk computes, in both modes."""
    ours, papers = twins_model(k=6, lam_trunk="copy+twins"), twins_model(k=6, lam_trunk="copies")
    for model in (ours, papers):  # running statistics of their own, the same in both models
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
    j = max(int(k) for k in ours.cascade_heads)
    trunk, leap = ours.cascade_heads[str(j)].trunk, papers.cascade_heads[str(j)].trunk
    assert len(trunk.indices) == 1 and len(leap.copies) == 1 and leap.source_index == trunk.indices[0]
    z = torch.randn(4, *trunk_input_shape(ours, trunk))
    for mode in (True, False):
        ours.train(mode)
        papers.train(mode)
        assert torch.equal(trunk(z), leap(z)), mode


def test_the_gradient_flows_through_the_twins_into_the_module_and_never_into_them():
    model = twins_model(k=6)
    x, y = batch()
    step(model, x, y)
    assert all(p.grad is None for p in model.twin_bank.parameters())
    for j in range(len(model.local_modules) - 1):  # each module learns: its weights get a non-zero gradient
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.local_modules[j].parameters()), j


def test_each_twin_follows_its_block_once_per_step_buffers_included():
    m = 0.9
    model = twins_model(k=6, ema_momentum=m)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    x, y = batch()
    for _ in range(2):
        before = {key: copy.deepcopy(t.module.state_dict()) for key, t in model.twin_bank.twins.items()}
        step(model, x, y)
        opt.step()
        model.after_optimizer_step()
        for key, twin in model.twin_bank.twins.items():
            real = model.backbone.blocks[int(key)].state_dict()
            for name, value in twin.module.state_dict().items():
                old = before[key][name]
                expected = m * old + (1 - m) * real[name]  # once, although several trunks run this twin
                if value.is_floating_point():
                    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=f"{key}.{name}")
                else:
                    assert value == expected.to(value.dtype)


def test_sharing_changes_no_number_against_a_twin_per_trunk():
    """A shared twin moves exactly as a trunk's own twin would: the twins of one block, each stepped on its own,
    stay equal to the shared one after steps."""
    model = twins_model(k=6)
    own = {(n, i): EMATwin(model.backbone.blocks[i], model.options.ema_momentum)
           for n, t in enumerate(trunks(model)) for i in t.indices}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = batch()
    for _ in range(2):
        step(model, x, y)
        opt.step()
        model.after_optimizer_step()
        for (_, i), twin in own.items():
            twin.follow(model.backbone.blocks[i])
    for (_, i), twin in own.items():
        shared = model.twin_bank.twins[str(i)].state_dict()
        assert all(torch.equal(v, shared[n]) for n, v in twin.state_dict().items())


@pytest.mark.parametrize("lam_trunk", ["twins", "copy+twins"])
def test_recomputation_changes_nothing(lam_trunk):
    plain = twins_model(k=4, lam_trunk=lam_trunk)
    recomputing = copy.deepcopy(plain)
    recomputing.set_grad_checkpointing(True)
    assert all(t.grad_checkpointing for t in trunks(recomputing))
    x, y = batch()
    assert step(plain, x, y)["module_losses"] == step(recomputing, x, y)["module_losses"]
    for p, q in zip(plain.parameters(), recomputing.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))


def test_a_state_dict_has_each_twin_once_and_restores_the_twins():
    model = twins_model(k=6)
    x, y = batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    step(model, x, y)
    opt.step()
    model.after_optimizer_step()
    state = model.state_dict()
    assert [k for k in state if "twin" in k] == [k for k in state if k.startswith("twin_bank.")]
    fresh = mlaan.create_local_model("resnet20", "dgl+mlaan", 6, lam_trunk="twins")
    fresh.load_state_dict(state)
    for key, twin in fresh.twin_bank.twins.items():
        assert all(torch.equal(v, state[f"twin_bank.twins.{key}.{n}"]) for n, v in twin.state_dict().items())
    assert step(fresh, x, y)["module_losses"] == step(model, x, y)["module_losses"]


def test_in_evaluation_the_twins_normalise_with_batch_statistics_and_keep_their_buffers():
    model = twins_model(k=6)
    x, _ = batch(16)
    trunk = next(t for t in trunks(model) if len(t.indices) > 1)
    z = torch.randn(16, *trunk_input_shape(model, trunk))
    for twin in model.twin_bank.twins.values():  # running statistics that fit no input: evaluation must not use them
        for m in twin.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(50.0)
                m.running_var.fill_(1e-4)
    buffers = {k: v.clone() for k, v in model.twin_bank.state_dict().items()}
    training = trunk(z)
    model.eval()
    evaluated = trunk(z)
    assert torch.equal(evaluated, training)  # the same batch statistics as in training
    assert all(torch.equal(v, buffers[k]) for k, v in model.twin_bank.state_dict().items())  # nothing tracked
    assert not any(m.training for m in model.modules())  # the model's mode is left as it was
    assert model.module_logits(x, "cascaded")[1].abs().max() < 1e3


def trunk_input_shape(model: mlaan.LocalModel, trunk: TwinTrunk) -> tuple[int, ...]:
    """(C, H, W) of the output of the block before the trunk's first twin, where the trunk's input comes from."""
    x, _ = batch(2)
    shapes = []
    h = model.backbone.resize(x) if hasattr(model.backbone, "resize") else x
    for block in model.backbone.blocks[: trunk.indices[0]]:
        h = block(h)
        shapes.append(h.shape[1:])
    return tuple(shapes[-1])


def test_copies_stay_the_default_and_build_no_bank():
    model = mlaan.create_local_model("resnet20", "dgl+mlaan", 6)
    assert model.twin_bank is None and model.leap_trunks and all(isinstance(t, LeapTrunk) for t in model.leap_trunks)
    with pytest.warns(UserWarning, match="does not read lam_trunk"):
        assert mlaan.create_local_model("resnet20", "dgl", 6, lam_trunk="twins").twin_bank is None  # no LAM


@pytest.mark.parametrize("options,needle", [
    ({"ema_lag": 1}, "ema_lag 1"), ({"ema_update": "last"}, "ema_update 'last'"),
])
def test_twins_that_could_not_be_shared_are_refused_in_one_line(options, needle):
    with pytest.raises(ValueError, match=f"lam_trunk 'twins' needs ema_update 'all' and ema_lag 0.*{needle}"):
        twins_model(**options)


@pytest.mark.parametrize("lam_trunk", ["twins", "copies"])
def test_adjacent_sampling_runs_the_blocks_right_after_each_module(lam_trunk):
    """--lam-sampling adjacent: module j's trunk runs the blocks right after it, in order (cut short at the head),
    against uniform sampling's spread up to the last block; the step is still the objective's gradient."""
    torch.manual_seed(0)
    model = mlaan.create_local_model("resnet20", "dgl+mlaan", 5, lam_trunk=lam_trunk, lam_sampling="adjacent")
    uniform = mlaan.create_local_model("resnet20", "dgl+mlaan", 5, lam_trunk=lam_trunk)
    for j, head in model.cascade_heads.items():
        last = model.split[int(j)][-1]
        depth = len(uniform.cascade_heads[j].trunk.indices if lam_trunk == "twins"
                    else uniform.cascade_heads[j].trunk.copies)
        expected = list(range(last + 1, min(last + 1 + depth, len(model.backbone.blocks) - 1)))
        if lam_trunk == "twins":
            assert list(head.trunk.indices) == expected
        else:  # each copy starts equal to the block it copies
            assert head.trunk.source_index == expected[0] and len(head.trunk.copies) == len(expected)
            for copied, i in zip(head.trunk.copies, expected, strict=True):
                block = model.backbone.blocks[i].state_dict()
                assert all(torch.equal(v, block[k]) for k, v in copied.state_dict().items())
    if lam_trunk == "twins":  # resnet20 K=5: module 1's uniform trunk skips blocks, the adjacent one does not
        assert list(uniform.cascade_heads["1"].trunk.indices) != list(model.cascade_heads["1"].trunk.indices)
    x, y = batch()
    expected_grads = reference_gradients(copy.deepcopy(model), x, y)
    step(model, x, y)
    for (name, p), e in zip(model.named_parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), e, rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_an_unknown_sampling_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"lam_sampling.*'near'.*uniform.*adjacent"):
        mlaan.create_local_model("resnet20", "dgl+mlaan", 4, lam_sampling="near")


def test_an_unknown_trunk_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"lam_trunk.*'shared'.*copies.*twins.*copy\+twins"):
        mlaan.create_local_model("resnet20", "dgl+mlaan", 4, lam_trunk="shared")


# ------------------------------------------------------------------------- refused before anything runs
@pytest.mark.parametrize("argv", [
    ["memory", "--archs", "resnet20", "--ks", "4", "--methods", "dgl,dgl+mlaan", "--option", "lam_trunk=twins",
     "--option", "ema_lag=1"],
    ["frontier", "--arch", "resnet20", "--ks", "2", "--methods", "bp,dgl+mlaan", "--segments", "1",
     "--variant", "twins=lam_trunk=twins,ema_update=last"],
    ["frontier", "--arch", "resnet20", "--ks", "2", "--methods", "bp,dgl+mlaan", "--segments", "1",
     "--option", "ema_lag=1", "--variant", "twins=lam_trunk=twins"],
])
def test_a_bench_of_twins_that_could_not_be_shared_is_refused_in_one_line(tmp_path, capsys, argv):
    """bench memory measured every case in its own process, each failing with a traceback in the table's error
    cell, exit 0; bench frontier measured BP, then died with a RuntimeError traceback. Now one line, exit 2,
    before anything is measured or written."""
    from mlaan.cli import main

    out = tmp_path / "out"
    code = main(["bench", *argv, "--batch", "2", "--threads", "1", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mlaan: error: ") and err.count("\n") == 1, err
    assert "with dgl+mlaan: lam_trunk 'twins' needs ema_update 'all' and ema_lag 0" in err
    assert not out.exists()


def test_a_bench_option_no_lam_method_reads_is_not_refused_but_warned_of():
    from mlaan.bench import common

    with pytest.warns(UserWarning, match="--option lam_trunk=twins: no method of bp, dgl, dgl\\+mlm reads it"):
        common.check_options(["bp", "dgl", "dgl+mlm"], {"lam_trunk": "twins", "ema_lag": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one method that reads it: no warning
        common.check_options(["bp", "dgl+mlaan"], {"lam_trunk": "twins"})


@pytest.mark.parametrize("lam_trunk", ["twins", "copy+twins"])
def test_parallel_modules_refuses_twins_naming_the_flags(tmp_path, capsys, lam_trunk):
    """Under --parallel modules the engine's refusal said 'got ema_update 'all' and ema_lag 1': an ema_lag the
    user never gave (--parallel modules sets it). Now the refusal names --lam-trunk twins and --parallel modules."""
    from mlaan.cli import main

    code = main(["train", "--device", "cpu", "--dataset", "synthetic", "--arch", "resnet20", "-K", "4",
                 "--method", "dgl+mlaan", "--lam-trunk", lam_trunk, "--parallel", "modules", "--threads", "1",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"mlaan: error: --lam-trunk {lam_trunk} is not supported with --parallel modules"), err
    assert "ema_lag" not in err and not (tmp_path / "run").exists()


def test_print_config_refuses_twins_with_ema_update_last_as_the_run_would(tmp_path, capsys):
    """--print-config resolved the options without the engine's twins check, so it printed a config that `mlaan
    train` then refused when it built the model; `bench accuracy` checks its arms by the same resolution."""
    from mlaan.cli import main

    code = main(["train", "--dataset", "synthetic", "--arch", "resnet20", "-K", "4", "--method", "dgl+mlaan",
                 "--lam-trunk", "twins", "--ema-update", "last", "--print-config", "--output-dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and captured.err.count("\n") == 1, captured
    assert "lam_trunk 'twins' needs ema_update 'all' and ema_lag 0" in captured.err
    assert main(["train", "--dataset", "synthetic", "--arch", "resnet20", "-K", "4", "--method", "dgl",
                 "--lam-trunk", "twins", "--ema-update", "last", "--print-config"]) == 0  # dgl reads neither


@pytest.mark.parametrize("saved,built", [("twins", "copies"), ("copies", "twins"), ("copy+twins", "twins"),
                                         ("twins", "copy+twins"), ("copy+twins", "copies"), ("copies", "copy+twins")])
def test_a_state_of_the_other_trunk_is_refused_naming_both(saved, built):
    """A twins run's state loaded into a copies model (or back) failed with torch's list of every trunk key
    missing and unexpected, whose first line (all that a checkpoint loader shows) said nothing."""
    state = mlaan.create_local_model("resnet20", "dgl+mlaan", 4, lam_trunk=saved).state_dict()
    model = mlaan.create_local_model("resnet20", "dgl+mlaan", 4, lam_trunk=built)
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(state)
    first = str(err.value).splitlines()[0]
    assert f"lam_trunk={saved!r}, this model's lam_trunk={built!r}" in first, first
    model.load_state_dict(state, strict=False)  # asked for: a partial load, as torch's
    mlaan.create_local_model("resnet20", "dgl+mlaan", 4, lam_trunk=saved).load_state_dict(state)


def test_a_twins_run_resumed_mid_epoch_continues_bit_identically(tmp_path):
    """mlaan train --lam-trunk twins stopped after 5 of 8 steps and resumed: the same state, twins included, as
    the run trained in one go."""
    from test_training import run

    # one thread each: by default a run takes the cores idle at its start, and a bit-identical resume needs the
    # same count (on a busy machine the two runs could get different ones)
    straight, _ = run(tmp_path, "straight", lam_trunk="twins", threads=1)
    run(tmp_path, "resumed", lam_trunk="twins", max_steps=5, threads=1)
    resumed, summary = run(tmp_path, "resumed", resume="auto", lam_trunk="twins", threads=1)
    assert summary["steps"] == 8 and resumed.local_model.twin_bank is not None
    a, b = straight.local_model.state_dict(), resumed.local_model.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("twin_bank.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
