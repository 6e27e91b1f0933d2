"""The training loop, in view (torchvision's ``train_one_epoch``/``evaluate`` style): the optimizer recipe and its
schedule, the one optimizer step every trainer and benchmark runs, an epoch of them (:func:`train_one_epoch`),
and evaluation (:func:`evaluate`). :class:`~mlaan.training.trainer.Trainer` adds the run around these: data,
resume, checkpoints, signals, logs.

Recipe (docs/METHOD.md#training-recipe): SGD with Nesterov momentum 0.9 and weight decay 1e-4, a linear warm-up
then a cosine decay to 0, both per optimizer step. ``--opt adamw``, ``--clip-grad`` (per local module),
``--mixup``/``--cutmix`` (timm's ``Mixup``) and ``--label-smoothing`` are the options of a user's own recipe.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..engine.local_model import MODULE_PATHS
from .config import OPTIMIZERS

if TYPE_CHECKING:
    from torch.utils.data import Dataset


# ---------------------------------------------------------------------------------------------- recipe
def make_optimizer(
    model: torch.nn.Module, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-4,
    opt: str = "sgd", betas: tuple[float, float] = (0.9, 0.999), filter_bias_and_bn: bool | None = None,
) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters: backbone and aux nets (LAM's copies included); the EMA
    twins' parameters are frozen (``requires_grad=False``, moved by ``after_optimizer_step``) and left out.

    ``opt="sgd"`` (the paper's): Nesterov only where there is momentum (PyTorch refuses it without);
    ``"adamw"``: ``torch.optim.AdamW`` with ``betas`` (``momentum``/``nesterov`` unread). ``filter_bias_and_bn``
    (timm's name): True puts no weight decay on norms, biases and what the model's ``no_weight_decay()`` names
    (``LocalModel.param_groups``); None: off for sgd (the paper decays every parameter), on for adamw. Defaults:
    the paper's."""
    if opt not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {opt!r}; allowed: {', '.join(OPTIMIZERS)}")
    if filter_bias_and_bn is None:
        filter_bias_and_bn = opt != "sgd"
    if filter_bias_and_bn:
        groups = getattr(model, "param_groups", None)
        if callable(groups):
            params: list = groups(weight_decay)
        else:
            from ..engine.local_model import weight_decay_groups

            listed = getattr(model, "no_weight_decay", None)
            params = weight_decay_groups(model.named_parameters(), weight_decay,
                                         set(listed()) if callable(listed) else set())
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


def make_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int
               ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """timm's ``Mixup`` for training batches (``mixup``/``cutmix``: the Beta distributions' alphas, 0: off; one of
    the two chosen per batch when both are on), returning probability targets (B, num_classes) smoothed by
    ``label_smoothing``; None when both are 0. Batches of an odd size mix all but their last image (timm's
    ``Mixup`` pairs the batch with its reverse), which keeps its smoothed one-hot target. ImportError naming the
    extra when timm is not installed. Its random draws come from numpy's global generator, which checkpoints
    save."""
    if not (mixup > 0 or cutmix > 0):
        return None
    try:
        from timm.data import Mixup
    except ImportError as err:
        raise ImportError("--mixup/--cutmix use timm's Mixup: pip install -e '.[timm]'") from err
    mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)

    def apply(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) % 2 == 0:
            return mix(images, targets)
        head, head_targets = mix(images[:-1], targets[:-1]) if len(images) > 1 else (images[:0], None)
        off = label_smoothing / num_classes
        last = torch.full((1, num_classes), off, device=images.device)
        last[0, targets[-1]] += 1.0 - label_smoothing
        soft = last if head_targets is None else torch.cat([head_targets, last.to(head_targets.dtype)])
        return torch.cat([head, images[-1:]]), soft

    return apply


def clip_gradients(model: Any, max_norm: float | None) -> torch.Tensor | None:
    """Per-module gradient clipping of a :class:`~mlaan.LocalModel` (``model.clip_grad_norm_``: each local module
    with its aux nets on its own; bp: one global norm); a plain module gets one global norm. Nothing for None."""
    if max_norm is None:
        return None
    clip = getattr(model, "clip_grad_norm_", None)
    if callable(clip):
        return clip(max_norm)
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor for optimizer step ``s``: linear warm-up over ``warmup_steps``, then cosine to 0."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup_steps) / span)))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, start: int = 0
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of the recipe: :func:`warmup_cosine` as a ``LambdaLR`` (step it after each optimizer
    step). ``start``: the schedule's step the next optimizer step takes (a resume that rescales the schedule);
    the optimizer's groups then need their ``initial_lr`` (an earlier scheduler's, restored from a checkpoint),
    and their ``lr`` is set to that step's."""
    factor = warmup_cosine(warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start - 1)


# -------------------------------------------------------------------------------------------------- step
def optimizer_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    wait_for_gradients: Callable[[], None] | None = None,
    after_train_step: Callable[[], None] | None = None,
    clip_grad: float | None = None,
) -> dict:
    """One training step of a :class:`~mlaan.LocalModel`, in the one order every caller needs:
    ``optimizer.zero_grad`` → ``model.train_step`` (forward, every local backward) → ``wait_for_gradients()``
    (a distributed run's all-reduce, ``GradientAverager.wait``) → per-module gradient clipping at ``clip_grad``
    (:func:`clip_gradients`; None: none) → ``optimizer.step`` →
    ``model.after_optimizer_step`` (the EMA twins follow their blocks; forgetting it freezes every twin).

    ``images`` (B, C, H, W) and ``targets`` (B,) on the model's device. ``after_train_step()`` is called right
    after ``train_step`` (a benchmark's timer). Returns ``train_step``'s statistics; a FloatingPointError from
    ``train_step`` (non-finite loss) propagates before any parameter has changed.
    """
    optimizer.zero_grad(set_to_none=True)
    stats = model.train_step(images, targets)
    if after_train_step is not None:
        after_train_step()
    if wait_for_gradients is not None:
        wait_for_gradients()
    clip_gradients(model, clip_grad)
    optimizer.step()
    model.after_optimizer_step()
    return stats


# ------------------------------------------------------------------------------------------------- epoch
def train_one_epoch(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    meter: EpochMeter,
    wait_for_gradients: Callable[[], None] | None = None,
    after_step: Callable[[dict, float], bool] | None = None,
    progress: str | None = None,
    world_size: int = 1,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    clip_grad: float | None = None,
) -> None:
    """Train ``model`` (a :class:`~mlaan.LocalModel`) for one pass over ``loader``'s ``(images (B, C, H, W),
    targets (B,))`` batches: per batch :func:`optimizer_step` (zero_grad → train_step → ``wait_for_gradients`` →
    optimizer.step → after_optimizer_step), then ``scheduler.step()`` (the schedule is per optimizer step).

    ``meter`` adds up the steps' losses and accuracies (it may hold the sums of this epoch's earlier steps, from a
    mid-epoch checkpoint). ``after_step(stats, lr)``, after each step (``stats``: ``train_step``'s, ``lr``: the rate
    the step used) does the caller's per-step work (counting steps, periodic checkpoints, stop signals, logs) and
    returns True to end the epoch early. ``progress``: the label of a progress bar on stderr (none when None);
    ``world_size`` scales its images/s. A FloatingPointError from ``train_step`` (non-finite loss) propagates
    before the step changed any parameter. ``batch_transform(images, targets)``, applied to each training batch on
    the device (:func:`make_mixup`: targets become probabilities), and ``clip_grad`` (:func:`optimizer_step`) are
    the user's recipe; the meter counts a batch's images whatever its targets.
    """
    model.train()
    meter.start()
    bar = None if progress is None else tqdm(loader, desc=progress, leave=False, dynamic_ncols=True, mininterval=1.0,
                                             file=sys.stderr)
    for images, targets in loader if bar is None else bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
        stats = optimizer_step(model, optimizer, images, targets, wait_for_gradients, clip_grad=clip_grad)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
        scheduler.step()
        meter.update(stats, len(targets))
        if bar is not None:
            bar.set_postfix(**meter.postfix(lr, world_size), refresh=False)
        if after_step is not None and after_step(stats, lr):
            break
    if bar is not None:
        bar.close()


_MODULE_KEYS = ("independent_losses", "cascaded_losses")  # train_step's per-module loss lists


@dataclass
class EpochMeter:
    """Running sums of an epoch's training steps, weighted by batch size: loss, correct predictions, images, the
    seconds spent, and per local module the losses of its independent and cascaded aux nets
    (``module_loss_sums``: ``{"independent_losses": [sum or None per module], "cascaded_losses": [...]}``, None
    where a module has no such aux net). Its :meth:`state_dict` is what a mid-epoch checkpoint saves as
    ``epoch_partial``, so that a resumed epoch reports all of its steps."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0
    module_loss_sums: dict[str, list[float | None]] = field(default_factory=dict)
    # (seconds of earlier passes, perf_counter at this pass's start): seconds keep counting across a resume
    _clock: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EpochMeter:
        """A meter holding a checkpoint's ``epoch_partial`` sums (a fresh one for None or a non-dict)."""
        if not isinstance(state, dict):
            return cls()
        sums = {k: float(state.get(k, 0.0)) for k in ("loss_sum", "correct", "count", "seconds")}
        modules = {name: [None if v is None else float(v) for v in values]
                   for name, values in (state.get("module_loss_sums") or {}).items()}
        return cls(**sums, module_loss_sums=modules)

    def state_dict(self) -> dict[str, Any]:
        """The sums as plain data (a checkpoint's ``epoch_partial``); lists are copied."""
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count, "seconds": self.seconds,
                "module_loss_sums": {name: list(values) for name, values in self.module_loss_sums.items()}}

    def reduced_state(self, reduce: Callable[[dict[str, float]], dict[str, float]]) -> dict[str, Any]:
        """:meth:`state_dict` with every sum added up over the ranks (``reduce``, collective; the count as
        ``reduce`` leaves it): what a checkpoint of a multi-process run saves, so that the epoch's figures of a
        resumed run count every rank's steps once."""
        state = self.state_dict()
        totals = reduce(self._flat_sums())
        for key in ("loss_sum", "correct", "count"):
            state[key] = totals[key]
        state["module_loss_sums"] = {
            name: [None if v is None else totals[f"{name}/{j}"] for j, v in enumerate(values)]
            for name, values in self.module_loss_sums.items()}
        return state

    def held_by_another_rank(self, keep_count: bool = False) -> EpochMeter:
        """This meter as a rank other than the first restores a checkpoint's (all ranks') sums: the first rank
        holds them, so this one starts from zero; its seconds are kept, and its count when ``keep_count`` (module
        parallelism: every rank counts the same images)."""
        return EpochMeter(count=self.count if keep_count else 0.0, seconds=self.seconds, module_loss_sums={
            name: [None if v is None else 0.0 for v in values] for name, values in self.module_loss_sums.items()})

    def _flat_sums(self) -> dict[str, float]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count, **{
            f"{name}/{j}": 0.0 if v is None else v
            for name, values in self.module_loss_sums.items() for j, v in enumerate(values)
        }}

    def start(self) -> None:
        """Start timing this pass (the seconds of earlier passes over the same epoch are kept)."""
        self._clock = (self.seconds, time.perf_counter())

    def update(self, stats: dict, n: int) -> None:
        """Add a step of batch size ``n`` (``stats``: ``train_step``'s ``loss``, ``accuracy`` and per-module lists)."""
        self.loss_sum += stats["loss"] * n
        self.correct += stats["accuracy"] * n
        self.count += n
        for name in _MODULE_KEYS:
            values = stats.get(name)
            if values is None:
                continue
            totals = self.module_loss_sums.setdefault(name, [0.0 if v is not None else None for v in values])
            for j, v in enumerate(values):
                if v is not None and totals[j] is not None:
                    totals[j] += v * n
        self._tick()

    def _tick(self) -> None:
        if self._clock is not None:
            before, t0 = self._clock
            self.seconds = before + time.perf_counter() - t0

    def postfix(self, lr: float, world_size: int = 1) -> dict[str, str]:
        """The progress bar's running figures: mean loss, accuracy, images/s (all ranks), learning rate."""
        rate = self.count * world_size / max(self.seconds, 1e-9)
        return {"loss": f"{self.loss_sum / self.count:.3f}", "acc": f"{100 * self.correct / self.count:.1f}%",
                "img_s": f"{rate:.0f}", "lr": f"{lr:.4g}"}

    def summary(self, reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
                world_size: int = 1) -> dict[str, Any]:
        """The epoch's means over every rank (``reduce`` sums the sums across ranks; None: this process only):
        ``loss``, ``accuracy``, ``module_losses`` ({kind: [mean or None per module]}), ``images``, ``seconds``
        (this rank's) and ``images_per_second``."""
        self._tick()
        sums = self._flat_sums()
        totals = reduce(sums) if reduce is not None else sums
        n = max(totals["count"], 1)
        return {
            "module_losses": {name: [None if v is None else totals[f"{name}/{j}"] / n for j, v in enumerate(values)]
                              for name, values in self.module_loss_sums.items()},
            "loss": totals["loss_sum"] / n,
            "accuracy": totals["correct"] / n,
            # every rank's images (summed, or each pipeline rank's count of all): a resumed epoch's earlier
            # steps are held by the first rank alone
            "images": totals["count"] if reduce is not None else self.count * world_size,
            "seconds": self.seconds,
            "images_per_second": (totals["count"] if reduce is not None else self.count * world_size)
            / max(self.seconds, 1e-9),
        }


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate_backbone(
    backbone: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
    channels_last: bool = False,
    progress: str | None = None,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``backbone`` over ``loader`` (eval mode, no grad); batches are
    made channels-last when ``channels_last`` (the backbone's parameters are expected to be so already);
    ``progress``: the label of a progress bar on stderr (none when None)."""
    was_training = backbone.training
    backbone.eval()
    loss_sum = correct = count = 0.0
    batches = loader if progress is None else tqdm(loader, desc=progress, unit="batch", leave=False,
                                                   dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    with torch.no_grad():
        for images, targets in batches:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            if autocast_dtype is not None:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    logits = backbone(images)
            else:
                logits = backbone(images)
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            correct += (logits.argmax(1) == targets).sum().item()
            count += len(targets)
    backbone.train(was_training)
    totals = {"loss_sum": loss_sum, "correct": correct, "count": count}
    if reduce is not None:
        totals = reduce(totals)
    n = max(totals["count"], 1)
    return {"loss": totals["loss_sum"] / n, "accuracy": totals["correct"] / n, "count": int(count)}


def has_batchnorm(module: torch.nn.Module) -> bool:
    """Whether ``module`` has a BatchNorm layer that keeps running statistics (what :func:`precise_batchnorm`
    re-estimates)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in module.modules())


@torch.no_grad()
def precise_batchnorm(
    backbone: torch.nn.Module,
    dataset: Dataset,
    batches: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    step: int = 0,
    channels_last: bool = False,
) -> int:
    """Precise BatchNorm: replace every BatchNorm's running mean and variance in ``backbone`` (in place) by their
    average over ``batches`` batches of ``batch_size`` images drawn from ``dataset`` (with its own transform, e.g.
    the training augmentation), in train mode and fp32, with :func:`torch.optim.swa_utils.update_bn`. Returns the
    number of images used (0 when the backbone has no BatchNorm with running statistics).

    Why: the running statistics are an exponential average (momentum 0.1) over the last steps' batches, taken
    while the weights move; when they move fast, as gradient-isolated local modules do at a high learning rate,
    the statistics no longer match the weights and eval-mode accuracy drops (BENCHMARKS.md "Stale BatchNorm
    statistics").
    Source: Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), §3 (PreciseBN, as in pycls / fvcore).

    The images and their augmentation are drawn from the run's ``seed`` and optimizer ``step`` alone, so that
    ``mlaan eval`` of the checkpoint saved at a step re-estimates on the very batches the run's evaluation used;
    the global random state is restored afterwards, so a training run that calls this is otherwise unchanged.
    ValueError when ``batches`` or ``batch_size`` < 1.
    """
    from torch.optim.swa_utils import update_bn

    if batches < 1 or batch_size < 1:
        raise ValueError(f"precise BatchNorm needs batches >= 1 and batch_size >= 1, got {batches}, {batch_size}")
    if not has_batchnorm(backbone):
        return 0
    loader, draw_seed = precise_bn_batches(dataset, batches, batch_size, seed, step)
    # The dataset's transform (random crops, flips) draws from the global CPU generator, which training owns:
    # seed it for these batches alone, and give training its state back.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(draw_seed)
        images = (_to_device(x, device, channels_last) for x, _ in loader)
        update_bn(images, backbone)
    return len(loader.dataset)


def precise_bn_batches(dataset: Dataset, batches: int, batch_size: int, seed: int, step: int
                       ) -> tuple[DataLoader, int]:
    """The training batches :func:`precise_batchnorm` re-estimates on at (``seed``, ``step``), and the seed of the
    global CPU generator to iterate them under (their augmentation draws from it): the same batches wherever they
    are drawn (one process, every stage of a module pipeline)."""
    count = min(len(dataset), batches * batch_size)
    draw_seed = seed * 1000003 + step
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(draw_seed))[:count].tolist()
    return DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size), draw_seed


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images


def evaluate(
    model: Any,
    loader: DataLoader,
    device: torch.device,
    reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Test loss and top-1 accuracy of a :class:`~mlaan.LocalModel`'s plain backbone (what the trained network
    is), in the model's own precision and memory format: :func:`evaluate_backbone` with ``model.autocast_dtype``
    and ``model.channels_last``. ``reduce`` sums the counts across ranks (None: this process only)."""
    return evaluate_backbone(model.backbone, loader, device, model.autocast_dtype, reduce=reduce,
                             channels_last=model.channels_last)


def evaluate_modules(model, loader: DataLoader, device: torch.device) -> dict[str, list[float | None]]:
    """Test top-1 accuracy of each local module's aux nets, ``{"independent": [...], "cascaded": [...]}`` (see
    ``LocalModel.module_logits``; the last entry of each: the backbone itself), None where a module has no such
    aux net or it does not classify; eval mode, no grad. Shows which modules' features lag."""
    was_training = model.training
    model.eval()
    correct: dict[str, list[float]] = {}
    classifies: dict[str, list[bool]] = {}
    count = 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        for path in MODULE_PATHS:
            predictions = model.module_logits(images, path)
            if path not in correct:
                correct[path], classifies[path] = [0.0] * len(predictions), [p is not None for p in predictions]
            for j, logits in enumerate(predictions):
                if logits is not None:
                    correct[path][j] += (logits.argmax(1) == targets).sum().item()
        count += len(targets)
    model.train(was_training)
    return {path: [c / max(count, 1) if ok else None for c, ok in zip(correct[path], classifies[path])]
            for path in correct}
