"""Own models a researcher hands in, found wrong by trying (breaker findings)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlaan


class _Tied(nn.Module):
    """b1 called twice (at two depths) or a layer-scale weight read twice: one parameter at two places."""

    def __init__(self, tie: bool = False, gamma: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b3 = nn.Conv2d(8, 8, 3, padding=1)
        self.tie = tie
        self.gamma = nn.Parameter(torch.ones(1)) if gamma else None
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.b1(x))
        if self.gamma is not None:
            x = x * self.gamma
        x = F.relu(self.b2(x))
        x = F.relu((self.b1 if self.tie else self.b3)(x))
        if self.gamma is not None:
            x = x * self.gamma
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("kind", ["tie", "gamma"])
def test_graph_cut_keeps_a_tied_weight_in_one_block(kind):
    """Was: the graph cut put the tied b1 (or gamma) in two blocks, and dgl's later module wrote into the earlier
    module's gradient (and clip_grad_norm_ clipped it twice)."""
    torch.manual_seed(0)
    net = _Tied(**{kind: True})
    model = mlaan.create_local_model(net, method="dgl", num_local_modules=2, image_size=8)
    holders: dict[int, int] = {}
    for j, module in enumerate(model.local_modules):
        for p in module.parameters():
            assert holders.setdefault(id(p), j) == j, "a parameter in two local modules"
    for block in model.backbone.blocks:  # a weight read by a later piece makes no block of its own
        assert any(True for _ in block.parameters()), block.code
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.eval()(x), net.eval()(x))
    model.train().train_step(x, torch.tensor([1, 2]))


def test_a_parameter_in_two_local_modules_is_refused_in_one_line():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), nn.Sequential(conv, nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), nn.Sequential(conv, nn.ReLU()),
              nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))]
    with pytest.raises(ValueError, match="share the parameter") as info:
        mlaan.create_local_model(blocks, method="dgl", num_local_modules=4, image_size=8)
    assert "\n" not in str(info.value)
    mlaan.create_local_model(blocks, method="bp", image_size=8)  # one module: nothing crosses


def _small_dgl() -> mlaan.LocalModel:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10))
    return mlaan.create_local_model(net, method="dgl", num_local_modules=3, image_size=8).train()


@pytest.mark.parametrize("max_norm", [-1.0, 0.0, float("nan"), "1", True])
def test_clip_grad_norm_refuses_a_bad_max_norm(max_norm):
    """Was: clip_grad_norm_(-1.0) flipped every gradient's sign (torch's clip takes it), nan made them nan."""
    model = _small_dgl()
    model.train_step(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with pytest.raises(ValueError, match="max_norm must be a number > 0"):
        model.clip_grad_norm_(max_norm)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, (p for p in model.parameters() if p.grad is not None)))
    assert model.clip_grad_norm_(float("inf")).shape == (3,)  # inf: norms only, as torch's


@pytest.mark.parametrize("weight_decay", [-0.1, "0.05", None, float("nan")])
def test_param_groups_refuses_a_bad_weight_decay(weight_decay):
    """Was: accepted, and the optimizer failed (or decayed the wrong way) at its first step."""
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        _small_dgl().param_groups(weight_decay)


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.head(F.relu(self.b1(F.relu(self.stem(x)))).mean((2, 3)))}


def test_a_forward_returning_a_dict_is_named_a_dict():
    """Was: 'its forward returns a immutable_dict' (torch.fx's type)."""
    with pytest.raises(ValueError, match="its forward returns a dict, not one tensor"):
        mlaan.create_local_model(_DictOut(), method="dgl", image_size=8)


@pytest.mark.parametrize("method", ["dgl", "dgl+mlaan", "infopro+mlaan"])
def test_aux_nets_follow_the_users_model_dtype(method):
    """Was: a float64 (or CUDA) model's aux nets were built in float32 on the CPU, and the first train_step failed
    deep in an aux head ('mat1 and mat2 must have the same dtype')."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).double()
    model = mlaan.create_local_model(net, method=method, num_local_modules=3, image_size=8).train()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    stats = model.train_step(torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(torch.tensor(stats["loss"]))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(784, 64), nn.Linear(64, 64)
        self.l3, self.head = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.l1(x.flatten(1)))
        return self.head(F.relu(self.l3(F.relu(self.l2(x)))))


def test_a_graph_cut_model_that_does_not_run_on_the_probe_says_why_in_one_line(capfd):
    """Was: torch.fx ShapeProp's traceback printed to stderr and its node dump as the reason."""
    with pytest.raises(ValueError, match=r"mat1 and mat2 shapes cannot be multiplied .*pass image_size="):
        mlaan.create_local_model(_MLP(), method="dgl", num_local_modules=3)
    assert "Traceback" not in capfd.readouterr().err
    mlaan.create_local_model(_MLP(), method="dgl", num_local_modules=3, image_size=28, in_channels=1)


class _NoGradStem(nn.Module):
    def __init__(self, leaf: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # a frozen feature extractor, as the user's forward says
            x = F.relu(self.stem(x))
        x = F.relu(self.b2(F.relu(self.b1(x))))
        return self.head(x.mean((2, 3)))


class _FrozenInside(nn.Module):
    """A submodule that does not trace (a leaf: its own code runs) and keeps its conv out of autograd itself."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.conv = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent: made a leaf
            return x
        x = self.pre(x)
        with torch.no_grad():
            y = self.conv(x)
        return x + y


class _LeafWithNoGrad(_NoGradStem):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _FrozenInside())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b2(F.relu(self.b1(F.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def test_a_forward_that_runs_a_layer_without_gradient_is_refused():
    """Was: torch.fx drops the torch.no_grad() block, and under dgl the stem the user's forward keeps frozen got
    its local module's gradient and trained."""
    with pytest.raises(ValueError, match=r"runs 'stem' without gradient \(torch.no_grad\(\)"):
        mlaan.create_local_model(_NoGradStem(), method="dgl", image_size=8)
    model = mlaan.create_local_model(_LeafWithNoGrad(), method="dgl", image_size=8).train()  # inside a leaf: kept
    model.train_step(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    frozen = model.backbone.source.b1[1]
    assert frozen.conv.weight.grad is None and frozen.pre.weight.grad is not None


class _DetachedMiddle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b2, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(F.relu(self.stem(x)))).detach()  # a stop-gradient in the user's forward
        x = F.relu(self.b3(F.relu(self.b2(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["dgl", "dgl+mlaan"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_module_whose_output_the_forward_detaches_trains_the_rest(method, checkpointing):
    """Was: RuntimeError 'element 0 of tensors does not require grad' from the detached module's local backward
    (and from the cascade carried back through it)."""
    net = _DetachedMiddle()
    model = mlaan.create_local_model(net, method=method, image_size=8, grad_checkpointing=checkpointing).train()
    model.train_step(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert net.b1.weight.grad is None  # as in the user's forward: nothing reaches it
    assert net.b2.weight.grad is not None and net.head.weight.grad is not None
