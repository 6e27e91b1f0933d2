"""Cutting a backbone into K contiguous local modules, computed (never tabled).

Units are the stem and the residual blocks (``blocks[:-1]``); the head always rides with the last unit.
K counts the stem's module, so K ranges over 1 … number of units (= residual blocks + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .options import BALANCE_MODES


@dataclass(frozen=True)
class BlockProfile:
    """What dummy forwards tell about each block: its input/output shapes (without the batch dimension) and the
    memory a training step holds for it, split into what scales with the batch and what does not.

    ``sample_bytes[i]``: bytes autograd saves for backward per image (activations).
    ``fixed_bytes[i]``: bytes independent of the batch: the weight gradients the block's backward makes, and
    the batch-independent tensors it saves (BatchNorm's per-channel statistics). Weights that autograd saves
    are the parameters themselves, held anyway, so they add nothing.
    """

    in_shapes: list[tuple[int, ...]]
    out_shapes: list[tuple[int, ...]]
    sample_bytes: list[int]
    fixed_bytes: list[int]
    # (i, j): block j's output depends on a tensor that block i computed, not through j's input (state shared
    # across blocks, a UNet-style skip kept in a dict or list): see check_shared_state
    reads_from: tuple[tuple[int, int], ...] = ()

    def changes_shape(self, index: int) -> bool:
        return self.in_shapes[index] != self.out_shapes[index]

    def step_bytes(self, batch_size: int) -> list[int]:
        """Each block's memory in a training step at ``batch_size`` images."""
        return [batch_size * s + f for s, f in zip(self.sample_bytes, self.fixed_bytes)]


def _clone_leaf_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a block that writes into its input: give it a copy when the input is a leaf (a local
    module's or an aux net's detached input, or anything under ``torch.no_grad``), which autograd forbids to be
    changed in place or which another consumer (a LAM trunk's EMA twin) still reads."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_leaf:
        return (args[0].clone(), *args[1:])
    return None


def guard_inplace_input(block: nn.Module) -> None:
    """Make ``block`` copy a leaf input before it writes into it (see :func:`_clone_leaf_input`); idempotent.
    The hook is the block's own, so copies of it (LAM, AugLocal, EMA twins) keep it."""
    if _clone_leaf_input not in block._forward_pre_hooks.values():
        block.register_forward_pre_hook(_clone_leaf_input)


def mutates_input(block: nn.Module) -> bool:
    """Whether ``block`` or a block inside it writes into its input (was given :func:`guard_inplace_input`)."""
    return any(_clone_leaf_input in m._forward_pre_hooks.values() for m in block.modules())


def _describe(index: int, block: nn.Module, count: int) -> str:
    role = "stem" if index == 0 else "head" if index == count - 1 else "block"
    return f"block {index} ({role}, {type(block).__name__})"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


@torch.no_grad()
def check_blocks(blocks: nn.ModuleList, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Run a dummy batch of two images of ``input_shape`` through ``blocks`` in eval mode and return each block's
    output shape (no batch dimension). A block that writes into its input in place (``nn.ReLU(inplace=True)``
    first) gets :func:`guard_inplace_input`. Raises ValueError, one line naming the block, when a block cannot
    take what the one before it outputs (or the images) or returns something other than one tensor."""
    was_training = [m.training for m in blocks]
    blocks.eval()
    first = next(iter(blocks.parameters()), None)
    device, dtype = (first.device, first.dtype) if first is not None else (None, torch.float32)
    x = torch.zeros(2, *input_shape, device=device, dtype=dtype)
    shapes = []
    try:
        for i, block in enumerate(blocks):
            probe = x.clone()
            version = probe._version
            source = "the images" if i == 0 else f"the output of {_describe(i - 1, blocks[i - 1], len(blocks))}"
            try:
                y = block(probe)
            except Exception as err:
                raise ValueError(f"{_describe(i, block, len(blocks))} cannot take {source}, of shape "
                                 f"{tuple(x.shape[1:])}: {_one_line(err)}") from err
            if not isinstance(y, torch.Tensor):
                raise ValueError(f"{_describe(i, block, len(blocks))} returns a {type(y).__name__}, not a tensor; "
                                 "each block must return one tensor")
            if probe._version != version:
                guard_inplace_input(block)
            shapes.append(tuple(y.shape[1:]))
            x = y
    finally:
        for module, mode in zip(blocks, was_training):
            module.train(mode)
    return shapes


def _saved_bytes(block: nn.Module, x: torch.Tensor, params: set[int]) -> tuple[torch.Tensor, int]:
    """``block(x)`` and the bytes of the storages autograd saves for its backward, those at ``params`` (data
    pointers of parameters and buffers) left out."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    return y, sum(storages.values())


def _inputs_reached(y: torch.Tensor, leaves: dict[int, int]) -> set[int]:
    """The blocks whose input leaf (``leaves``: id of the leaf → block index) ``y``'s autograd graph reaches."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = [y.grad_fn] if isinstance(y, torch.Tensor) and y.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and id(variable) in leaves:
            found.add(leaves[id(variable)])
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def profile_blocks(blocks: nn.ModuleList, input_shape: tuple[int, int, int]) -> BlockProfile:
    """Run dummy batches of one and two images through ``blocks`` in eval mode (no BatchNorm statistics change)
    and record each block's shapes and memory (see :class:`BlockProfile`): the difference between the two
    batches is what one more image costs, the rest is fixed."""
    was_training = [m.training for m in blocks]
    blocks.eval()
    first = next(iter(blocks.parameters()), None)
    device, dtype = (first.device, first.dtype) if first is not None else (None, torch.float32)
    x1 = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    x2 = torch.zeros(2, *input_shape, device=device, dtype=dtype)
    in_shapes, out_shapes, per_image, fixed = [], [], [], []
    # each block's input is a leaf of its own: a block output whose graph reaches another block's input leaf
    # depends on what that block computed (the leaves are kept, so that their ids stay theirs)
    leaves: dict[int, int] = {}
    kept: list[torch.Tensor] = []
    reads_from: set[tuple[int, int]] = set()
    try:
        for index, block in enumerate(blocks):
            held = [*block.parameters(), *block.buffers()]  # in memory anyway, saved for backward or not
            params = {t.untyped_storage().data_ptr() for t in held}
            grads = sum(p.numel() * p.element_size() for p in block.parameters() if p.requires_grad)
            x1, x2 = x1.detach().requires_grad_(), x2.detach().requires_grad_()
            kept += [x1, x2]
            leaves[id(x1)] = leaves[id(x2)] = index
            y1, saved1 = _saved_bytes(block, x1, params)
            y2, saved2 = _saved_bytes(block, x2, params)
            reads_from.update((i, index) for i in _inputs_reached(y1, leaves) | _inputs_reached(y2, leaves)
                              if i != index)
            in_shapes.append(tuple(x1.shape[1:]))
            out_shapes.append(tuple(y1.shape[1:]))
            per_image.append(saved2 - saved1)
            fixed.append(max(0, 2 * saved1 - saved2) + grads)
            x1, x2 = y1.detach(), y2.detach()
    finally:
        for module, mode in zip(blocks, was_training):
            module.train(mode)
    return BlockProfile(in_shapes, out_shapes, per_image, fixed, tuple(sorted(reads_from)))


def check_shared_state(profile: BlockProfile, split: list[range], copied: set[int], method: str,
                       blocks: nn.ModuleList) -> None:
    """Refuse (ValueError, one line) a block that reads a tensor an earlier block computed outside its input —
    state shared across blocks, such as a UNet-style skip connection kept in a dict or list that block i fills
    and block j reads — when block i and block j fall in different local modules (no gradient crosses a local
    module, and the later module's backward would run into the earlier one's freed graph: autograd's "Trying to
    backward through the graph a second time"), or when the method's aux nets run copies of either block (a
    LAM trunk's or AugLocal's copy reads and writes that state too)."""
    module_of = {unit: m for m, units in enumerate(split) for unit in units}
    for i, j in profile.reads_from:
        if module_of.get(i) != module_of.get(j):
            why = (f"under {method} with K={len(split)} they fall in local modules {module_of.get(i)} and "
                   f"{module_of.get(j)}, and no gradient crosses a local module")
        elif i in copied or j in copied:
            why = f"the aux nets of {method} run copies of block {i if i in copied else j}, which share that state"
        else:
            continue
        raise ValueError(
            f"{_describe(j, blocks[j], len(blocks))} uses a tensor computed by {_describe(i, blocks[i], len(blocks))}"
            f" that is not its input (a skip connection across blocks kept in shared state, UNet-style): {why}; "
            f"make blocks {i} to {j} one block (e.g. one nn.Module running them, the skip inside it), or train "
            "end to end (method bp)")


def check_shared_parameters(split: list[range], method: str, blocks: nn.ModuleList) -> None:
    """Refuse (ValueError, one line) a parameter held by blocks in two local modules (a module or a weight called
    at two depths of the forward: tied weights): the later module's local backward would write into the earlier
    module's gradient (no gradient crosses a local module), and per-module clipping and module parallelism would
    treat it twice. ``split``: each local module's blocks; the head (the last block) rides with the last module."""
    module_of = {unit: m for m, units in enumerate(split) for unit in units}
    module_of[len(blocks) - 1] = len(split) - 1
    first: dict[int, tuple[int, str]] = {}
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            if not p.requires_grad:  # frozen: no gradient to leak
                continue
            seen = first.setdefault(id(p), (i, name))
            if module_of.get(seen[0]) != module_of.get(i):
                a = seen[0]
                raise ValueError(
                    f"{_describe(i, blocks[i], len(blocks))} and {_describe(a, blocks[a], len(blocks))} share the "
                    f"parameter {seen[1]!r} (a weight used at two depths, tied): under {method} with K={len(split)} "
                    f"they fall in local modules {module_of.get(a)} and {module_of.get(i)}, and no gradient crosses "
                    f"a local module; untie it, pass blocks {a} to {i} as one block, or train end to end (method bp)")


def split_sizes(costs: list[float], num_modules: int, min_size: int = 1) -> list[int]:
    """Partition ``costs`` into ``num_modules`` contiguous runs of at least ``min_size`` items minimising the
    largest run's sum (exact dynamic programme, O(n²·num_modules)).

    Ties go to the partition found first scanning from the front, so equal costs give
    ``numpy.array_split``-like sizes (earlier modules take the remainder). Raises ValueError when
    ``num_modules`` runs of ``min_size`` do not fit in ``len(costs)``.
    """
    n = len(costs)
    if not 1 <= num_modules or num_modules * min_size > n:
        raise ValueError(f"cannot cut {n} items into {num_modules} runs of at least {min_size}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-run cost splitting the first i units into k runs; cut[k][i]: start of last run.
    best = [[inf] * (n + 1) for _ in range(num_modules + 1)]
    cut = [[0] * (n + 1) for _ in range(num_modules + 1)]
    best[0][0] = 0.0
    for k in range(1, num_modules + 1):
        for i in range(k * min_size, n - (num_modules - k) * min_size + 1):
            for s in range(i - min_size, (k - 1) * min_size - 1, -1):
                value = max(best[k - 1][s], prefix[i] - prefix[s])
                if value < best[k][i] - 1e-9:
                    best[k][i], cut[k][i] = value, s
    sizes, i = [], n
    for k in range(num_modules, 0, -1):
        s = cut[k][i]
        sizes.append(i - s)
        i = s
    return sizes[::-1]


def runs_from_sizes(sizes: list[int]) -> list[range]:
    """Consecutive index ranges of the given sizes, from 0: ``[2, 3]`` → ``[range(0, 2), range(2, 5)]``."""
    runs, start = [], 0
    for size in sizes:
        runs.append(range(start, start + size))
        start += size
    return runs


def compute_split(
    num_units: int,
    num_modules: int,
    balance: str = "blocks",
    profile: BlockProfile | None = None,
    batch_size: int = 128,
) -> list[range]:
    """Index ranges (into ``blocks``) of each local module's units; the head is added to the last by the caller.
    ``balance="memory"`` evens out the memory of a training step at ``batch_size`` images."""
    if balance not in BALANCE_MODES:
        raise ValueError(f"unknown balance {balance!r}; allowed: {', '.join(BALANCE_MODES)}")
    if not isinstance(num_modules, int) or not 1 <= num_modules <= num_units:
        raise ValueError(
            f"num_local_modules={num_modules!r} is impossible for this backbone: "
            f"allowed 1 to {num_units} (residual blocks + 1 for the stem)"
        )
    if balance == "blocks":
        base, extra = divmod(num_units, num_modules)
        sizes = [base + (1 if k < extra else 0) for k in range(num_modules)]
    else:
        if profile is None:
            raise ValueError("balance='memory' needs a block profile")
        if batch_size < 1:
            raise ValueError(f"balance_batch_size must be at least 1, got {batch_size}")
        sizes = split_sizes([float(b) for b in profile.step_bytes(batch_size)[:num_units]], num_modules)
    return runs_from_sizes(sizes)
