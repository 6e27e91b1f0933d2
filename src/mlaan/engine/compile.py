"""``torch.compile`` of what a training step runs (the ``compile`` option, ``mlaan train --compile``).

``LocalModel.train_step`` runs its own schedule (one forward per local module, each aux net's forward, loss and
backward, the cascades' input-gradient backwards, one weight backward per module), so compiling the
``LocalModel`` as a whole would compile only its ``forward`` (inference), never a step. What is compiled instead
is each part a step calls: every local module (its view of the backbone's blocks) and every aux net (independent
and cascaded; its loss is compiled with it). Each is compiled in place with ``nn.Module.compile``: no wrapper
module, so ``state_dict`` keys stay as they are (no ``_orig_mod.``) and checkpoints of compiled and eager runs load
into each other. A copy (``copy.deepcopy``, pickling) is eager: ``nn.Module`` drops the compiled call when copied.
The backbone itself (``model(images)``, evaluation) stays eager.

MLM's cascades (``+mlm``, ``+mlaan``) backpropagate a module's retained graph twice (its input gradient with
``retain_graph=True``, later its weights). AOTAutograd by default *donates* saved buffers to the compiled backward,
which refuses a retained graph ("compiled with non-empty donated buffers ... retain_graph"). So, under a cascade,
``torch._functorch.config.donated_buffer`` is ``False`` exactly where it matters and nowhere else (never set
globally): while a local module's compiled call runs (when AOTAutograd decides what to donate) and around the
cascade's retained backward (:func:`retained_backward`, where AOTAutograd checks it). The aux nets, the weight
backwards and every module of a method without cascades keep PyTorch's default.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["compile_step_parts", "compiled_parts", "retained_backward"]

_MARK = "_mlaan_compiled"  # set on a module compiled here: the compile options it was compiled with


def _without_donated_buffers(fn: Callable) -> Callable:
    """``fn`` called with AOTAutograd's buffer donation off (a compiled graph whose backward runs twice)."""
    import torch._functorch.config as functorch_config

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with functorch_config.patch(donated_buffer=False):
            return fn(*args, **kwargs)

    return call


def _compile(module: nn.Module, retained: bool, options: dict[str, Any]) -> None:
    import torch

    compiled = torch.compile(module._call_impl, **options)  # what nn.Module.compile does, in place
    module._compiled_call_impl = _without_donated_buffers(compiled) if retained else compiled
    setattr(module, _MARK, dict(options))


def compile_step_parts(model: nn.Module, **options: Any) -> None:
    """Compile, in place, each part ``model.train_step`` calls: every local module and every aux net of the
    :class:`~mlaan.engine.local_model.LocalModel` ``model``. ``options`` go to ``torch.compile`` (``backend``,
    ``mode``, ``dynamic``, ...; default: inductor). A local module whose graph an MLM cascade keeps for a second
    backward is compiled without buffer donation (the module docstring says why). Compiling a part twice
    recompiles it with the new options."""
    cascade = model.spec.cascade and model.options.window >= 2
    model._compiled_cascade = cascade
    for module in model.local_modules:
        _compile(module, cascade, options)
    for head in [*model.independent_heads, *model.cascade_heads.values()]:
        _compile(head, False, options)


def compiled_parts(model: nn.Module) -> list[nn.Module]:
    """The parts of ``model`` that run compiled (compiled here and not copied since)."""
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None
            and hasattr(m, _MARK)]


def retained_backward(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context of a backward that keeps ``model``'s module graph for another (the MLM cascade's): buffer
    donation off when the model's modules were compiled here under a cascade, else nothing."""
    if not getattr(model, "_compiled_cascade", False):
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config

    return functorch_config.patch(donated_buffer=False)
