"""`mlaan bench memory`: peak training memory of each method × K, in bytes and as a share of BP's.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` around real training steps. On a CPU-only machine it
is an exact *accounting* of what a GPU's caching allocator would have to hold, which :class:`MemoryAccountant`
keeps while a real training step runs:

- every tensor storage alive is counted once, by storage (views, in-place results and a tensor saved by
  several autograd nodes share one storage and count once), for its full ``nbytes``;
- what is alive when the step starts is registered up front: parameters, buffers (BatchNorm statistics,
  EMA twins), gradients, optimizer state and the input batch;
- every storage an ATen op produces afterwards (activations, autograd-saved tensors, activation and weight
  gradients in backward, optimizer and EMA temporaries) is seen by a ``TorchDispatchMode`` when it is made and
  dropped when its last reference dies (a weak storage reference expires);
- the peak is the largest sum over the moments right after an op's outputs exist (the allocator's peak is
  reached at an allocation), so it includes the transient gradients of backward, not only the saved
  activations;
- at the peak the bytes are split into categories: static (parameters + buffers, gradients, optimizer state,
  inputs), tensors held by autograd for backward (tracked with ``torch.autograd.graph.saved_tensors_hooks``),
  and other live tensors (outputs and gradients in flight).

Not counted: kernel workspaces (cuDNN's, oneDNN's) and the allocator's rounding/fragmentation; both are small
next to activations at these sizes, and ``torch.cuda.max_memory_allocated`` does not count fragmentation either.
Each configuration runs in its own subprocess (fresh allocator, clean ``ru_maxrss``); the process's peak RSS is
reported beside the accounting as a cross-check (it also holds the Python/torch runtime and CPU kernel buffers).

The optimizer's momentum buffers exist from the second step of any training run, so they are there when the
measurement starts: on CUDA one warm-up step runs first; the accounting (whose figure is the same at every step)
creates them as zeros instead, which is exactly what SGD's first step does to them (buf = 0.9·0 + grad = grad).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..models import max_local_modules
from ..runtime import apply_threads, choose_threads, format_bytes, pick_device
from ..training.loop import optimizer_step
from . import common
from .common import RECOMPUTE_CHOICES, label_with_options, plan_variants

DEFAULT_CASES = {"resnet32": (1, 2, 4, 8, 16), "resnet110": (1, 4, 8, 16, 32, 55)}
STATIC_CATEGORIES = ("parameters+buffers", "gradients", "optimizer state", "inputs")


class _Saved:
    """What a saved-tensors pack hook returns: holds the tensor, and counts its storage as held by autograd
    until autograd drops it (when the node that saved it is freed)."""

    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor: torch.Tensor, owner: MemoryAccountant) -> None:
        self.tensor = tensor
        self.owner = owner
        self.key = owner._track(tensor)
        owner._saved[self.key] = owner._saved.get(self.key, 0) + 1

    def __del__(self) -> None:
        saved = self.owner._saved
        n = saved.get(self.key, 0) - 1
        if n <= 0:
            saved.pop(self.key, None)
        else:
            saved[self.key] = n


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: MemoryAccountant) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.owner._after_op(func, out)
        return out


class MemoryAccountant:
    """Counts the bytes of live tensor storages (each storage once) and keeps their peak.

    Usage::

        acc = MemoryAccountant(model)
        acc.register_static(model, optimizer, (images, targets))
        with acc:
            optimizer_step(...)
        acc.peak, acc.peak_breakdown
    """

    def __init__(self, model: torch.nn.Module | None = None, owner_depth: int = 4) -> None:
        self._live: dict[StorageWeakRef, int] = {}
        self._owner: dict[StorageWeakRef, str] = {}
        # names of the model's modules (up to ``owner_depth`` dots) to tell which one made each storage
        self._names = {} if model is None else {
            id(m): n for n, m in model.named_modules() if n and n.count(".") < owner_depth
        }
        self._stack: list[str] = []
        self.peak_owners: dict[str, int] = {}
        self._static: dict[StorageWeakRef, str] = {}
        self._saved: dict[StorageWeakRef, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_op = ""
        self._grad_params: list[torch.nn.Parameter] = []
        self._mode: _Dispatch | None = None
        self._hooks = None
        self._module_hooks: list = []

    # ------------------------------------------------------------------------------------ bookkeeping
    def _track(self, tensor: torch.Tensor) -> StorageWeakRef | None:
        """Count ``tensor``'s storage if it is new; returns its key (None for tensors without storage)."""
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
            return None
        storage = tensor.untyped_storage()
        key = StorageWeakRef(storage)
        if key not in self._live:
            nbytes = storage.nbytes()
            self._live[key] = nbytes
            self.current += nbytes
            self._owner[key] = self._stack[-1] if self._stack else "(outside any module: backward, optimizer, loss)"
        return key

    def _purge(self) -> None:
        dead = [k for k in self._live if k.expired()]
        for k in dead:
            self.current -= self._live.pop(k)
            self._static.pop(k, None)
            self._owner.pop(k, None)

    def register(self, tensors, category: str) -> None:
        """Count tensors alive before the measured region (``category`` names them in the breakdown)."""
        for t in tree_leaves(tensors):
            key = self._track(t)
            if key is not None:
                self._static.setdefault(key, category)
        self._update_peak("<start>")

    def register_static(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch) -> None:
        """Parameters, buffers, existing gradients, optimizer state and the batch."""
        self.register(list(model.parameters()) + list(model.buffers()), "parameters+buffers")
        self._grad_params = [p for p in model.parameters() if p.requires_grad]
        self.register([p.grad for p in self._grad_params if p.grad is not None], "gradients")
        if optimizer is not None:
            self.register([v for state in optimizer.state.values() for v in state.values()
                           if isinstance(v, torch.Tensor)], "optimizer state")
        self.register(batch, "inputs")

    def _after_op(self, func, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        if self.current > self.peak:
            self._purge()  # ``current`` only ever overestimates between purges, so no peak is missed
            self._update_peak(str(func))

    def _update_peak(self, op: str) -> None:
        if self.current <= self.peak:
            return
        self.peak = self.current
        self.peak_op = op
        grads = set()
        for p in self._grad_params:
            if p.grad is not None:
                grads.add(StorageWeakRef(p.grad.untyped_storage()))
        breakdown = dict.fromkeys((*STATIC_CATEGORIES, "autograd-saved activations", "other live tensors"), 0)
        owners: dict[str, int] = {}
        for key, nbytes in self._live.items():
            if key not in self._static:
                owner = self._owner.get(key, "?")
                owners[owner] = owners.get(owner, 0) + nbytes
            if key in self._static:
                category = self._static[key]
                if category == "parameters+buffers" or key not in grads:
                    breakdown[category] += nbytes
                    continue
            if key in grads:
                breakdown["gradients"] += nbytes
            elif key in self._saved:
                breakdown["autograd-saved activations"] += nbytes
            else:
                breakdown["other live tensors"] += nbytes
        self.peak_breakdown = breakdown
        self.peak_owners = dict(sorted(owners.items(), key=lambda kv: -kv[1]))

    def _pre_hook(self, module, args) -> None:
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append(name)

    def _post_hook(self, module, args, output) -> None:
        if id(module) in self._names and self._stack:
            self._stack.pop()

    # ---------------------------------------------------------------------------------- context manager
    def __enter__(self) -> MemoryAccountant:
        self._purge()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(t, self), lambda s: s.tensor)
        self._hooks.__enter__()
        self._mode = _Dispatch(self)
        self._mode.__enter__()
        if self._names:
            from torch.nn.modules import module as nn_module

            self._module_hooks = [
                nn_module.register_module_forward_pre_hook(self._pre_hook),
                nn_module.register_module_forward_hook(self._post_hook, always_call=True),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._mode is not None and self._hooks is not None
        self._mode.__exit__(*exc)
        self._hooks.__exit__(*exc)
        self._mode = self._hooks = None
        for h in self._module_hooks:
            h.remove()
        self._module_hooks = []
        self._stack.clear()


# ------------------------------------------------------------------------------------------ one case
def measure_case(
    arch: str,
    method: str,
    k: int,
    batch: int,
    device: str = "cpu",
    mode: str = "account",
    steps: int = 1,
    warmup: int = 0,
    seed: int = 0,
    in_channels: int = 3,
    image_size: int | None = None,
    options: dict | None = None,
) -> dict:
    """Peak training memory of one configuration (in this process); ``options`` go to the engine.

    ``mode``: ``account`` (the exact accounting, any device) or ``cuda`` (``torch.cuda.max_memory_allocated``).
    """
    dev = pick_device(device)
    if mode == "cuda" and dev.type != "cuda":
        raise ValueError("mode 'cuda' needs a CUDA device")
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        allocated_before = torch.cuda.memory_allocated(dev)
    rss_before = _rss_bytes()
    engine_options = {"balance_batch_size": batch, **(options or {})}  # balance="memory" evens out this batch
    model, optimizer = common.build(arch, method, k, in_channels=in_channels, image_size=image_size,
                                    device=dev, seed=seed, **engine_options)
    images, targets = common.synthetic_batch(model, batch, device=dev, seed=seed)
    num_params = sum(p.numel() for p in model.backbone.parameters())
    aux_params = sum(p.numel() for p in model.parameters()) - num_params
    # frozen: the EMA twins (no gradient, no optimiser state), which weigh less at the peak than trained ones
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    for _ in range(warmup):
        optimizer_step(model, optimizer, images, targets)
    if warmup == 0:
        _create_momentum_buffers(optimizer)
    result = {
        "arch": arch,
        "method": method,
        "k": common.model_k(method, k),
        "batch": batch,
        "device": str(dev),
        "mode": mode,
        "steps": steps,
        "warmup": warmup,
        "options": options or {},
        "backbone_params": num_params,
        "aux_params": aux_params,
        "trainable_params": trainable_params,
        "frozen_params": num_params + aux_params - trainable_params,
    }
    if image_size is not None:
        result["image_size"] = image_size
    if mode == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(steps):
            optimizer_step(model, optimizer, images, targets)
        torch.cuda.synchronize(dev)
        # what an earlier case in this process left allocated (normally 0) is not this case's
        result["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - allocated_before
        result["allocated_before_bytes"] = allocated_before
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
        result["device_name"] = torch.cuda.get_device_name(dev)
    else:
        acc = MemoryAccountant(model)
        acc.register_static(model, optimizer, (images, targets))
        with acc:
            for _ in range(steps):
                optimizer_step(model, optimizer, images, targets)
        result["peak_bytes"] = acc.peak
        result["breakdown"] = acc.peak_breakdown
        result["peak_op"] = acc.peak_op
        result["peak_components"] = components(acc.peak_owners)
    result["seconds"] = time.perf_counter() - t0
    result["rss_before_bytes"] = rss_before
    result["peak_rss_bytes"] = _peak_rss_bytes()
    return result


def components(owners: dict[str, int]) -> dict[str, int]:
    """Live bytes at the peak (static tensors excluded) by the model part that made them: a backbone block
    (``backbone.blocks.3``), an aux net's LAM/AugLocal trunk, its EMA twin or its head, or no module at all
    (tensors made by backward, the loss or the optimizer)."""
    out: dict[str, int] = {}
    for name, nbytes in owners.items():
        parts = name.split(".")
        if parts[0] == "backbone":
            key = ".".join(parts[:3])
        elif parts[0] in ("independent_heads", "cascade_heads") and len(parts) > 2:
            key = ".".join(parts[:4] if len(parts) > 3 and parts[3] == "twin" else parts[:3])
        else:
            key = ".".join(parts[:2])
        out[key] = out.get(key, 0) + nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@torch.no_grad()
def _create_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """SGD's momentum buffers as zeros: SGD's first step then gives them the same values as when it creates them."""
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        for p in group["params"]:
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure_in_subprocess(case: dict, timeout: float | None = None) -> dict:
    """``measure_case(**case)`` in a fresh interpreter (clean allocator and peak RSS)."""
    code = (
        "import json, sys; from mlaan.bench.memory import measure_case; "
        "print('RESULT ' + json.dumps(measure_case(**json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many threads as this process
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {**case, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


# --------------------------------------------------------------------------------------------- sweep
def plan_cases(archs: dict[str, list[int]], methods: list[str]) -> list[tuple[str, str, int]]:
    """(arch, method, K): an end-to-end method (BP) once at K=1, first; every other method at every K ≥ 2 (at K=1
    they are BP)."""
    plan = []
    for arch, ks in archs.items():
        plan.extend((arch, m, 1) for m in methods if common.end_to_end(m))
        for m in methods:
            if not common.end_to_end(m):
                plan.extend((arch, m, k) for k in ks if k >= 2)
    return plan


def sweep(
    archs: dict[str, list[int]],
    methods: list[str],
    batch: int,
    device: str,
    mode: str,
    steps: int,
    warmup: int,
    scale_from: list[int] | None = None,
    isolate: bool = True,
    on_result: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
    options: dict | None = None,
    recompute: str = "off",
    image_size: int | None = None,
) -> list[dict]:
    """Measure every case (``recompute``: see :func:`~mlaan.bench.common.plan_variants`); with
    ``scale_from=[b1, b2]`` measure at those batches and extrapolate to ``batch``
    linearly (peak = a + b·batch, from the two points), recording both points."""
    results = []
    for arch, method, k, case_options in plan_variants(plan_cases(archs, methods), options or {}, recompute):
        batches = scale_from or [batch]
        points = []
        for b in batches:
            case = {"arch": arch, "method": method, "k": k, "batch": b, "device": device, "mode": mode,
                    "steps": steps, "warmup": warmup, "options": case_options}
            if image_size is not None:
                case["image_size"] = image_size
            r = measure_in_subprocess(case) if isolate else measure_case(**case)
            points.append(r)
            if "error" in r:
                break
        if "error" in points[-1]:
            result = points[-1]
            log(f"  {arch} {label_with_options(result)} K={k}: FAILED {result['error']}")
        elif scale_from:
            (p1, p2) = points
            slope = (p2["peak_bytes"] - p1["peak_bytes"]) / (p2["batch"] - p1["batch"])
            result = {**p2, "batch": batch, "peak_bytes": int(p2["peak_bytes"] + slope * (batch - p2["batch"])),
                      "extrapolated_from": [{"batch": p["batch"], "peak_bytes": p["peak_bytes"]} for p in points],
                      "peak_rss_bytes": None, "breakdown": _scale_breakdown(p1, p2, batch)}
            log(f"  {arch} {label_with_options(result)} K={k}: {format_bytes(result['peak_bytes'])} (extrapolated)")
        else:
            result = points[0]
            log(f"  {arch} {label_with_options(result)} K={k}: {format_bytes(result['peak_bytes'])} "
                f"(peak RSS {format_bytes(result['peak_rss_bytes'])}, {result['seconds']:.0f}s)")
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _scale_breakdown(p1: dict, p2: dict, batch: int) -> dict | None:
    b1, b2 = p1.get("breakdown"), p2.get("breakdown")
    if not b1 or not b2:
        return None
    t = (batch - p2["batch"]) / (p2["batch"] - p1["batch"])
    return {k: int(b2[k] + (b2[k] - b1.get(k, 0)) * t) for k in b2}


def add_percentages(results: list[dict]) -> None:
    """``pct_of_bp``: each peak as a share of plain BP's (the first end-to-end method's without activation
    checkpointing) on the same architecture and batch."""
    bp: dict[tuple, int] = {}
    for r in results:
        if common.is_reference(r) and "error" not in r:
            bp.setdefault((r["arch"], r["batch"]), r["peak_bytes"])
    for r in results:
        base = bp.get((r["arch"], r["batch"]))
        r["pct_of_bp"] = 100.0 * r["peak_bytes"] / base if base and "error" not in r else None


# -------------------------------------------------------------------------------------------- output
def render(results: list[dict], options: dict | None = None) -> str:
    """The table of ``results``, each row's method named with the engine options it was built with
    (:func:`mlaan.bench.common.label_with_options`: ``dgl+mlaan lam_trunk=twins``); under a line naming the
    ``--option`` values ``options`` when there are some (a method that does not read one is built without it)."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["arch"], label_with_options(r), r["k"], r["batch"], "error", "—", "—", "—",
                         r["error"][:60]])
            continue
        bd = r.get("breakdown") or {}
        static = sum(bd.get(c, 0) for c in STATIC_CATEGORIES)
        rows.append(
            [
                r["arch"],
                label_with_options(r),
                r["k"],
                r["batch"],
                f"{r['peak_bytes']:,}",
                format_bytes(r["peak_bytes"]),
                "—" if r.get("pct_of_bp") is None else f"{r['pct_of_bp']:.1f}%",
                format_bytes(r.get("peak_rss_bytes")),
                _at_peak(bd, static),
            ]
        )
    table = common.format_table(
        ["arch", "method", "K", "batch", "peak bytes", "peak", "% of BP", "peak RSS (process)", "at the peak"], rows
    )
    if not options:
        return table
    return (f"Engine options (--option): {common.options_text(options)}; each method is built with those it reads, "
            f"named after it.\n\n{table}")


def _at_peak(bd: dict, static: int) -> str:
    if not bd:
        return "—"
    saved = format_bytes(bd.get("autograd-saved activations"))
    other = format_bytes(bd.get("other live tensors"))
    return f"static {format_bytes(static)}, saved {saved}, other {other}"


def plot(results: list[dict], path: Path) -> None:
    plt = common.pyplot()
    archs = list(dict.fromkeys(r["arch"] for r in results))
    fig, axes = plt.subplots(len(archs), 1, figsize=(11, 4.6 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs):
        rs = [r for r in results if r["arch"] == arch and "error" not in r]
        bp = next((r for r in rs if common.is_reference(r)), None)
        checkpointed_bp = [r for r in rs if common.end_to_end(r["method"]) and not common.is_reference(r)]
        methods = list(dict.fromkeys(label_with_options(r) for r in rs if not common.end_to_end(r["method"])))
        ks = sorted({r["k"] for r in rs if not common.end_to_end(r["method"])})
        width = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            xs, ys = [], []
            for xi, k in enumerate(ks):
                r = next((r for r in rs if label_with_options(r) == m and r["k"] == k), None)
                if r is not None:
                    xs.append(xi - 0.4 + width * (i + 0.5))
                    ys.append(r["peak_bytes"] / 2**30)
            recomputed = m.endswith(" +ckpt")
            method = next(r["method"] for r in rs if label_with_options(r) == m)
            ax.bar(xs, ys, width=width, color=common.method_color(method, i), label=m,
                   hatch="//" if recomputed else None, edgecolor="white" if recomputed else None)
        if bp is not None:
            gib = bp["peak_bytes"] / 2**30
            ax.axhline(gib, color=common.method_color(bp["method"]), linestyle="--", linewidth=1.2,
                       label=f"{label_with_options(bp)} (K=1): {gib:.2f} GiB")
            ax.secondary_yaxis("right", functions=(lambda y, g=gib: 100 * y / g, lambda p, g=gib: p * g / 100)
                               ).set_ylabel("% of BP's peak")
        for style, r in zip((":", "-.", (0, (5, 1)), (0, (1, 3))) * 4, checkpointed_bp):  # BP's own checkpointing
            ax.axhline(r["peak_bytes"] / 2**30, color=common.method_color(r["method"]), linestyle=style,
                       linewidth=1.2, label=f"{label_with_options(r)}: {r['peak_bytes'] / 2**30:.2f} GiB")
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels([f"K={k}" for k in ks])
        ax.set_xlabel("local modules K")
        ax.set_ylabel("peak training memory (GiB)")
        batch = rs[0]["batch"] if rs else "?"
        how = "torch.cuda.max_memory_allocated" if rs and rs[0]["mode"] == "cuda" else "exact accounting"
        ax.set_title(f"{arch}, batch {batch} ({how})")
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: bars stay clear
        ax.grid(axis="y", alpha=0.3)
    common.save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archs", default="resnet32,resnet110", help="comma-separated architectures")
    p.add_argument("--ks", default=None,
                   help="K values for every arch, e.g. 1,4,16 (default: resnet32 1,2,4,8,16; resnet110 "
                        "1,4,8,16,32,55; other archs 1,2,4,max)")
    p.add_argument("--methods", default=",".join(common.DEFAULT_METHODS), help="comma-separated methods")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="input side of every arch (default: each arch's own, e.g. 224 for timm:vit_small_patch16_224)")
    p.add_argument("--batch", type=int, default=1024, help="batch size (the paper's CIFAR batch: 1024)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, here and in each case's process (default: the idle cores, as `mlaan "
                        "train` chooses them); the accounted bytes do not depend on it, the time to measure does")
    p.add_argument("--mode", default="auto", choices=("auto", "cuda", "account"),
                   help="cuda: torch.cuda.max_memory_allocated; account: exact accounting (CPU or CUDA); "
                        "auto: cuda on a CUDA device, else account")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: 3 on CUDA, 1 accounted)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps before measuring (default: 1 on CUDA; 0 accounted, momentum buffers made as zeros)")
    p.add_argument("--scale-from", default=None, metavar="B1,B2",
                   help="measure at batches B1 < B2 and extrapolate linearly to --batch (say so when you do)")
    p.add_argument("--no-isolate", action="store_true", help="run every case in this process (no peak RSS)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option for every local method, e.g. lam_depth=2 (repeatable)")
    p.add_argument("--grad-checkpointing", default="both", choices=RECOMPUTE_CHOICES,
                   help="methods with something to recompute (LAM, MLM, AugLocal): measure them without "
                        "grad_checkpointing, with it (+ckpt rows), or both")
    p.add_argument("--output-dir", default=None, help="(default: runs/bench-memory)")


def parse_options(items: list[str]) -> dict:
    """``["lam_depth=2", "aux_head=linear"]`` → {"lam_depth": 2, "aux_head": "linear"} (checked by the engine)."""
    import yaml

    from ..engine.options import make_options, spelled

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r} must be KEY=VALUE, e.g. lam_depth=2")
        options[key.strip()] = yaml.safe_load(value)
    make_options(**options)  # ValueError naming the known options
    return spelled(options)  # aux_head=MLP as the option spells it, so that aux_width=64 is read with it


def _arch_ks(args: argparse.Namespace) -> dict[str, list[int]]:
    archs = {}
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        arch = common.check_arch(arch)
        limit = max_local_modules(arch)
        if args.ks is not None:
            ks = common.parse_ints(args.ks, "--ks")
        else:
            ks = list(DEFAULT_CASES.get(arch, (1, 2, 4, limit)))
        bad = [k for k in ks if k > limit]
        if bad:
            raise ValueError(f"--ks: K={bad[0]} is too large for {arch} (allowed 1 to {limit})")
        archs[arch] = ks
    if not archs:
        raise ValueError("--archs: no architecture given")
    return archs


def run(args: argparse.Namespace) -> int:
    archs = _arch_ks(args)
    methods = common.parse_methods(args.methods)
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    apply_threads(choose_threads(args.threads))  # each case's own process takes this process's count
    device = pick_device(args.device)
    mode = args.mode if args.mode != "auto" else ("cuda" if device.type == "cuda" else "account")
    if mode == "cuda" and device.type != "cuda":
        raise ValueError("--mode cuda needs a CUDA device (this machine has none); use --mode account")
    steps = args.steps if args.steps is not None else (3 if mode == "cuda" else 1)
    warmup = args.warmup if args.warmup is not None else (1 if mode == "cuda" else 0)
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be ≥ 1 and --warmup ≥ 0, got {steps} and {warmup}")
    scale = None
    if args.scale_from:
        scale = common.parse_ints(args.scale_from, "--scale-from")
        if len(scale) != 2 or not scale[0] < scale[1]:
            raise ValueError(f"--scale-from takes two increasing batch sizes B1,B2, got {args.scale_from!r}")
    options = parse_options(args.option)
    common.check_options(methods, options, cases=[(a, k) for a, ks in archs.items() for k in ks if k >= 2],
                         set_by={"grad_checkpointing": "--grad-checkpointing"})
    out = common.output_dir(args.output_dir, "memory")
    machine = common.machine_description() + f"; code {common.code_version()}"
    print(f"mlaan bench memory ({mode}) on {machine}: batch {args.batch}"
          + (f", extrapolated from batches {scale[0]} and {scale[1]}" if scale else "")
          + (f", options {common.options_text(options)} (for the methods that read them)" if options else ""),
          flush=True)
    done: list[dict] = []

    def save(result: dict) -> None:
        done.append(result)
        add_percentages(done)
        common.write_json(out / "memory.json", {"machine": machine, "mode": mode, "options": options,
                                                "results": done})

    results = sweep(archs, methods, args.batch, str(device), mode, steps, warmup, scale,
                    isolate=not args.no_isolate, on_result=save, log=lambda s: print(s, flush=True), options=options,
                    recompute=args.grad_checkpointing, image_size=getattr(args, "image_size", None))
    add_percentages(results)
    common.write_outputs(out, "memory", render(results, options),
                         {"machine": machine, "mode": mode, "options": options, "results": results},
                         lambda path: plot(results, path))
    return 0
