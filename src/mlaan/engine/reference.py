"""The objective: MLAAN's training loss written the way the research code computes it, the oracle the engine's step
(:mod:`mlaan.engine.step`) must equal.

Every cascade window is recomputed from a detached input, all the local losses are summed into one scalar, and
one backward gives every gradient. For module j (docs/METHOD.md, Zhang et al., AAAI 2025, §MLM):

- its independent aux loss ``w_ind · L_ind(j)`` on module j run alone from its detached input;
- under a cascade (MLM), its cascaded aux loss ``w_casc · L_casc(j)`` on modules j−window+1 … j run from the
  detached input of the first of them (module 0 when the window reaches past it);
- the last module's loss is the backbone head's cross-entropy, on both paths;
- without a cascade every local loss has weight 1.

Slow on purpose (each module runs up to ``window`` times, no graph is kept between losses) and meant for small
checks: class-index targets, no label smoothing, no autocast, no cascade barriers. ``tests/test_engine.py``
compares the engine's gradients with it for every method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .local_model import LocalModel


def reference_gradients(model: LocalModel, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of the MLAAN objective for the batch ``x`` (B, C, H, W), ``y`` class indices (B,): one
    tensor per ``model.parameters()`` entry, in that order (zeros where a parameter gets none). Clears the
    model's ``.grad`` first and leaves the result in them too; the engine's retained-graph schedule must give the
    same gradients."""
    mods, opts = model.local_modules, model.options
    cascade = model.spec.cascade
    w = opts.window if cascade else 1
    outs, h = [], x
    with torch.no_grad():
        for m in mods:
            h = m(h)
            outs.append(h)
    inputs = [x] + outs[:-1]
    total = 0.0
    k = len(mods)

    def run(first: int, last: int) -> torch.Tensor:
        """Modules first … last, from module first's detached input: a window recomputed."""
        z = inputs[first].detach()
        for i in range(first, last + 1):
            z = mods[i](z)
        return z

    for j in range(k):
        w_ind = opts.w_ind if cascade else 1.0
        if j == k - 1:
            total = total + w_ind * F.cross_entropy(run(j, j), y)
            if cascade and j >= 1:
                total = total + opts.w_casc * F.cross_entropy(run(max(0, j - w + 1), j), y)
            elif cascade:
                total = total + opts.w_casc * F.cross_entropy(run(j, j), y)
            continue
        total = total + w_ind * model.independent_heads[j](run(j, j), x, y)
        if str(j) in model.cascade_heads:
            total = total + opts.w_casc * model.cascade_heads[str(j)](run(max(0, j - w + 1), j), x, y)
    model.zero_grad(set_to_none=True)
    total.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
