"""The engine's own options, :class:`EngineOptions`: each with its default, help, check and the part of a method
that reads it (``read_by``). A leaf module (no torch, no method registry), so that the registry can ask which
engine options a method reads without importing :mod:`mlaan.engine.options`, which collects every method's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..names import registered_spelling, unknown

# The values of the engine's choice options, declared here (this module imports no torch) and used where they act:
AUX_HEAD_SHAPES = ("mlp", "linear")  # the aux classifier's shape (mlaan.engine.heads.make_classifier)
LAM_TRUNKS = ("copies", "twins", "copy+twins")  # what a LAM aux net runs before its head (mlaan.engine.lam)
SHARED_TWIN_TRUNKS = ("twins", "copy+twins")  # trunks that run the model's shared EMA twins (lam.TwinBank)
LAM_SAMPLINGS = ("uniform", "adjacent")  # which later blocks a LAM trunk runs (mlaan.engine.lam.lam_picks)
EMA_UPDATE_MODES = ("all", "last")  # which EMA twins follow their block (LocalModel.after_optimizer_step)
BALANCE_MODES = ("blocks", "memory")  # how the backbone is split (mlaan.engine.split.compute_split)
CHECKPOINT_TRUNKS = ("all", "lead")  # which aux-trunk blocks a recomputing step recomputes (recompute.run_trunk)


# Which part of a method reads an engine option (its field's ``metadata["read_by"]``), and the methods that have
# that part (:attr:`mlaan.engine.methods.MethodSpec.engine_options` asks a method which it has). A method that
# lacks the part never reads the option: ``mlaan train`` warns when it is given, and ``--resume`` does not compare
# it. ``tests/test_engine.py`` checks, for every method, that changing an option it does not read changes nothing.
READERS = {
    "mlm": "MLM's cascade (+mlm, +mlaan)",
    "lam": "LAM's aux nets (+lam, +mlaan)",
    "head": "the aux heads of the base methods that declare it (LocalMethod.head_options)",
    "split": "the split into local modules (every method but bp)",
    "recompute": "methods with something to recompute (+mlm, +lam, +mlaan, auglocal; bp: its backbone's blocks)",
    "e2e_recompute": "the checkpointed backbone of an end-to-end method (bp)",
    # bp's one module is always among the first N: the choice of modules is a local method's
    "local_recompute": "the recomputation of a local method's modules (+mlm, +lam, +mlaan, auglocal)",
    "trunk_recompute": "the recomputation of aux nets made of blocks (+lam, +mlaan, auglocal)",
    "loss": "the cross-entropy losses of every method (the output's, and the aux classifiers' the methods build)",
    "step": "every method's training step (its local modules and aux nets)",
}


# The parts above that only choose what a step recomputes: their options change its memory and time, never a result
RECOMPUTE_READERS = ("recompute", "e2e_recompute", "local_recompute", "trunk_recompute")


def recompute_options() -> tuple[str, ...]:
    """The engine options that only choose what a training step recomputes (``grad_checkpointing``,
    ``checkpoint_segment``, ``checkpoint_modules``, ``checkpoint_trunk``): losses, gradients and BatchNorm state
    are bit-identical whatever their values (tests/test_selective_recompute.py, test_bp_checkpointing.py)."""
    return tuple(f.name for f in dataclasses.fields(EngineOptions) if f.metadata["read_by"] in RECOMPUTE_READERS)


def _option(default: Any, read_by: str, help: str, **metadata: Any) -> Any:
    """An engine option's field: its default, the part that reads it (a key of :data:`READERS`) and its help;
    ``read_when={"other_option": (values...)}`` when that part reads it only for those values of another;
    ``choices=(...)`` for a name taken from a fixed set (:func:`check_choices`)."""
    return field(default=default, metadata={"read_by": read_by, "help": help, **metadata})


@dataclass
class EngineOptions:
    """What the engine itself reads: MLM's cascade window and weights, LAM's trunks and EMA twins, the aux
    classifiers' shape, the split and recomputation (defaults: the published values, docs/METHOD.md#options)."""

    window: int = _option(2, "mlm", "MLM cascade window w: consecutive modules a cascaded loss reaches (2 to K)")
    w_ind: float = _option(0.001, "mlm", "weight of the independent aux loss under MLM")
    w_casc: float = _option(0.999, "mlm", "weight of the cascaded aux loss under MLM")
    ema_momentum: float = _option(0.995, "lam", "LAM EMA momentum m in twin <- m*twin + (1-m)*block, in [0, 1)")
    ema_update: str = _option("all", "lam", "which EMA twins follow their block after each step: 'all', or 'last' "
                                            "(the official CIFAR code's behaviour)", choices=EMA_UPDATE_MODES)
    # A twin whose block is trained on another rank (module parallelism) can only see that block as it was one
    # step earlier without stalling the pipeline; the one-process engine can reproduce that lag exactly.
    ema_lag: int = _option(0, "lam", "LAM EMA twins follow their block as it was after the previous step (1) or "
                                     "after this one (0); --parallel modules needs 1")
    lam_depth: int = _option(4, "lam", "copied later blocks in the earliest LAM aux nets")
    lam_trunk: str = _option("copies", "lam", "a LAM aux net's trunk: 'copies' (the paper's: trained copies of "
                             "later blocks, the first with its EMA twin added), 'twins' (the EMA twins of the "
                             "later blocks alone, shared across aux nets: no trained trunk, frozen weights of at "
                             "most one backbone whatever K) or 'copy+twins' (one trained copy of the first later "
                             "block with its twin added, then twins)", choices=LAM_TRUNKS)
    # "adjacent" tested whether frozen twins lose accuracy by skipping blocks; on ResNet-32 it was worse than
    # "uniform" for the twins trunk (BENCHMARKS, LAM trunk of EMA twins)
    lam_sampling: str = _option("uniform", "lam", "which later blocks a LAM trunk runs: 'uniform' (the paper's, "
                                "AugLocal's sampling up to the last block) or 'adjacent' (the blocks right after "
                                "the module)", choices=LAM_SAMPLINGS)
    lam_shrink: float = _option(1.0, "lam", "c of the LAM depth schedule, in [0, 1]: 1 ends at one block")
    depth_shrink: float = _option(0.5, "head", "c of AugLocal's aux-depth schedule, in [0, 1] (its published value)")
    # "linear" is what the official MLAAN code uses, so step times compare with it; "mlp" (DGL's classifier)
    # cost dgl+mlaan at K=16 about one BP step more per step (BENCHMARKS.md).
    aux_head: str = _option("linear", "head", f"classifier shape of the aux nets: {' or '.join(AUX_HEAD_SHAPES)}",
                            choices=AUX_HEAD_SHAPES)
    aux_width: int = _option(128, "head", "hidden width of the 'mlp' aux classifier", read_when={"aux_head": ("mlp",)})
    balance: str = _option("blocks", "split", "split by 'blocks' (counts differ by at most one) or 'memory' "
                                              "(InfoPro*: even step memory)", choices=BALANCE_MODES)
    balance_batch_size: int = _option(128, "split", "the training batch whose step memory balance='memory' evens out",
                                      derived="mlaan train sets it to --batch-size")
    # Less peak memory for about one more forward of the recomputed blocks (two for the window's modules);
    # results are unchanged.
    grad_checkpointing: bool = _option(False, "recompute", "recompute aux blocks (LAM trunks, EMA twins, AugLocal "
                                       "blocks) and the cascade window's module graphs in backward (bp: every "
                                       "backbone block, activation checkpointing): less peak memory for more "
                                       "forward compute, identical results")
    # BP's checkpointed segments (torch.utils.checkpoint.checkpoint_sequential's trade-off): n/s saved segment
    # inputs plus one segment's activations at a time; about sqrt(n) blocks per segment makes the sum smallest.
    checkpoint_segment: int = _option(1, "e2e_recompute", "bp with grad_checkpointing: consecutive backbone blocks "
                                      "checkpointed as one segment (1: every block on its own; about the square "
                                      "root of the block count gives the least memory)",
                                      read_when={"grad_checkpointing": (True,)})
    # Selective recomputation: the peak of a recomputing dgl+mlaan step is made by the high-resolution modules
    # (their LAM trunks and the window's graphs); later modules' recomputation costs time and saves no peak.
    checkpoint_modules: int = _option(0, "local_recompute", "with grad_checkpointing, recompute only in the first N "
                                      "local modules (their aux nets and cascade-window graphs); 0: in all",
                                      read_when={"grad_checkpointing": (True,)})
    # A trunk's lead (LAM: the copy and the EMA twin of the first later block) runs at its module's resolution; on a
    # network that downsamples, an early module's later trunk blocks are past a downsampling and hold half or less,
    # so recomputing the leads alone frees most of the peak for a fraction of the recompute (ResNet-32 K=16: the
    # same peak to the byte, BENCHMARKS Frontier).
    checkpoint_trunk: str = _option("all", "trunk_recompute", "with grad_checkpointing, the aux-net trunk blocks "
                                    "recomputed: 'all', or 'lead': each trunk's first block only (LAM: its copy and "
                                    "EMA twin), which runs at the module's resolution, the rest kept",
                                    read_when={"grad_checkpointing": (True,)}, choices=CHECKPOINT_TRUNKS)
    cascade_barriers: tuple[int, ...] = _option((), "mlm", "local modules after which MLM cascades stop (no "
                                                "cascaded gradient flows into them from later modules)",
                                                derived="mlaan train sets it to the rank boundaries of --parallel "
                                                        "modules --boundary cut")
    # mlaan.engine.compile: each part a step calls compiled in place (no _orig_mod. keys); results to float rounding
    compile: bool = _option(False, "step", "torch.compile (inductor) each local module and aux net that a training "
                            "step runs; state_dict keys unchanged, inference stays eager")
    label_smoothing: float = _option(0.0, "loss", "label smoothing eps in [0, 1) of every cross-entropy (output and "
                                     "aux classifiers) on class-index targets; probability targets are used as "
                                     "given (timm's Mixup smooths its own)")
    image_mean: tuple[float, ...] = _option((0.0,), "head", "the data set's per-channel mean (InfoPro un-normalises "
                                            "images with it)", derived="mlaan train sets it from the data set")
    image_std: tuple[float, ...] = _option((1.0,), "head", "the data set's per-channel std",
                                           derived="mlaan train sets it from the data set")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        check_choices(self)
        if self.ema_lag not in (0, 1):
            raise ValueError(f"ema_lag must be 0 or 1, got {self.ema_lag}")
        for name in ("lam_depth", "balance_batch_size", "checkpoint_segment"):
            _check_at_least(name, getattr(self, name), 1)
        if self.checkpoint_modules < 0:
            raise ValueError(f"checkpoint_modules must be 0 (all) or more, got {self.checkpoint_modules}")
        if self.aux_width < 1:
            raise ValueError(f"need aux_width >= 1, {self.aux_width} given")
        for name in ("lam_shrink", "depth_shrink"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("w_ind", "w_casc"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")


def choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` as ``allowed`` spells it, given in any case (``MLP`` → ``mlp``), as method and data set names
    are; ValueError naming the allowed values otherwise."""
    spelled = registered_spelling(value, allowed)
    if spelled is None:
        raise ValueError(unknown(name, value, allowed, word="allowed"))
    return spelled


def check_choices(options: Any) -> None:
    """Every field of the options dataclass ``options`` declared with ``choices`` (its metadata) set to the
    allowed spelling of its value, given in any case; ValueError (:func:`choice`) for a value not allowed.
    :class:`~mlaan.engine.options.LocalOptions` applies it to every options class it builds, a plug-in's included;
    a ``__post_init__`` calls it to check the class built on its own, as the engine's and InfoPro's do."""
    for f in dataclasses.fields(options):
        if "choices" in f.metadata:  # object.__setattr__: a frozen dataclass too
            object.__setattr__(options, f.name, choice(f.name, getattr(options, f.name), f.metadata["choices"]))


def _check_at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
