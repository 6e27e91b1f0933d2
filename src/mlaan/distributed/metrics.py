"""Metrics of every rank combined into one: means, except counts, which are summed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from .context import DistContext

_SUM_NAMES = {"n", "count", "samples", "correct", "total", "seen", "images"}
_SUM_SUFFIXES = ("_count", "_correct", "_total", "_sum", "_samples", "_seen", "_images")


def is_count_key(key: str) -> bool:
    """Keys :func:`reduce_metrics` sums instead of averaging: ``n``, ``count``, ``samples``, ``correct``,
    ``total``, ``seen``, ``images``, ``num_*`` and ``*_count``/``_correct``/``_total``/``_sum``/``_samples``/
    ``_seen``/``_images``."""
    return key in _SUM_NAMES or key.startswith("num_") or key.endswith(_SUM_SUFFIXES)


def reduce_metrics(metrics: dict, ctx: DistContext, sum_keys: Iterable[str] = ()) -> dict:
    """Combine per-rank metrics: the **mean** over ranks, except counts (see :func:`is_count_key`, plus
    ``sum_keys``), which are **summed**. Numbers and lists/tuples of numbers (e.g. ``module_losses``,
    element-wise) are reduced; anything else is passed through from this rank. Every rank must call it with
    the same keys. Returns a new dict; a single process gets a copy of its own metrics.

    Means are unweighted, right when every rank has the same batch size (DistributedSampler). For exact
    accuracies over an uneven split, reduce counts (``correct``, ``total``) and divide afterwards.
    """
    out = dict(metrics)
    if not ctx.synchronising:
        return out
    summed = set(sum_keys)
    keys = sorted(k for k, v in metrics.items() if _numeric(v))
    values: list[float] = []
    for k in keys:
        v = metrics[k]
        values.extend(float(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    if not keys:
        return out
    lengths = torch.tensor([len(values)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(lengths, op=dist.ReduceOp.MAX)
    if int(lengths.item()) != len(values):
        raise ValueError("reduce_metrics: ranks passed metrics of different shapes; every rank needs the same keys")
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    reduced = tensor.cpu().tolist()
    i = 0
    for k in keys:
        v = metrics[k]
        n = len(v) if isinstance(v, (list, tuple)) else 1
        part = reduced[i : i + n]
        i += n
        if not (k in summed or is_count_key(k)):
            part = [x / ctx.world_size for x in part]
        if isinstance(v, (list, tuple)):
            out[k] = type(v)(part)
        elif isinstance(v, int) and not isinstance(v, bool) and (k in summed or is_count_key(k)):
            out[k] = int(round(part[0]))
        else:
            out[k] = part[0]
    return out


def _numeric(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    if isinstance(v, torch.Tensor):
        return False
    return isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

