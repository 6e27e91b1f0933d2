"""The local-learning model: a backbone cut into K gradient-isolated local modules, each trained by its own
auxiliary loss, with MLAAN's cascades (MLM) and leap-augmented aux nets (LAM) on top of any base method.

This file builds the model (split, aux nets, LAM trunks), publishes its step plan and holds what an optimizer
needs (parameter groups, clipping, the EMA update after a step). The step itself, which runs every backbone
module forward exactly once and reaches back through the retained graphs of the cascade window instead of
recomputing them, is :mod:`mlaan.engine.step`; the objective it must equal is :mod:`mlaan.engine.reference`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import models, runtime
from .compile import compile_step_parts
from .engine_options import SHARED_TWIN_TRUNKS
from .features import FeatureKind, classify
from .heads import StackedLoss, aux_logits
from .lam import LeapTrunk, TwinBank, TwinTrunk, lam_picks, reinitialised_copy, sample_later_blocks
from .methods import AuxContext, MethodSpec, parse_method
from .options import HeadOptions, LocalOptions, make_options, options_ignored, why_ignored
from .phases import EMA_UPDATE, mark
from .split import check_blocks, check_shared_parameters, check_shared_state, compute_split, profile_blocks
from .step import LocalStep, cascade_reach, weights_final_at

GradsReadyHook = Callable[[list[nn.Parameter]], None]
MODULE_PATHS = ("independent", "cascaded")  # the two aux paths of a module under MLM
_EVAL_MODE_WARNING = "training step on a LocalModel in eval mode"


@dataclass(frozen=True)
class ModulePlan:
    """What ``train_step`` does for one local module (:meth:`LocalModel.step_plan`).

    ``index``: the module's position (0 = the stem's). ``blocks``: indices into ``backbone.blocks`` that the
    module runs (the last module also runs the classifier block). ``independent_head``: the aux net of its own
    loss (None for the last module, whose loss is the backbone's classifier). ``cascade_head``: its cascaded (MLM)
    aux net, None where it has none. ``cascade_through``: the modules whose retained graphs its cascaded gradient
    is carried back through (itself first; empty where no cascade continues past its input); the gradient lands
    on the output of the module before the last one listed. ``input_requires_grad``: whether its input is a leaf
    that needs a gradient (a cascade continues past it). ``weight_backward_at``: the index of the module at whose
    step this module's weight backward runs and its graph is freed (itself without a cascade window).
    ``has_cascaded_loss``: whether it reports a cascaded loss (its cascaded aux net's; the last module's
    cross-entropy under MLM).
    """

    index: int
    blocks: tuple[int, ...]
    independent_head: nn.Module | None
    cascade_head: nn.Module | None
    cascade_through: tuple[int, ...]
    input_requires_grad: bool
    weight_backward_at: int
    has_cascaded_loss: bool = False


class LocalModel(nn.Module):
    """K local modules over a :class:`~mlaan.models.Backbone`, trained by ``train_step``.

    Attributes a user relies on: ``backbone`` (plain model, used for inference), ``local_modules`` (views of the
    backbone's blocks, input to output), ``independent_heads`` and ``cascade_heads`` (aux nets, training only).
    """

    def __init__(
        self,
        backbone: models.Backbone,
        method: str | MethodSpec = "dgl+mlaan",
        num_local_modules: int | None = None,
        num_classes: int | None = None,
        options: LocalOptions | None = None,
    ) -> None:
        super().__init__()
        spec = parse_method(method) if isinstance(method, str) else method
        opts = options or LocalOptions()
        if num_local_modules is None:
            num_local_modules = default_num_local_modules(backbone, spec)
        check_num_local_modules(spec, opts, num_local_modules, len(backbone.blocks) - 1, backbone.name)
        self.spec, self.options, self.backbone = spec, opts, backbone
        self.autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: autocast every forward
        self.channels_last = False  # see set_channels_last
        self._grads_ready_hooks: list[GradsReadyHook] = []

        in_channels = _infer_in_channels(backbone)
        self.image_shape = (in_channels, *backbone.image_hw)
        out_shapes = check_blocks(backbone.blocks, self.image_shape)  # one-line errors naming the block
        self.num_classes = _infer_classes(backbone, out_shapes[-1], num_classes)
        num_units = len(backbone.blocks) - 1
        self.feature_kinds = [] if spec.base.end_to_end else [
            self._classify_unit(i, out_shapes[i]) for i in range(num_units)]
        self.profile = profile_blocks(backbone.blocks[:-1], self.image_shape)
        self.split = compute_split(num_units, num_local_modules, opts.balance, self.profile, opts.balance_batch_size)
        views = [nn.Sequential(*(backbone.blocks[i] for i in r)) for r in self.split]
        views[-1].append(backbone.blocks[-1])
        self.local_modules = nn.ModuleList(views)

        check_shared_state(self.profile, self.split, set(), spec.name, backbone.blocks)  # before any copy
        check_shared_parameters(self.split, spec.name, backbone.blocks)
        # lam_trunk="twins"/"copy+twins": the EMA twins every LAM trunk runs, one per later block, shared
        check_lam_trunk(spec, opts)
        shared = spec.leap and opts.lam_trunk in SHARED_TWIN_TRUNKS
        self.twin_bank = TwinBank(opts.ema_momentum) if shared else None
        self.independent_heads = nn.ModuleList()
        self.cascade_heads = nn.ModuleDict()  # keyed by str(module index); module 0 has no cascade of its own
        for j in range(num_local_modules - 1):
            self.independent_heads.append(self._build_head(j, leap=spec.leap and not spec.cascade))
            if spec.cascade and j >= 1 and opts.window >= 2:
                self.cascade_heads[str(j)] = self._build_head(j, leap=spec.leap)
        like = next((p for p in backbone.parameters() if p.is_floating_point()), None)
        if like is not None:  # the aux nets where the user's model is: its device and dtype (a CUDA or float64 net)
            for aux in (self.independent_heads, self.cascade_heads, self.twin_bank):
                if aux is not None:
                    aux.to(like.device, like.dtype)
        self.set_grad_checkpointing(opts.grad_checkpointing)
        _warn_whole_network_segment(spec, opts, len(backbone.blocks))
        if opts.compile:  # torch.compile of each local module and aux net, in place (mlaan.engine.compile)
            compile_step_parts(self)

    # ----------------------------------------------------------------------------------------- building
    def _build_head(self, j: int, leap: bool) -> nn.Module:
        """The aux net of module j: the method's head, behind a LAM trunk when ``leap``."""
        last_unit = self.split[j][-1]
        num_units = len(self.backbone.blocks) - 1
        feature_shape = self.profile.out_shapes[last_unit]
        if not leap:
            return self.spec.base.make_head(self._context(j, feature_shape, last_unit))
        depth = self._context(j, feature_shape, last_unit).depth(self.options.lam_depth, self.options.lam_shrink)
        picks = lam_picks(last_unit, depth, num_units, self.profile, self.options.lam_sampling)
        check_shared_state(self.profile, self.split, set(picks), self.spec.name, self.backbone.blocks)
        if self.twin_bank is not None:
            for i in picks:
                self.twin_bank.twin_of(i, self.backbone.blocks[i])
            lead = self.backbone.blocks[picks[0]] if self.options.lam_trunk == "copy+twins" else None
            trunk = TwinTrunk(self.twin_bank, picks, lead)
        else:
            trunk = LeapTrunk([self.backbone.blocks[i] for i in picks], picks[0], self.options.ema_momentum,
                              self.options.ema_lag)
        trunk_shape = self.profile.out_shapes[picks[-1]]
        head = self.spec.base.make_head(self._context(j, trunk_shape, picks[-1]))
        return StackedLoss(trunk, head)

    def _kind_of(self, shape: tuple[int, ...]) -> FeatureKind:
        """The feature kind of a block output of ``shape`` (the backbone's declared layout applied)."""
        return classify(shape, self.image_shape[1:], self.backbone.feature_layout, self.backbone.prefix_tokens)

    def _classify_unit(self, index: int, shape: tuple[int, ...]) -> FeatureKind:
        try:
            return self._kind_of(shape)
        except ValueError as err:
            block = self.backbone.blocks[index]
            raise ValueError(f"block {index} ({type(block).__name__}) outputs {shape}, which no aux head can take: "
                             f"{err}") from err

    def _context(self, j: int, feature_shape: tuple[int, ...], last_unit: int) -> AuxContext:
        num_units = len(self.backbone.blocks) - 1

        def later_blocks(depth: int) -> tuple[list[nn.Module], tuple[int, ...]]:
            picks = sample_later_blocks(last_unit, depth, num_units, self.profile)
            check_shared_state(self.profile, self.split, set(picks), self.spec.name, self.backbone.blocks)
            blocks = [reinitialised_copy(self.backbone.blocks[i]) for i in picks]
            return blocks, (self.profile.out_shapes[picks[-1]] if picks else feature_shape)

        return AuxContext(
            module_index=j,
            num_modules=len(self.split),
            feature_shape=feature_shape,
            num_classes=self.num_classes,
            image_shape=self.image_shape,
            options=HeadOptions(self.options, type(self.spec.base)),
            later_blocks=later_blocks,
            kind_of=self._kind_of,
            label_smoothing=self.options.label_smoothing,
        )

    # ---------------------------------------------------------------------------------------- inference
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Inference: the plain backbone; auxiliary nets are not used."""
        return self.backbone(self.prepare_inputs(images))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; with ``strict``, a state of another LAM trunk (``lam_trunk``
        "twins": ``twin_bank.*`` keys, "copy+twins": those and ``*.trunk.lead.*``, "copies": ``*.trunk.copies.*``)
        is refused in one line naming both values, rather than by torch's list of every trunk key missing and
        unexpected."""
        if strict and self.spec.leap:
            saved = None
            if any(".trunk.copies." in k for k in state_dict):
                saved = "copies"
            elif any(k.startswith("twin_bank.") for k in state_dict):
                saved = "copy+twins" if any(".trunk.lead." in k for k in state_dict) else "twins"
            if saved is not None and saved != self.options.lam_trunk:
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: the state_dict's "
                                   f"LAM trunks are lam_trunk={saved!r}, this model's lam_trunk="
                                   f"{self.options.lam_trunk!r}: build the model with lam_trunk={saved!r}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_channels_last(self, enable: bool = True) -> LocalModel:
        """Keep every 4-D parameter and buffer, and every image batch, in channels-last memory format (NHWC
        strides, same shapes): oneDNN's and cuDNN's convolutions are faster on it. Results change only by float
        rounding. Returns ``self``."""
        self.channels_last = bool(enable)
        return self.to(memory_format=torch.channels_last if enable else torch.contiguous_format)

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, C, H, W) in the model's memory format (a no-op unless :meth:`set_channels_last`),
        resized to the backbone's image size when it resizes its inputs (``Backbone.resize_inputs``)."""
        images = self.backbone.resize(images)
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    @torch.no_grad()
    def module_logits(self, images: torch.Tensor, path: str = "independent") -> list[torch.Tensor | None]:
        """What each local module's aux net predicts from the module's output: class scores (B, num_classes), None
        where that aux net does not classify or does not exist; the last module's entry is the backbone's logits.

        ``path="independent"``: the module's own aux net; ``"cascaded"``: its cascaded (under LAM, leap-augmented)
        aux net, which is the one MLM trains with weight ``w_casc`` (the independent one gets ``w_ind`` = 0.001 by
        default and stays near chance). Runs in the current train/eval mode without gradients."""
        if path not in MODULE_PATHS:
            raise ValueError(f"unknown path {path!r}; allowed: {', '.join(MODULE_PATHS)}")
        x = self.prepare_inputs(images)
        predictions: list[torch.Tensor | None] = []
        last = len(self.local_modules) - 1
        for j, module in enumerate(self.local_modules):
            with self._autocast():
                x = module(x)
                if j == last:
                    predictions.append(x)
                elif path == "independent":
                    predictions.append(aux_logits(self.independent_heads[j], x))
                else:
                    head = self.cascade_heads[str(j)] if str(j) in self.cascade_heads else None
                    predictions.append(None if head is None else aux_logits(head, x))
        return predictions

    @property
    def leap_trunks(self) -> list[LeapTrunk]:
        return [m for m in self.modules() if isinstance(m, LeapTrunk)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute in backward instead of keeping activations (timm's name): every LAM trunk / AugLocal aux
        block, and each backbone module whose graph the cascade window keeps alive (MLM); for BP, every backbone
        block (or segments of ``options.checkpoint_segment`` blocks): activation checkpointing.

        Gradients, losses and BatchNorm statistics stay exactly what they are without it; the cost is one more
        forward of every aux block and up to two of each module per step (its input gradient, then its weights).
        ``options.checkpoint_modules`` = N > 0 recomputes only in the first N local modules, and
        ``options.checkpoint_trunk="lead"`` only each aux trunk's first block (selective recomputation)."""
        self.options.grad_checkpointing = bool(enable)
        heads = [*enumerate(self.independent_heads), *((int(j), h) for j, h in self.cascade_heads.items())]
        for j, head in heads:
            for module in head.modules():
                if isinstance(module, StackedLoss):
                    module.set_grad_checkpointing(bool(enable) and self.recomputes_module(j),
                                                  lead_only=self.options.checkpoint_trunk == "lead")

    def recomputes_module(self, j: int) -> bool:
        """Whether local module j's aux nets and cascade-window graph are recomputed (``grad_checkpointing``,
        within the first ``checkpoint_modules`` modules when that is not 0)."""
        n = self.options.checkpoint_modules
        return self.options.grad_checkpointing and (n == 0 or j < n)

    def single_value_batchnorms(self) -> list[str]:
        """Names of the BatchNorm layers (backbone and aux nets) that see a 1×1 map in a training step.

        With a batch of one image such a layer has one value per channel, which BatchNorm cannot normalise in
        training (PyTorch raises mid-epoch). Found by one training step on two dummy images in eval mode, with
        the RNGs, BatchNorm statistics and gradients left as they were."""
        found: dict[str, None] = {}
        names = {m: n for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

        def spy(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x.dim() == 2 or x[0, 0].numel() == 1:  # (N, C) or a 1×1 map: N values per channel
                found.setdefault(names[module])

        handles = [m.register_forward_pre_hook(spy) for m in names]
        was_training = self.training
        params = list(self.parameters())
        grads = [p.grad for p in params]
        device = next(self.backbone.parameters()).device
        try:
            self.eval()  # on purpose: no BatchNorm statistic may move, so the eval-mode warning is not meant
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    warnings.catch_warnings():
                warnings.filterwarnings("ignore", _EVAL_MODE_WARNING, RuntimeWarning)
                images = torch.zeros(2, *self.image_shape, device=device)
                self.train_step(images, torch.zeros(2, dtype=torch.long, device=device))
        finally:
            for handle in handles:
                handle.remove()
            for p, g in zip(params, grads):
                p.grad = g
            self.train(was_training)
        return list(found)

    def register_grads_ready_hook(self, hook: GradsReadyHook) -> None:
        """``hook(params)`` is called during ``train_step`` as soon as those parameters' gradients are final
        for the step (a module after its last backward, an aux net after its loss) — the place to start an
        asynchronous all-reduce that overlaps the next module's compute."""
        self._grads_ready_hooks.append(hook)

    # ----------------------------------------------------------------------------------------- training
    def step_plan(self) -> list[ModulePlan]:
        """What ``train_step`` does for each local module, input to output (see :class:`ModulePlan`): its blocks,
        its aux nets, how far its cascaded gradient reaches back, whether its input needs a gradient, and when its
        weight backward runs. Derived from the attributes ``train_step`` reads (``split``, ``independent_heads``,
        ``cascade_heads``, ``spec``, ``options.window``, ``options.cascade_barriers``) by the rule the step applies
        (:func:`~mlaan.engine.step.cascade_reach`, :func:`~mlaan.engine.step.weights_final_at`); the step's phases
        are marked as :data:`mlaan.engine.phases.STEP_PHASES` says."""
        num_modules = len(self.local_modules)
        window = self.options.window if self.spec.cascade else 1
        barriers = frozenset(self.options.cascade_barriers)
        plan = []
        for j in range(num_modules):
            last = j == num_modules - 1
            cascade_head = self.cascade_heads[str(j)] if str(j) in self.cascade_heads else None
            # the last module's cross-entropy is also its cascaded loss under MLM (see LocalStep._local_gradients)
            cascades = cascade_head is not None or (last and self.spec.cascade and window >= 2 and j >= 1)
            plan.append(ModulePlan(
                index=j,
                blocks=tuple(self.split[j]) + ((len(self.backbone.blocks) - 1,) if last else ()),
                independent_head=None if last else self.independent_heads[j],
                cascade_head=cascade_head,
                cascade_through=cascade_reach(j, window, barriers) if cascades else (),
                input_requires_grad=j in cascade_reach(j, window, barriers),
                weight_backward_at=weights_final_at(j, window, num_modules),
                has_cascaded_loss=cascades,
            ))
        return plan

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0) -> dict:
        """Forward every module once and run every local backward; gradients accumulate in ``.grad``.

        ``images`` (B, C, H, W); ``targets`` class indices (B,) or class probabilities (B, num_classes) (timm's
        Mixup/CutMix targets), checked before any backward runs (ValueError). ``label_smoothing`` (an option)
        smooths class indices only. ``loss_scale`` multiplies every gradient of the step (not the losses
        reported): for gradient accumulation over n micro-batches, n ``train_step``s with ``loss_scale=1/n`` before
        one optimizer step. Returns ``{"loss": last module's cross-entropy,
        "accuracy": batch top-1 (against the argmax of probability targets), "module_losses": [...],
        "independent_losses": [...], "cascaded_losses": [...]}``,
        one value per local module: ``module_losses`` w_ind·L_ind + w_casc·L_casc for a module with both aux nets
        (under MLM mostly the cascaded loss), else its one loss unweighted, ``independent_losses`` each module's own
        aux loss unweighted (the last module: its cross-entropy), ``cascaded_losses`` the cascaded aux net's loss
        unweighted (None where a module has none).
        Raises FloatingPointError (before any optimizer step, though the forward has moved BatchNorm's running
        statistics: restore a checkpoint rather than train on) when a local loss is not finite; warns
        (RuntimeWarning) when the model is in eval mode, where BatchNorm would not train as it should, and once
        per process under bf16 autocast on a CPU without bf16 instructions (emulated, ~10x slower than fp32).
        """
        return self.begin_step(images, targets, loss_scale).run()

    def begin_step(self, images: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0,
                   step_type: Callable[..., LocalStep] = LocalStep) -> LocalStep:
        """A training step (:class:`~mlaan.engine.step.LocalStep`), to be run whole (what ``train_step`` does)
        or module by module. ``images`` (B, C, H, W), ``targets`` (B,) or (B, num_classes), and ``loss_scale`` as
        for ``train_step`` (both checked here, before any backward). ``step_type(model, images, targets,
        loss_scale)`` builds the step: a module-parallel rank passes its own
        (:class:`~mlaan.distributed.pipeline.PipelineStep`, over the modules it owns)."""
        targets = self.check_targets(targets, len(images))
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real) or not (
                math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
        if not self.training:
            # BatchNorm would normalise with its running statistics and leave them as they are: a step that trains
            # every weight but not as the run means to (a model.eval() for a test pass, then no model.train())
            warnings.warn(f"{_EVAL_MODE_WARNING}: BatchNorm uses and keeps its running statistics; call "
                          "model.train() before training", RuntimeWarning, stacklevel=3)
        runtime.warn_slow_bf16(images.device.type, self.autocast_dtype)  # once per process, on a CPU without bf16
        return step_type(self, self.prepare_inputs(images), targets, float(loss_scale))

    def check_targets(self, targets: torch.Tensor, batch: int) -> torch.Tensor:
        """``targets`` for a batch of ``batch`` images as the losses take them: class indices (B,) of any integer
        dtype (as int64), or probabilities (B, num_classes) of a float dtype. ValueError naming what was given
        otherwise, or for probabilities when an aux net needs class indices (InfoPro's contrastive task). The
        shape and dtype only: the values are not read (that would wait for the device every step)."""
        if not isinstance(targets, torch.Tensor):
            raise ValueError(f"targets must be a tensor of class indices (B,) or probabilities (B, num_classes), "
                             f"got {type(targets).__name__}")
        shape, c = tuple(targets.shape), self.num_classes
        if targets.dim() == 1 and len(targets) == batch:
            if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
                raise ValueError(f"targets of shape {shape} must be class indices (an integer tensor), got "
                                 f"{targets.dtype}; class probabilities have shape ({batch}, {c})")
            return targets if targets.dtype == torch.long else targets.long()
        if targets.dim() == 2 and shape == (batch, c):
            if not targets.is_floating_point():
                raise ValueError(f"targets of shape {shape} are class probabilities and must be a float tensor, "
                                 f"got {targets.dtype}")
            needs = [type(m).__name__ for m in self.modules() if getattr(m, "needs_class_indices", False)]
            if needs:
                raise ValueError(f"probability targets {shape} given, but the aux net {needs[0]} needs class "
                                 "indices (B,) (InfoPro's contrastive task pairs images by class)")
            return targets
        raise ValueError(f"targets of shape {shape} do not fit a batch of {batch} images: pass class indices "
                         f"({batch},) or class probabilities ({batch}, {c})")

    # ------------------------------------------------------------------------------- optimiser helpers
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's trainable parameters (the model kept after training; the local modules are views of
        it)."""
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def aux_parameters(self) -> Iterator[nn.Parameter]:
        """The aux nets' trainable parameters (independent and cascaded heads, LAM trunk copies); EMA twins are
        frozen and left out. Training only: the exported model does not hold them."""
        seen: set[int] = set()
        for heads in (self.independent_heads, self.cascade_heads):
            for p in heads.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def no_weight_decay(self) -> set[str]:
        """Names (as ``self.named_parameters()`` gives them) of the parameters the user's model lists in its own
        ``no_weight_decay()`` (timm's convention: a ViT's ``cls_token``, ``pos_embed``), so that
        ``timm.optim.create_optimizer_v2(local_model, ...)`` leaves them undecayed; empty when the backbone's model
        has no such method."""
        source = self.backbone.source if self.backbone.source is not None else self.backbone
        listed = getattr(source, "no_weight_decay", None)
        if not callable(listed):
            return set()
        patterns = set(listed())
        wanted = {id(p) for name, p in source.named_parameters()
                  if any(name == pattern or fnmatch.fnmatch(name, pattern) for pattern in patterns)}
        return {name for name, p in self.named_parameters() if id(p) in wanted}

    def param_groups(self, weight_decay: float = 1e-4) -> list[dict]:
        """Optimizer parameter groups in timm's convention: ``weight_decay`` on the weights, none on norms'
        parameters and biases (every parameter of one dimension or less, or named ``*.bias``) and on what
        :meth:`no_weight_decay` names. Backbone and aux nets alike; frozen parameters (EMA twins) are left out.
        ``torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)``."""
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not (
                math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        return weight_decay_groups(self.named_parameters(), weight_decay, self.no_weight_decay())

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Per-module gradient clipping: ``torch.nn.utils.clip_grad_norm_`` over each local module's own
        parameters and its aux nets (:meth:`module_parts`), so that no module's gradient is scaled by another's
        (one global norm would couple the gradient-isolated modules); bp, one module, gets one global norm.
        Call after ``train_step`` (and a data-parallel all-reduce), before ``optimizer.step()``. Returns each
        module's total norm before clipping, a tensor (K,)."""
        for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
            # torch's own clip_grad_norm_ takes a negative max_norm and flips every gradient's sign
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        norms = []
        device = self._device()
        for j in range(len(self.local_modules)):
            params = [p for part in self.module_parts(j) for p in part.parameters() if p.grad is not None]
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type) if params
                         else torch.zeros((), device=device))
        return torch.stack(norms)

    def _notify(self, params: list[nn.Parameter]) -> None:
        for hook in self._grads_ready_hooks:
            hook(params)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device().type, dtype=self.autocast_dtype)

    def _device(self) -> torch.device:
        # the first tensor held: a module-parallel rank releases the modules it does not train to the meta device
        return next((p for p in self.parameters() if not p.is_meta), torch.empty(0)).device

    def following_trunks(self) -> list[LeapTrunk]:
        """The LAM trunks whose EMA twin follows its block after each step: all, or only the last one with
        ``ema_update="last"``."""
        trunks = self.leap_trunks
        return trunks[-1:] if self.options.ema_update == "last" else trunks

    def module_parts(self, j: int) -> list[nn.Module]:
        """What local module j trains: its backbone blocks and its aux nets (independent, and cascaded under MLM)
        — the unit a module-parallel rank owns."""
        parts: list[nn.Module] = [self.local_modules[j]]
        if j < len(self.independent_heads):
            parts.append(self.independent_heads[j])
        if str(j) in self.cascade_heads:
            parts.append(self.cascade_heads[str(j)])
        return parts

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Move every EMA twin toward its real block (only the last one with ``ema_update="last"``)."""
        with mark(EMA_UPDATE):
            for trunk in self.following_trunks():
                trunk.follow(self.backbone.blocks[trunk.source_index])
            if self.twin_bank is not None:
                self.twin_bank.follow(self.backbone.blocks)


# ---------------------------------------------------------------------------------------------- helpers
def check_lam_trunk(method: str | MethodSpec, opts: LocalOptions) -> None:
    """One-line ValueError where ``method`` (a LAM method) could not be built with ``opts``: the shared EMA twins
    of ``lam_trunk="twins"`` (and ``"copy+twins"``) need ``ema_update="all"`` and no lag, since with
    ``ema_update="last"`` or a lag (``ema_lag=1``, module parallelism) each trunk's twin moves on its own. The
    model checks it when built; a benchmark checks it before it runs a case in a process of its own
    (``mlaan.bench.common.check_options``)."""
    spec = parse_method(method) if isinstance(method, str) else method
    if spec.leap and opts.lam_trunk in SHARED_TWIN_TRUNKS and (opts.ema_update != "all" or opts.ema_lag):
        raise ValueError(f"lam_trunk {opts.lam_trunk!r} needs ema_update 'all' and ema_lag 0 (no --parallel "
                         f"modules), got ema_update {opts.ema_update!r} and ema_lag {opts.ema_lag}")


def weight_decay_groups(named_parameters: Iterator[tuple[str, nn.Parameter]], weight_decay: float,
                        skip: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """Two optimizer groups of the trainable parameters (timm's convention): ``{"params": weights,
    "weight_decay": weight_decay}`` and ``{"params": norms, biases and the names in skip, "weight_decay": 0.0}``
    (an empty group is left out)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named_parameters:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_num_local_modules(spec: MethodSpec, opts: LocalOptions, k: object, max_k: int, arch: str,
                            key: str = "num_local_modules") -> None:
    """K (named ``key``: the API's ``num_local_modules``, ``mlaan train``'s ``local_modules``) against the
    architecture ``arch`` of ``max_k`` = its blocks after the stem + 1 and the method, and the cascade window and
    barriers against K: one ValueError naming the allowed values. Each option's own range is checked where it is
    declared (:mod:`mlaan.engine.options` and the methods' ``Options``)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{key} must be an integer, got {k!r}")
    if spec.base.end_to_end and k != 1:
        raise ValueError(f"method {spec.name!r} trains end to end: {key} must be 1, got {k}")
    if not 1 <= k <= max_k:
        blocks = "block" if max_k == 2 else "blocks"
        raise ValueError(
            f"{key}={k!r} is out of range for {arch}: allowed 1 to {max_k} "
            f"({max_k - 1} {blocks} after the stem + the stem's module)"
        )
    if spec.cascade and not 2 <= opts.window <= max(k, 2):
        raise ValueError(f"cascade window={opts.window} is not allowed with K={k}: allowed 2 to {max(k, 2)}")
    bad = [b for b in opts.cascade_barriers if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= k - 2]
    if spec.cascade and bad:  # without a cascade the barriers are not read
        raise ValueError(f"cascade_barriers={tuple(opts.cascade_barriers)} with K={k}: each must be a module "
                         f"index in 0 to {k - 2} (a barrier sits after that module)")


def _infer_classes(backbone: models.Backbone, out_shape: tuple[int, ...], given: int | None) -> int:
    """The number of classes the head scores (its profiled output (num_classes,)); ValueError when the head
    outputs something else, or when ``given`` (the caller's num_classes) differs."""
    head = f"the head (block {len(backbone.blocks) - 1}, {type(backbone.blocks[-1]).__name__})"
    if len(out_shape) != 1:
        raise ValueError(f"{head} outputs shape {out_shape}, not class scores (num_classes,)")
    if given is not None and given != out_shape[0]:
        raise ValueError(f"num_classes={given}, but {head} outputs {out_shape[0]} class scores")
    return out_shape[0]


def _first_layer(blocks: Sequence[nn.Module]) -> nn.Module | None:
    """The first convolution or linear layer of ``blocks`` (in registration order), None when there is none."""
    for block in blocks:
        for m in block.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                return m
    return None


def _infer_in_channels(backbone: models.Backbone) -> int:
    """Image channels: the backbone's ``in_channels``, else the first Conv2d's, else the first Linear's inputs
    over the image's pixels (an MLP on flattened images). ValueError when none tells."""
    if backbone.in_channels is not None:
        return backbone.in_channels
    first = _first_layer(backbone.blocks)
    if isinstance(first, nn.Conv2d):
        return first.in_channels
    h, w = backbone.image_hw
    if isinstance(first, nn.Linear) and first.in_features % (h * w) == 0:
        return first.in_features // (h * w)
    why = "it has no Conv2d or Linear layer" if first is None else (
        f"its first layer, Linear({first.in_features}, …), does not take {h}x{w}-pixel images")
    raise ValueError(f"cannot tell the image channels of {backbone.name}: {why}; pass in_channels= and image_size=")


def _infer_image_size(blocks: Sequence[nn.Module], in_channels: int | None) -> int | None:
    """The side of square images that an MLP's first Linear takes flattened (``in_channels`` or 1 or 3
    channels), None when the first layer is not a Linear or no square fits."""
    first = _first_layer(blocks)
    if not isinstance(first, nn.Linear):
        return None
    for c in (in_channels,) if in_channels is not None else (1, 3):
        side = math.isqrt(first.in_features // c)
        if c * side * side == first.in_features:
            return side
    return None


def default_num_local_modules(arch: str | models.Backbone, method: str | MethodSpec) -> int:
    """K when none is given: 1 for an end-to-end method (bp), else the architecture's default
    (:func:`mlaan.models.default_local_modules`; one module per residual block for an unregistered backbone)."""
    spec = parse_method(method) if isinstance(method, str) else method
    if spec.base.end_to_end:
        return 1
    if isinstance(arch, str):
        return models.default_local_modules(arch)
    if arch.name in models.available():
        return models.default_local_modules(arch.name)
    return arch.num_residual_blocks + 1


def create_local_model(
    arch: str | models.Backbone | nn.Module | Sequence[nn.Module],
    method: str = "dgl+mlaan",
    num_local_modules: int | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    **options: object,
) -> LocalModel:
    """Build a local-learning model.

    ``arch`` is a registered name (``mlaan.models.available()``, or ``torchvision:NAME`` / ``timm:NAME``), a
    :class:`~mlaan.models.Backbone`, your own model (a torchvision or timm model of a supported family, or any
    ``nn.Sequential``: :func:`mlaan.models.adapt` cuts it into its natural blocks and the local model shares its
    parameters, so after training your model object is the trained model), or your own list of blocks
    ``[stem, block, …, head]``. ``num_local_modules`` (K) defaults to :func:`default_num_local_modules` (1 for
    bp). ``num_classes``: None takes it from the head (10 for a registered name); ValueError when given and the
    head outputs another number. ``in_channels`` (None: 3 for a registered name, else read from the first
    Conv2d/Linear) and ``image_size`` (a side or (H, W); None: the architecture's default, 32 for a block list
    unless its first layer is a Linear on flattened images) describe the images (B, C, H, W). ``options`` are the
    engine's and the methods' declared options (:func:`mlaan.engine.options.option_fields`: window, w_ind, w_casc,
    ema_momentum, aux_head, lam_depth, infopro_lambda_recon, …); ValueError for an unknown name or a value its
    declaration refuses, and a one-line ValueError naming the block when a block cannot take the output of the
    one before it.
    """
    if isinstance(arch, str):
        backbone = models.create(arch, num_classes=10 if num_classes is None else num_classes,
                                 in_channels=3 if in_channels is None else in_channels, image_size=image_size)
    elif isinstance(arch, models.Backbone):
        backbone = arch
    elif isinstance(arch, nn.Module):
        if image_size is None and isinstance(arch, nn.Sequential):  # an MLP on flattened images says its size
            image_size = _infer_image_size(list(arch), in_channels)
        backbone = models.adapt(arch, image_size=image_size, in_channels=in_channels)
    elif isinstance(arch, Sequence) and arch and all(isinstance(b, nn.Module) for b in arch):
        size = image_size if image_size is not None else _infer_image_size(arch, in_channels) or 32
        backbone = models.Backbone(list(arch), image_size=size, in_channels=in_channels)
    else:
        raise ValueError(
            f"arch must be one of {', '.join(models.available())}, a Backbone, a torchvision/timm model, an "
            f"nn.Sequential or a list of nn.Module blocks; got {type(arch).__name__}"
        )
    if num_local_modules is None:
        num_local_modules = default_num_local_modules(backbone, method)
    channels, per_channel, defaults = _infer_in_channels(backbone), dict(options), LocalOptions().to_dict()
    for stat in ("image_mean", "image_std"):  # a one-value default is every channel's: say so per channel
        value = options.get(stat, defaults[stat])
        if isinstance(value, (tuple, list)) and len(value) == 1 and channels > 1:
            per_channel[stat] = tuple(value) * channels
    model = LocalModel(backbone, method, num_local_modules, num_classes, make_options(**per_channel))
    _warn_unread(model.spec.name, options, model.options)
    return model


def _warn_whole_network_segment(spec: MethodSpec, opts: LocalOptions, num_blocks: int) -> None:
    """A warning where BP's first ``checkpoint_segment`` spans every backbone block before the head (of
    ``num_blocks``, head included): one checkpoint around the network saves only the images, so its backward
    recomputes every activation at once, BP's peak for one more forward."""
    before_head = num_blocks - 1
    if spec.end_to_end and opts.grad_checkpointing and 1 < before_head <= opts.checkpoint_segment:
        warnings.warn(f"checkpoint_segment={opts.checkpoint_segment} spans all {before_head} backbone blocks before "
                      "the head: one segment of the whole network, whose backward holds every activation as plain "
                      f"BP does; the least memory is near {max(1, round(num_blocks ** 0.5))} blocks a segment",
                      UserWarning, stacklevel=3)


def _warn_unread(method: str, given: dict[str, object], options: LocalOptions) -> None:
    """A warning naming the options given a value other than their default that ``method`` never reads (a
    ``window`` for dgl, say) or does not read with the other options given (``aux_width`` with a linear aux
    head): they change nothing, which is rarely what their caller meant."""
    defaults, values = LocalOptions().to_dict(), options.to_dict()
    unread = [name for name in sorted(set(given) & options_ignored(method, values))
              if values[name] != defaults[name]]
    if unread:
        reasons = "; ".join(f"{name}={values[name]!r} ({why_ignored(name, method, values)})"
                            for name in unread)
        warnings.warn(f"method {method!r} does not read {reasons}: ignored", UserWarning, stacklevel=3)
