"""The phases of a training step, marked for a profiler.

A training step (:class:`mlaan.engine.step.LocalStep`, and ``after_optimizer_step``) wraps each phase in
``torch.profiler.record_function`` with one of the names below, so a ``torch.profiler.profile`` of a step shows
where its time goes by phase (``mlaan bench speed --breakdown`` reads them). Markers nest only as
:data:`STEP_PHASES` says: an aux net's forward lies inside its aux loss, and its trunk's forward inside that
forward; all others lie side by side. Without an active profiler a marker is not entered at all (:func:`mark`), so
it costs one check (~0.1 µs).
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

MODULE_FORWARD = "mlaan.module_forward"
AUX_LOSS = {"independent": "mlaan.aux_loss.independent", "cascaded": "mlaan.aux_loss.cascaded"}  # by aux path
AUX_FORWARD = "mlaan.aux_forward"
AUX_TRUNK_FORWARD = "mlaan.aux_trunk_forward"
OUTPUT_LOSS = "mlaan.output_loss"
CASCADE_BACKWARD = "mlaan.cascade_backward"
MODULE_BACKWARD = "mlaan.module_backward"
EMA_UPDATE = "mlaan.ema_update"

STEP_PHASES = {
    MODULE_FORWARD: "a local module's forward",
    AUX_LOSS["independent"]: "a module's independent aux net: forward, loss, backward into the module's output",
    AUX_LOSS["cascaded"]: "a module's cascaded (MLM) aux net: forward, loss, backward into the module's output",
    AUX_FORWARD: "an aux net's forward and loss (inside its aux loss)",
    AUX_TRUNK_FORWARD: "the LAM trunk or AugLocal blocks of an aux net, forward (inside its aux forward)",
    OUTPUT_LOSS: "the last module's cross-entropy and its backward into the module's output",
    CASCADE_BACKWARD: "a cascaded gradient carried back through retained module graphs (input gradients only)",
    MODULE_BACKWARD: "a module's weight backward, once all of its output gradient has arrived; frees its graph",
    EMA_UPDATE: "the EMA twins follow their blocks (after_optimizer_step)",
}


def mark(name: str) -> contextlib.AbstractContextManager:
    """``record_function(name)`` while a profiler records, else a no-op context (entering a ``record_function``
    costs several µs even when nothing records it; the check costs ~0.1 µs). Nothing inside a ``torch.compile``d
    part (``compile``: the profiler query would break its graph)."""
    if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
        return record_function(name)
    return contextlib.nullcontext()
