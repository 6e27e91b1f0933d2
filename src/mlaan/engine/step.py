"""One MLAAN training step in one process: what :meth:`mlaan.LocalModel.train_step` runs.

The objective (docs/METHOD.md; Zhang et al., AAAI 2025, §MLM, §LAM): K gradient-isolated local modules, module j
trained by ``w_ind · L_ind(j) + w_casc · L_casc(j)`` — its own aux net's loss on its output, and its cascaded
(under LAM leap-augmented) aux net's loss, whose gradient flows back through modules j, j−1, …, j−window+2. The
last module's cross-entropy is both. Without a cascade each local loss has weight 1 (DGL, InfoPro, AugLocal; BP
is one module). :mod:`mlaan.engine.reference` computes it naively, every window recomputed; this must equal it.

For j = 0 … K−1 (:meth:`LocalStep.run_module`):

1. forward module j once on module j−1's detached output, keeping its graph (the input requires a gradient when
   cascades go on from module j into module j−1: j ≥ 1, window ≥ 2, no barrier there — j ∈ :func:`cascade_reach`);
2. its local losses, each on a detached leaf of the output, the cascaded aux net first (the memory peak);
3. carry the cascaded gradient back through the window's retained graphs (input gradients only) into the output
   gradient of each earlier module it reaches;
4. finish each module no later cascade can reach (:func:`weights_final_at`): one backward into its weights, its
   graph freed, the grads-ready hooks told (a data-parallel all-reduce starts there).

Each module runs one forward and one weight backward; at most ``window`` module graphs are alive at a time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .compile import retained_backward
from .heads import cross_entropy
from .phases import AUX_FORWARD, AUX_LOSS, CASCADE_BACKWARD, MODULE_BACKWARD, MODULE_FORWARD, OUTPUT_LOSS, mark
from .recompute import run_blocks

if TYPE_CHECKING:
    from .methods import MethodSpec
    from .options import LocalOptions


class StepModel(Protocol):
    """What a step reads of its model (:class:`~mlaan.LocalModel` is one; it builds the step, so the step does
    not import it): the local modules and their aux nets, the options, and two hooks of the model's."""

    local_modules: nn.ModuleList
    independent_heads: nn.ModuleList
    cascade_heads: nn.ModuleDict  # keyed by str(module index)
    options: LocalOptions
    spec: MethodSpec

    def recomputes_module(self, j: int) -> bool: ...

    def _autocast(self) -> contextlib.AbstractContextManager: ...  # the model's autocast dtype, or none

    def _notify(self, params: list[nn.Parameter]) -> None: ...  # grads-ready hooks (a DDP all-reduce starts there)


def cascade_reach(j: int, window: int, barriers: frozenset[int]) -> tuple[int, ...]:
    """The window/barrier rule: the modules whose retained graphs module j's cascaded gradient is carried back
    through — j, j−1, …, j−window+2 — stopping before module 0 and at a cascade barrier (one after module i stops
    it at i+1). Module j's input needs a gradient exactly when j is in its own reach."""
    reach = []
    for i in range(j, j - window + 1, -1):
        if i < 1 or i - 1 in barriers:
            break
        reach.append(i)
    return tuple(reach)


def weights_final_at(i: int, window: int, num_modules: int) -> int:
    """The module at whose step module i's output gradient is complete, so its weight backward runs there: the
    last module whose window covers it (i + window − 1), or the last module."""
    return min(i + window - 1, num_modules - 1)


@dataclass
class _Pending:
    """A module whose graph is still alive: its input leaf, its output and the output gradient gathered so far."""
    inputs: torch.Tensor
    output: torch.Tensor
    grad: torch.Tensor


@dataclass
class _Losses:
    """One module's loss values (0-d): ``weighted``, as ``module_losses`` reports it (w_ind·L_ind + w_casc·L_casc
    for a module with both aux nets, else its one loss unweighted), independent, cascaded (None: it has none)."""
    weighted: torch.Tensor
    independent: torch.Tensor
    cascaded: torch.Tensor | None = None


class LocalStep:
    """One training step of a :class:`~mlaan.LocalModel` on ``images`` (B, C, H, W) and ``targets`` (B,) or
    (B, num_classes) (built by its ``begin_step``, which checks the targets against the batch and ``loss_scale``):
    :meth:`run`, or :meth:`run_module` for each module then :meth:`statistics` (which runs the weight backwards
    still waiting, then reads the losses). ``loss_scale`` multiplies every gradient, not the losses reported. A
    module-parallel rank runs a subclass over its own modules (:class:`mlaan.distributed.pipeline.PipelineStep`,
    hooks ``_reach`` and ``_add_output_grad``)."""

    def __init__(self, model: StepModel, images: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0):
        self.model, self.images, self.targets, self.loss_scale = model, images, targets, loss_scale
        self.num_modules = len(model.local_modules)
        self.modules = range(self.num_modules)  # the modules this step runs, input to output
        self.window = model.options.window if model.spec.cascade else 1
        self.barriers = frozenset(model.options.cascade_barriers)
        # a module graph kept for the cascade window saves only its blocks' inputs when recomputed in backward;
        # so does BP's one module (activation checkpointing, every block or segments of checkpoint_segment blocks)
        self.recompute = model.options.grad_checkpointing and (self.window >= 2 or model.spec.end_to_end)
        self.segment = model.options.checkpoint_segment if model.spec.end_to_end else 1
        self.pending: dict[int, _Pending] = {}  # module index -> its live graph, in module order
        self.losses: dict[int, _Losses] = {}
        self.output: torch.Tensor | None = None

    def run(self) -> dict:
        """Every module in turn; returns :meth:`statistics`."""
        x = self.images
        for j in self.modules:
            x = self.run_module(j, x)
        return self.statistics()

    def run_module(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Forward module j on ``x`` (the previous module's output), run its local backward; returns its output."""
        inputs = x.detach()
        if j in cascade_reach(j, self.window, self.barriers):  # a cascade will read a gradient at the input
            inputs.requires_grad_()
        with self.model._autocast(), mark(MODULE_FORWARD):
            module = self.model.local_modules[j]
            recompute = self.recompute and self.model.recomputes_module(j)
            output = run_blocks(module, inputs, True, self.segment) if recompute else module(inputs)
        grad, cascade_grad, self.losses[j] = self._local_gradients(j, output)
        self.pending[j] = _Pending(inputs, output, grad)
        self._carry(j, cascade_grad)
        self._finish_complete(j)
        self.output = output
        return output

    def _local_gradients(self, j: int, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, _Losses]:
        """Module j's losses on its output: (the gradient at the output of all of them, the cascaded part of it
        that continues into earlier modules or None, their values)."""
        opts, scale, cascade = self.model.options, self.loss_scale, self.window >= 2
        if j == self.num_modules - 1:  # the backbone's head: its cross-entropy is both losses under MLM
            # unweighted backward, weighted gradient: the weight w_ind + w_casc splits into the independent part
            # and the cascaded part that continues into earlier modules; the loss in float32 under autocast
            with mark(OUTPUT_LOSS):
                leaf = output.detach().requires_grad_()
                loss = cross_entropy(leaf.float(), self.targets, opts.label_smoothing)
                loss.backward()
            g, value = leaf.grad, loss.detach()
            weight = (opts.w_ind + opts.w_casc if cascade else 1.0) * scale
            if not cascade or j == 0:  # no earlier module to cascade into
                return g * weight, None, _Losses(value, value)
            return g * weight, g * (opts.w_casc * scale), _Losses(value, value, value)

        w_ind = opts.w_ind if cascade else 1.0
        head = self.model.independent_heads[j]
        if str(j) not in self.model.cascade_heads:  # no cascade (DGL, InfoPro, AugLocal), or module 0 under MLM:
            # module 0 has no cascaded aux net of its own (METHOD.md "Weights"): its own loss weighs w_ind, and the
            # cascades of modules 1 … window−1 reach it
            g_ind, value = self._head_gradient(head, output, w_ind * scale, "independent")
            return g_ind, None, _Losses(value, value)
        # the cascaded (large, LAM) aux net first: no independent head's gradient is held through its backward
        casc_head = self.model.cascade_heads[str(j)]
        g_casc, casc_value = self._head_gradient(casc_head, output, opts.w_casc * scale, "cascaded")
        g_ind, value = self._head_gradient(head, output, w_ind * scale, "independent")
        weighted = w_ind * value + opts.w_casc * casc_value
        return g_ind.add_(g_casc), g_casc, _Losses(weighted, value, casc_value)

    def _head_gradient(self, head: nn.Module, output: torch.Tensor, weight: float, path: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``head``'s loss on a leaf of ``output``, backward × ``weight``: (gradient at the leaf, loss value)."""
        with mark(AUX_LOSS[path]):
            leaf = output.detach().requires_grad_()
            with self.model._autocast(), mark(AUX_FORWARD):
                loss = head(leaf, self.images, self.targets)
            (loss * weight).backward()
            self.model._notify([p for p in head.parameters() if p.requires_grad])
        return leaf.grad, loss.detach().float()

    def _carry(self, j: int, grad: torch.Tensor | None) -> None:
        """Carry module j's cascaded gradient back through its reach's graphs (input gradients only)."""
        if grad is None:
            return
        with mark(CASCADE_BACKWARD):
            for k in self._reach(j):
                entry = self.pending[k]
                if entry.output.requires_grad:
                    with retained_backward(self.model):  # compiled: no donated buffers (mlaan.engine.compile)
                        (grad,) = torch.autograd.grad(entry.output, entry.inputs, grad, retain_graph=True,
                                                      allow_unused=True, materialize_grads=True)
                else:  # the user's forward detaches module k's output: nothing passes (zeros keep the shape)
                    grad = torch.zeros_like(entry.inputs)
                self._add_output_grad(k - 1, j, grad)

    def _reach(self, j: int) -> tuple[int, ...]:  # a rank keeps its own modules
        """The modules module j's cascade is carried through."""
        return cascade_reach(j, self.window, self.barriers)

    def _add_output_grad(self, i: int, j: int, grad: torch.Tensor) -> None:  # a rank sends another rank's on
        """Add module j's cascaded gradient ``grad`` to module i's output gradient."""
        self.pending[i].grad = self.pending[i].grad + grad

    def _finish_complete(self, j: int) -> None:
        """Finish the waiting modules whose output gradient is complete once module j's cascade is in."""
        for i in [i for i in self.pending if weights_final_at(i, self.window, self.num_modules) <= j]:
            self._finish_module(i, self.pending.pop(i))

    def finish(self) -> None:
        """Finish every module still waiting (all the cascades that reach them are in)."""
        self._finish_complete(self.num_modules - 1)

    def _finish_module(self, i: int, entry: _Pending) -> None:
        """All of module i's gradient has arrived: one backward into its weights, then its graph is freed."""
        with mark(MODULE_BACKWARD):
            params = [p for p in self.model.local_modules[i].parameters() if p.requires_grad]
            if params and entry.output.requires_grad:  # not: the user's forward detaches it (a frozen part)
                # gathered here the gradient has the output's dtype (a detached copy's .grad); one a module
                # pipeline receives from another rank may not
                torch.autograd.backward(entry.output, entry.grad.to(entry.output.dtype), inputs=params)
            self.model._notify(params)

    def statistics(self) -> dict:
        """Finish the step; ``train_step``'s statistics for the modules it ran (``loss`` and ``accuracy`` NaN
        unless it ran the last module). One host sync. Raises FloatingPointError on a non-finite loss."""
        self.finish()
        ran, losses = list(self.losses), list(self.losses.values())
        ends_model = self.num_modules - 1 in self.losses
        accuracy = []
        if ends_model:
            labels = self.targets if self.targets.dim() == 1 else self.targets.argmax(1)  # probabilities: argmax
            accuracy = [(self.output.detach().argmax(1) == labels).float().mean()]
        # one host sync per step (not one per head): losses and accuracy come back together
        values = torch.stack([*(x.weighted for x in losses), *(x.independent for x in losses),
                              *(x.cascaded for x in losses if x.cascaded is not None), *accuracy]).tolist()
        n = len(losses)
        weighted, rest = values[:n], iter(values[2 * n:])
        bad = [i for i, v in enumerate(weighted) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite local loss ({weighted[bad[0]]}) at local module {ran[bad[0]]}")
        cascaded = [None if x.cascaded is None else next(rest) for x in losses]  # then the accuracy
        return {"loss": weighted[-1] if ends_model else math.nan, "accuracy": next(rest) if ends_model else math.nan,
                "module_losses": weighted, "independent_losses": values[n:2 * n], "cascaded_losses": cascaded}
