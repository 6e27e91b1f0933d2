"""FLOPs of one training step: what the engine executes, and the floor any implementation can reach.

*Measured*: ``torch.utils.flop_counter.FlopCounterMode`` around a real ``train_step`` — it counts every matmul
and convolution that runs, backward included (a convolution backward counts only the input/weight gradients
autograd asks for). Its per-module attribution is switched off: its module tracker installs backward hooks
that ``torch.autograd.grad(..., inputs=<leaf>)`` (how the engine carries a cascade back through a retained
graph) refuses with "A leaf node was passed to _will_engine_execute_node"; the global count is unaffected.

*Floor*: built from the method's structure (the engine's published step plan, ``LocalModel.step_plan()``:
each module's aux nets, whether its input needs a gradient, how far cascades reach), not from the order in which
the engine runs it. Every convolution/linear layer of
the backbone and of every aux net runs forward once (F); its weight gradient costs F when the weight is
trainable; its input gradient costs F when something upstream needs it (an aux net's input, a cascaded
module's input, a layer inside a module). Normalisation, activations and additions are not counted (the flop
counter does not count them either), so floors and measurements are comparable.

Two floors are reported:

- ``floor`` — the issue's definition: one forward and one backward (weight + input gradient where needed)
  of everything, as if each module received one output gradient.
- ``exact_floor`` — the floor of computing MLAAN's gradients exactly. Under MLM a middle module j (0 < j < K−1)
  receives two different output gradients: the cascaded one, which must continue into module j−1, and the rest
  (its independent loss, the cascade of module j+1 that stops at j's input). Weight gradients can share one
  pass (their per-layer output gradients add), but the two input-gradient chains inside the module cannot: the
  exact floor adds one more input-gradient pass through the module's inner layers. For methods without MLM the
  two floors are equal.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import mlaan
from mlaan.engine import ModulePlan


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: everything is counted under "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of everything ``fn`` executes (forward and backward), total and per ATen op."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # see the module docstring
    with counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), per_op


def measured_step_flops(model: mlaan.LocalModel, images: torch.Tensor, targets: torch.Tensor) -> dict:
    """FlopCounterMode around one real ``train_step`` (gradients are cleared before and after; BatchNorm running
    statistics move by one step, as in training)."""
    model.zero_grad(set_to_none=True)
    total, per_op = count_flops(lambda: model.train_step(images, targets))
    model.zero_grad(set_to_none=True)
    return {"total": total, "per_op": per_op}


def _layer_flops(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    return 0


class _Recorder:
    """Forward hooks on every conv/linear layer: forward FLOPs, and which gradients the layer needs."""

    def __init__(self, model: nn.Module) -> None:
        self.bucket = "other"
        self.fwd: dict[str, int] = defaultdict(int)
        self.grad_w: dict[str, int] = defaultdict(int)
        self.grad_x: dict[str, int] = defaultdict(int)
        self._handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
        ]

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        flops = _layer_flops(module, inputs, output)
        self.fwd[self.bucket] += flops
        if module.weight.requires_grad:
            self.grad_w[self.bucket] += flops
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].requires_grad:
            self.grad_x[self.bucket] += flops

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _head_passes(step: ModulePlan) -> list[tuple[str, str, nn.Module]]:
    """(FLOP bucket, part kind, aux net) of each aux net trained on a module's output."""
    heads = [("aux_independent", step.independent_head), ("aux_cascade", step.cascade_head)]
    return [(f"{kind}.{step.index}", kind, head) for kind, head in heads if head is not None]


def floor_step_flops(model: mlaan.LocalModel, images: torch.Tensor, targets: torch.Tensor) -> dict:
    """The two FLOP floors of one training step of ``model``'s method (see the module docstring).

    Runs each backbone module twice (input without / with gradient, to tell the inner layers' input gradients
    from the first layers') and each aux net once, in eval mode so that no BatchNorm statistic moves.
    """
    plan = model.step_plan()
    # modules a cascaded gradient is carried back through: their input gradient continues into the module before
    crossed = {i for step in plan for i in step.cascade_through}
    was_training = model.training
    model.eval()
    rec = _Recorder(model)
    floor = exact = 0
    parts: dict[str, int] = defaultdict(int)
    try:
        x = images
        for step, module in zip(plan, model.local_modules):
            j, input_needs_grad = step.index, step.input_requires_grad
            rec.bucket = f"inner.{j}"
            out = module(x.detach())
            inner_x = rec.grad_x[f"inner.{j}"]
            rec.bucket = f"module.{j}"
            out = module(x.detach().requires_grad_(input_needs_grad))
            bucket = f"module.{j}"
            grad_x = rec.grad_x[bucket] if input_needs_grad else inner_x
            cost = rec.fwd[bucket] + rec.grad_w[bucket] + grad_x
            floor += cost
            # two output gradients (one continuing back, one not: an independent loss) need two input chains
            extra = inner_x if (j in crossed and step.independent_head is not None) else 0
            exact += cost + extra
            parts["backbone_forward"] += rec.fwd[bucket]
            parts["backbone_backward"] += rec.grad_w[bucket] + grad_x
            parts["cascade_extra_input_grad"] += extra
            for name, kind, head in _head_passes(step):
                rec.bucket = name
                head(out.detach().requires_grad_(), images, targets)
                head_cost = rec.fwd[name] + rec.grad_w[name] + rec.grad_x[name]
                floor += head_cost
                exact += head_cost
                parts[f"{kind}_forward"] += rec.fwd[name]
                parts[f"{kind}_backward"] += rec.grad_w[name] + rec.grad_x[name]
            x = out
    finally:
        rec.close()
        model.train(was_training)
    return {"floor": floor, "exact_floor": exact, "parts": dict(parts)}


def step_flops(model: mlaan.LocalModel, images: torch.Tensor, targets: torch.Tensor) -> dict:
    """Measured FLOPs of a real step beside both floors: ``{"measured", "floor", "exact_floor", "parts", "per_op"}``."""
    floors = floor_step_flops(model, images, targets)
    measured = measured_step_flops(model, images, targets)
    return {
        "measured": measured["total"],
        "floor": floors["floor"],
        "exact_floor": floors["exact_floor"],
        "parts": floors["parts"],
        "per_op": measured["per_op"],
    }
