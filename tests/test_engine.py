"""Behaviour of the local-learning engine: gradients, isolation, EMA, counts, export, every K."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlaan
from mlaan.engine import parse_method
from mlaan.engine.lam import LeapTrunk
from mlaan.engine.reference import reference_gradients

BATCH = 6


def batch(in_channels: int = 3, size: int = 32, classes: int = 10, n: int = BATCH):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, in_channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def grads_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.requires_grad]


def step(model: mlaan.LocalModel, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    return model.train_step(x, y)


# ------------------------------------------------------------------------------------------------- 1. BP
def test_bp_matches_plain_backbone_cross_entropy():
    model = mlaan.create_local_model("resnet20", method="bp", num_local_modules=1)
    plain = mlaan.models.create("resnet20")
    plain.load_state_dict(model.backbone.state_dict())
    x, y = batch()
    step(model, x, y)
    F.cross_entropy(plain(x), y).backward()
    for (name, p), q in zip(model.backbone.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- reference: naive recomputation
@pytest.mark.parametrize(
    "method,k,window",
    [("dgl", 4, 2), ("dgl+mlaan", 5, 2), ("dgl+mlm", 5, 3), ("infopro+mlaan", 4, 2), ("auglocal+mlaan", 4, 3),
     ("dgl+lam", 4, 2), ("dgl+mlaan", 2, 2)],
)
def test_retained_graph_schedule_equals_naive_recomputation(method, k, window):
    model = mlaan.create_local_model("resnet20", method=method, num_local_modules=k, window=window)
    x, y = batch()
    reference_model = copy.deepcopy(model)
    expected = reference_gradients(reference_model, x, y)
    step(model, x, y)
    for (name, p), e in zip(model.named_parameters(), expected):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, e, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------- 2. isolation
def perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def module_j_grads_after(model, j, perturb_modules, perturb_heads, x, y):
    m = copy.deepcopy(model)
    for i in perturb_modules:
        perturb(m.local_modules[i])
    for i in perturb_heads:
        if i < len(m.independent_heads):
            perturb(m.independent_heads[i])
        if str(i) in m.cascade_heads:
            perturb(m.cascade_heads[str(i)])
    step(m, x, y)
    return grads_of(m.local_modules[j])


def same(a, b):
    return all(torch.allclose(u, v, rtol=1e-5, atol=1e-7) for u, v in zip(a, b))


@pytest.mark.parametrize("method", ["dgl", "infopro", "auglocal", "dgl+lam"])
def test_base_methods_isolate_each_module(method):
    k, j = 5, 1
    model = mlaan.create_local_model("resnet20", method=method, num_local_modules=k)
    x, y = batch()
    base = module_j_grads_after(model, j, [], [], x, y)
    later = range(j + 1, k)
    assert same(base, module_j_grads_after(model, j, later, later, x, y))


@pytest.mark.parametrize("method,window", [("dgl+mlaan", 2), ("dgl+mlm", 2), ("dgl+mlaan", 3), ("infopro+mlaan", 2)])
def test_cascade_reaches_exactly_its_window(method, window):
    k, j = 6, 1
    model = mlaan.create_local_model("resnet20", method=method, num_local_modules=k, window=window)
    x, y = batch()
    base = module_j_grads_after(model, j, [], [], x, y)
    beyond = range(j + window, k)
    assert same(base, module_j_grads_after(model, j, beyond, beyond, x, y))
    assert not same(base, module_j_grads_after(model, j, [j + 1], [], x, y))
    if window >= 3:
        assert not same(base, module_j_grads_after(model, j, [j + window - 1], [], x, y))


# ------------------------------------------------------------------------------------------------- 3. EMA
def test_every_ema_twin_follows_its_block_buffers_included():
    m = 0.9
    model = mlaan.create_local_model("resnet20", method="dgl+mlaan", num_local_modules=6, ema_momentum=m)
    trunks = model.leap_trunks
    assert len(trunks) == 4  # modules 1..4 have cascades
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    x, y = batch()
    for _ in range(2):
        before = [copy.deepcopy(t.twin.module.state_dict()) for t in trunks]
        step(model, x, y)
        for t in trunks:
            assert all(p.grad is None and not p.requires_grad for p in t.twin.parameters())
        opt.step()
        for t, old in zip(trunks, before):  # the optimizer did not move the twins
            for key, value in t.twin.module.state_dict().items():
                torch.testing.assert_close(value, old[key], rtol=0, atol=0)
        model.after_optimizer_step()
        for t, old in zip(trunks, before):
            real = model.backbone.blocks[t.source_index].state_dict()
            for key, value in t.twin.module.state_dict().items():
                if value.is_floating_point():
                    expected = m * old[key] + (1 - m) * real[key]
                    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
                else:
                    assert value == (old[key] * m + real[key] * (1 - m)).to(value.dtype), key
            assert any(not torch.equal(v, old[k_]) for k_, v in t.twin.module.state_dict().items())


def test_ema_update_last_moves_only_the_last_twin():
    model = mlaan.create_local_model("resnet20", method="dgl+mlaan", num_local_modules=5, ema_update="last")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = [copy.deepcopy(t.twin.module.state_dict()) for t in model.leap_trunks]
    step(model, *batch())
    opt.step()
    model.after_optimizer_step()
    moved = [any(not torch.equal(v, old[k]) for k, v in t.twin.module.state_dict().items())
             for t, old in zip(model.leap_trunks, before)]
    assert moved == [False] * (len(moved) - 1) + [True]


# -------------------------------------------------------------------------------------- 4. LAM construction
def test_lam_copies_and_twins_start_equal_to_their_blocks():
    model = mlaan.create_local_model("resnet32", method="dgl+mlaan", num_local_modules=16)
    for trunk in model.leap_trunks:
        real = model.backbone.blocks[trunk.source_index].state_dict()
        for key, value in trunk.twin.module.state_dict().items():
            assert torch.equal(value, real[key])
        assert trunk.copies[0] is not model.backbone.blocks[trunk.source_index]
        for key, value in trunk.copies[0].state_dict().items():
            assert torch.equal(value, real[key])


@pytest.mark.parametrize("method", ["dgl+mlaan", "infopro+mlaan", "dgl+lam", "dgl+mlm", "auglocal"])
def test_grad_checkpointing_changes_nothing_but_memory(method):
    """Recomputed aux blocks and window modules give bit-identical losses and gradients, and leave BatchNorm
    running statistics as an ordinary step does (a recompute must not count a batch twice; a window module is
    recomputed twice)."""
    torch.manual_seed(0)
    plain = mlaan.create_local_model("resnet20", method, 4)
    recomputing = copy.deepcopy(plain)
    recomputing.set_grad_checkpointing(True)
    assert recomputing.options.grad_checkpointing and not plain.options.grad_checkpointing
    x, y = batch()
    assert step(plain, x, y)["module_losses"] == step(recomputing, x, y)["module_losses"]
    for p, q in zip(plain.parameters(), recomputing.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    plain_state, recomputed_state = plain.state_dict(), recomputing.state_dict()
    assert all(torch.equal(plain_state[k], recomputed_state[k]) for k in plain_state)


def test_grad_checkpointing_option_reaches_every_aux_trunk():
    model = mlaan.create_local_model("resnet20", "dgl+mlaan", 4, grad_checkpointing=True)
    assert model.leap_trunks and all(t.grad_checkpointing for t in model.leap_trunks)
    model.set_grad_checkpointing(False)
    assert not any(t.grad_checkpointing for t in model.leap_trunks)


def test_lam_depth_shrinks_toward_the_output():
    model = mlaan.create_local_model("resnet32", method="dgl+mlaan", num_local_modules=16, lam_depth=4)
    depths = [len(model.cascade_heads[str(j)].trunk.copies) for j in range(1, 15)]
    assert depths[0] == 4 and depths[-1] == 1
    assert all(a >= b for a, b in zip(depths, depths[1:]))


@pytest.mark.parametrize("arch,k", [("resnet32", k) for k in range(1, 17)])
def test_every_k_builds_trains_and_leaves_no_dead_parameter(arch, k):
    methods = ("dgl+mlaan", "infopro+mlaan", "auglocal+mlaan", "dgl+lam")
    for method in (methods[k % len(methods)],) if k > 1 else ("bp", "dgl+mlaan"):
        model = mlaan.create_local_model(arch, method=method, num_local_modules=k, aux_head="linear")
        assert len(model.local_modules) == k
        stats = step(model, *batch(n=4))
        assert torch.isfinite(torch.tensor(stats["loss"]))
        dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not dead, (method, k, dead[:5])


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 4, 8, 16, 32, 54, 55])
def test_resnet110_every_k(k):
    method = "bp" if k == 1 else "dgl+mlaan"
    model = mlaan.create_local_model("resnet110", method=method, num_local_modules=k, aux_head="linear")
    step(model, *batch(n=2))
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# ----------------------------------------------------------------------------------- 5. forward / BN counts
@pytest.mark.parametrize("method,window", [("dgl+mlaan", 2), ("dgl+mlaan", 3), ("infopro+mlm", 2), ("dgl", 2)])
def test_each_module_runs_forward_once_and_updates_batchnorm_once(method, window):
    model = mlaan.create_local_model("resnet20", method=method, num_local_modules=6, window=window)
    calls = [0] * len(model.backbone.blocks)
    for i, block in enumerate(model.backbone.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    tracked = [int(m.num_batches_tracked) for m in norms]
    step(model, *batch())
    assert calls == [1] * len(calls)
    assert [int(m.num_batches_tracked) - t for m, t in zip(norms, tracked)] == [1] * len(norms)


# ------------------------------------------------------------------------------------- 6. inference/export
def test_a_training_step_in_eval_mode_is_warned_of_but_not_the_engines_own_probe():
    model = mlaan.create_local_model("resnet20", "dgl", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.single_value_batchnorms() == []  # a step in eval mode, on purpose: silent
        step(model, *batch())
    model.eval()
    with pytest.warns(RuntimeWarning, match=r"eval mode: BatchNorm uses and keeps its running statistics; call "
                                            r"model.train\(\) before training"):
        step(model, *batch())


def test_inference_uses_only_the_backbone_and_exports_to_a_plain_model():
    model = mlaan.create_local_model("resnet20", method="infopro+mlaan", num_local_modules=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = batch()
    step(model, x, y)
    opt.step()
    model.after_optimizer_step()
    model.eval()
    for head in list(model.independent_heads) + list(model.cascade_heads.values()):
        head.register_forward_hook(lambda *_: pytest.fail("aux net used at inference"))
    plain = mlaan.models.create("resnet20")
    plain.load_state_dict(model.backbone.state_dict())
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------ which method reads what
# A valid value other than the default for every engine option (a new option must be added here).
OTHER_VALUE = {"window": 3, "w_ind": 0.5, "w_casc": 0.5, "ema_momentum": 0.5, "ema_update": "last", "ema_lag": 1,
               "lam_depth": 2, "lam_shrink": 0.0, "depth_shrink": 1.0, "aux_head": "mlp", "aux_width": 5,
               "balance": "memory", "balance_batch_size": 2, "grad_checkpointing": True, "checkpoint_segment": 2,
               "checkpoint_modules": 2, "checkpoint_trunk": "lead", "compile": True,
               "cascade_barriers": (1,),
               "image_mean": (0.5, 0.4, 0.3), "image_std": (2.0, 2.0, 2.0), "label_smoothing": 0.1,
               "lam_trunk": "twins", "lam_sampling": "adjacent"}


def two_steps(method: str, **options) -> tuple[list, dict]:
    """Losses and final state (EMA twins included) of two SGD steps from seed 0."""
    torch.manual_seed(0)
    model = mlaan.create_local_model("resnet20", method, 1 if method == "bp" else 4, **options)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = batch()
    losses = []
    for _ in range(2):
        losses.append(step(model, x, y)["module_losses"])
        opt.step()
        model.after_optimizer_step()
    return losses, model.state_dict()


def test_every_engine_option_names_the_part_that_reads_it():
    from mlaan.engine.options import READERS, EngineOptions

    fields = dataclasses.fields(EngineOptions)
    assert {f.name for f in fields} == set(OTHER_VALUE)
    assert all(f.metadata["read_by"] in READERS for f in fields)


@pytest.mark.parametrize("method", ["bp", "dgl", "dgl+mlm", "dgl+lam", "dgl+mlaan", "infopro", "infopro+mlaan",
                                    "auglocal", "auglocal+lam"])
@pytest.mark.filterwarnings("ignore:method .* does not read")
def test_engine_options_a_method_does_not_read_change_nothing(method):
    """``MethodSpec.engine_options`` is what ``--resume`` compares and what ``mlaan train`` warns about: every
    other engine option, changed all at once, must leave two training steps bit-identical."""
    unread = {k: v for k, v in OTHER_VALUE.items() if k not in parse_method(method).engine_options}
    assert unread, "every method leaves some engine option unread"
    losses, state = two_steps(method)
    other_losses, other_state = two_steps(method, **unread)
    assert losses == other_losses
    assert state.keys() == other_state.keys() and all(torch.equal(state[k], other_state[k]) for k in state)


def test_the_api_warns_of_an_option_set_that_the_method_does_not_read():
    with pytest.warns(UserWarning, match=r"method 'dgl' does not read window=3 \(read by MLM's cascade \(\+mlm, "
                                         r"\+mlaan\)\): ignored"):
        mlaan.create_local_model("resnet20", "dgl", 2, window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlaan.create_local_model("resnet20", "dgl", 2, window=2, aux_head="mlp", aux_width=7)  # default, or read


@pytest.mark.parametrize("method,option,value,condition", [
    ("dgl", "aux_width", 5, {"aux_head": "mlp"}),
    ("infopro", "temperature", 0.5, {"infopro_task": "contrastive"}),
])
@pytest.mark.filterwarnings("ignore:method .* does not read")
def test_an_option_read_only_with_some_value_of_another_changes_nothing_without_it(method, option, value,
                                                                                    condition):
    """``read_when``: the option is ignored (and warned of) unless the other option holds the value named; with
    it, the option changes the run, so that the first half can fail."""
    from mlaan.engine.options import options_ignored

    assert option in options_ignored(method, {}) and option not in options_ignored(method, condition)
    assert two_steps(method)[0] == two_steps(method, **{option: value})[0]
    assert two_steps(method, **condition)[0] != two_steps(method, **condition, **{option: value})[0]


@pytest.mark.parametrize("method,option", [("dgl+mlm", "window"), ("dgl+lam", "ema_momentum"),
                                           ("dgl+lam", "lam_depth"), ("dgl", "aux_head"), ("dgl+mlaan", "lam_trunk")])
def test_an_option_a_method_reads_changes_its_steps(method, option):
    """The converse, so that the test above can fail: these change the run."""
    assert option in parse_method(method).engine_options
    losses, state = two_steps(method)
    other_losses, other_state = two_steps(method, **{option: OTHER_VALUE[option]})
    assert losses != other_losses or state.keys() != other_state.keys()


# ------------------------------------------------------------------------------------------------ splits
def test_split_balances_block_counts_and_puts_stem_and_head_at_the_ends():
    model = mlaan.create_local_model("resnet32", method="dgl", num_local_modules=4)
    sizes = [len(r) for r in model.split]
    assert sizes == [4, 4, 4, 4] and model.split[0][0] == 0
    assert model.local_modules[-1][-1] is model.backbone.blocks[-1]
    model16 = mlaan.create_local_model("resnet32", method="dgl", num_local_modules=16)
    assert [len(r) for r in model16.split] == [1] * 16


def test_memory_balance_gives_early_high_resolution_modules_fewer_blocks():
    model = mlaan.create_local_model("resnet32", method="dgl", num_local_modules=4, balance="memory")
    sizes = [len(r) for r in model.split]
    assert sum(sizes) == 16 and sizes[0] < sizes[-1]
    costs = model.profile.step_bytes(model.options.balance_batch_size)
    loads = [sum(costs[i] for i in r) for r in model.split]
    even = [sum(costs[i] for i in r) for r in mlaan.create_local_model(
        "resnet32", method="dgl", num_local_modules=4).split]
    assert max(loads) <= max(even)


# ------------------------------------------------------------------------------------------ user backbone
def test_wrapping_ones_own_backbone_as_a_list_of_blocks():
    blocks = [
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)),
    ]
    model = mlaan.create_local_model(blocks, method="dgl+mlaan", num_local_modules=4, num_classes=5, image_size=16)
    x, y = batch(in_channels=1, size=16, classes=5)
    step(model, x, y)
    assert model(x).shape == (BATCH, 5)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(arch="vgg99"), "unknown architecture 'vgg99'; available: resnet20"),
        (dict(method="dgl+magic"), "unknown method 'dgl+magic' (did you mean 'dgl+mlaan'?); available: bp, dgl"),
        (dict(num_local_modules=17), "num_local_modules=17 is out of range for resnet32: allowed 1 to 16"),
        (dict(num_local_modules=0), "allowed 1 to 16 (15 blocks after the stem + the stem's module)"),
        (dict(num_local_modules=2.5), "num_local_modules must be an integer, got 2.5"),
        (dict(num_local_modules="3"), "num_local_modules must be an integer, got '3'"),
        (dict(method="bp", num_local_modules=4), "must be 1, got 4"),
        (dict(window=5, num_local_modules=4), "window=5 is not allowed with K=4: allowed 2 to 4"),
        (dict(ema_momentum=1.0), "ema_momentum must be in [0, 1), got 1.0"),
        (dict(aux_head="big"), "unknown aux_head 'big'; allowed: mlp, linear"),
        (dict(balance="flops"), "unknown balance 'flops'; allowed: blocks, memory"),
        (dict(windw=2), "unknown option(s) windw; known:"),
        (dict(window="2"), "window must be an integer, got '2'"),
        (dict(infopro_lambda_recon=5), "infopro_lambda_recon must be a list of 2 numbers, got 5"),
        (dict(cascade_barriers=[1.5]), "cascade_barriers must be a list of integers, got [1.5]"),
        (dict(grad_checkpointing=1), "grad_checkpointing must be True or False, got 1"),
        (dict(aux_head=None), "aux_head must be a string, got None"),
    ],
)
def test_bad_input_raises_value_error_naming_value_and_allowed(kwargs, needle):
    args = dict(arch="resnet32", method="dgl+mlaan", num_local_modules=16) | kwargs
    with pytest.raises(ValueError) as info:
        mlaan.create_local_model(args.pop("arch"), **args)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_options_of_a_close_type_are_taken_as_the_declared_one():
    import numpy as np

    options = mlaan.LocalOptions(w_ind=1, window=np.int64(3), image_mean=[0.5, 0.4, 0.3])
    assert (options.w_ind, options.window, options.image_mean) == (1.0, 3, (0.5, 0.4, 0.3))
    assert type(options.w_ind) is float and type(options.window) is int


def test_names_for_help_texts():
    assert {"bp", "dgl", "infopro", "auglocal", "dgl+mlaan", "infopro+mlm", "auglocal+lam"} <= set(
        mlaan.available_methods())
    assert "bp+mlaan" not in mlaan.available_methods()
    assert {"resnet20", "resnet32", "resnet110", "resnet34", "resnet101"} <= set(mlaan.models.available())


def test_imagenet_backbone_any_k_and_grayscale():
    model = mlaan.create_local_model("resnet18", method="dgl+mlaan", num_local_modules=5, num_classes=7,
                                     in_channels=1, image_size=64)
    assert [len(r) for r in model.split] == [2, 2, 2, 2, 1]  # stem + 8 BasicBlocks
    step(model, *batch(in_channels=1, size=64, classes=7, n=4))
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_infopro_lambdas_interpolate_with_module_index():
    model = mlaan.create_local_model("resnet20", method="infopro", num_local_modules=5,
                                     infopro_lambda_recon=(4.0, 0.0), infopro_lambda_task=(1.0, 3.0))
    recon = [h.lambda_recon for h in model.independent_heads]
    task = [h.lambda_task for h in model.independent_heads]
    # METHOD.md §2: from the first module's aux net to the last one's (module K−1 counting from 1), t = j/(K−2)
    assert recon == pytest.approx([4.0, 8 / 3, 4 / 3, 0.0])
    assert task == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0])


def test_infopro_says_when_an_aux_net_gets_a_zero_loss():
    with pytest.warns(UserWarning, match=r"aux net of local module 3 has λ1 = λ2 = 0 .* its own loss is zero"):
        model = mlaan.create_local_model("resnet20", method="infopro", num_local_modules=5)
    assert (model.independent_heads[3].lambda_recon, model.independent_heads[3].lambda_task) == (0.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlaan.create_local_model("resnet20", method="infopro", num_local_modules=5, infopro_lambda_task=(0.5, 0.1))


def test_supervised_contrastive_variant_trains():
    model = mlaan.create_local_model("resnet20", method="infopro+mlaan", num_local_modules=3,
                                     infopro_task="contrastive")
    stats = step(model, *batch())
    assert all(torch.isfinite(torch.tensor(v)) for v in stats["module_losses"])
    assert isinstance(model.cascade_heads["1"].trunk, LeapTrunk)


def test_non_finite_local_loss_names_the_module():
    model = mlaan.create_local_model("resnet20", method="dgl+mlaan", num_local_modules=4)
    with torch.no_grad():
        model.cascade_heads["2"].head.classifier[-1].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at local module 2"):
        step(model, *batch())


# ------------------------------------------------------------------------------- published plan and phases
PLAN_CASES = [("dgl", 4, {}), ("bp", 1, {}), ("dgl+mlm", 5, {"window": 2}), ("dgl+mlm", 5, {"window": 3}),
              ("dgl+mlaan", 4, {}), ("infopro+lam", 3, {}), ("auglocal+mlm", 5, {"window": 5})]


@pytest.mark.parametrize("method, k, options", PLAN_CASES)
def test_step_plan_is_what_train_step_does(method, k, options, monkeypatch):
    """Every entry of ``step_plan()`` against what a real step does, seen through hooks: the blocks each module
    runs, its input's requires_grad, the aux nets run on its output, the graphs its cascade crosses
    (``autograd.grad`` calls) and the module step at which its weight backward runs."""
    model = mlaan.create_local_model("resnet20", method=method, num_local_modules=k, **options)
    plan = model.step_plan()
    current = [-1]
    outputs: dict[int, tuple[int, torch.Tensor]] = {}  # id(module output) -> (module, the tensor, kept alive)
    input_grad, heads, through, weights_at = {}, {}, {}, {}

    def enter(j):
        def hook(module, args):
            current[0] = j
            input_grad[j] = args[0].requires_grad
        return hook

    def leave(j):
        def hook(module, args, out):
            outputs[id(out)] = (j, out)
        return hook

    def head_ran(module, args, out):
        heads.setdefault(current[0], set()).add(id(module))

    for j, module in enumerate(model.local_modules):
        module.register_forward_pre_hook(enter(j))
        module.register_forward_hook(leave(j))
    for head in [*model.independent_heads, *model.cascade_heads.values()]:
        head.register_forward_hook(head_ran)
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    def spy_grad(out, inputs, *args, **kwargs):
        if id(out) in outputs:
            through.setdefault(current[0], []).append(outputs[id(out)][0])
        return real_grad(out, inputs, *args, **kwargs)

    def spy_backward(tensors, *args, **kwargs):
        if id(tensors) in outputs:
            weights_at[outputs[id(tensors)][0]] = current[0]
        return real_backward(tensors, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy_grad)
    monkeypatch.setattr(torch.autograd, "backward", spy_backward)
    step(model, *batch())
    assert [p.index for p in plan] == list(range(k))
    for p in plan:
        assert [model.backbone.blocks[i] for i in p.blocks] == list(model.local_modules[p.index])
        assert input_grad[p.index] == p.input_requires_grad
        assert heads.get(p.index, set()) == {id(h) for h in (p.independent_head, p.cascade_head) if h is not None}
        assert tuple(through.get(p.index, ())) == p.cascade_through
        assert weights_at[p.index] == p.weight_backward_at
    if method.endswith("+mlm") or method.endswith("+mlaan"):
        window = options.get("window", model.options.window)
        assert max(len(p.cascade_through) for p in plan) == min(window - 1, k - 1)


def test_step_phases_are_marked_for_a_profiler_and_cost_nothing_without_one(monkeypatch):
    from mlaan.engine import phases

    model = mlaan.create_local_model("resnet20", method="dgl+mlaan", num_local_modules=4)
    plan = model.step_plan()
    x, y = batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, x, y)
        model.after_optimizer_step()
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("mlaan."):
            counts[event.name] = counts.get(event.name, 0) + 1
    assert set(counts) == set(phases.STEP_PHASES)
    assert counts[phases.MODULE_FORWARD] == counts[phases.MODULE_BACKWARD] == 4
    assert counts[phases.AUX_LOSS["independent"]] == sum(p.independent_head is not None for p in plan)
    assert counts[phases.AUX_LOSS["cascaded"]] == sum(p.cascade_head is not None for p in plan)
    assert counts[phases.CASCADE_BACKWARD] == sum(bool(p.cascade_through) for p in plan)
    assert counts[phases.AUX_TRUNK_FORWARD] == counts[phases.AUX_LOSS["cascaded"]]  # LAM trunks: cascaded only

    def refuse(name):
        raise AssertionError(f"marker {name} entered without a profiler")

    monkeypatch.setattr(phases, "record_function", refuse)
    step(model, x, y)
    model.after_optimizer_step()
