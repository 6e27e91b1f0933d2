"""Any model cut by its own forward: the traced graph split at single-tensor cut points.

The algorithm follows how PyTorch splits a model into pipeline stages (``torch.distributed.pipelining``, formerly
PiPPy: the forward traced into a graph, split at split points into consecutive stage submodules that hold the
model's own parameters, as ``torch.fx.passes.split_module`` does; https://pytorch.org/docs/stable/fx.html and
https://pytorch.org/docs/stable/distributed.pipelining.html), with the split points chosen here, not by hand:

1. **Trace.** The model's ``forward`` (the user's own, overrides included) is traced with ``torch.fx`` symbolic
   tracing. ``torch.nn``'s layers are leaves (``call_module`` nodes); a submodule whose forward does not trace
   (Python control flow on a tensor, ``isinstance`` on its input) is made a leaf and the trace goes on, like
   ``torchvision.models.feature_extraction``'s leaf modules. The model is traced in ``train()`` and in ``eval()``
   mode: a submodule whose graph differs between them (``F.dropout(training=self.training)``) is made a leaf too,
   with every instance of its class, so each mode runs its own code. Data-dependent control flow in the top-level
   forward does not trace: refused.
2. **Cut points.** A point between two nodes (in the graph's order) is a *single-tensor cut point* when exactly one
   value computed from the input before it is used after it, and that value is a tensor (shapes from one forward
   of a one-image batch, ``torch.fx.passes.shape_prop``). Parameters, buffers and anything not computed from the
   input (``get_attr`` nodes) are re-read by the part that uses them. A skip connection spanning a point rules it
   out, so residual blocks are never cut inside.
3. **Choice.** Where a family adapter knows the model's class (a subclass with its own forward), its blocks are
   the preference: a point is taken where the graph passes from one of its blocks to another. Otherwise the
   *natural* points are taken, those between calls of the top-level forward's or an ``nn.Sequential``'s children
   (between residual blocks, between stages, around the stem and the head), and the pieces between them are
   grouped as :func:`mlaan.models.adapters.group_children` groups layers: a block starts at a piece with
   weights that is not only a normalisation; activations and norms ride with the block before, pooling and
   reshaping with the block after (so the head is pooling + classifier). Too few natural points (< 2 blocks):
   every single-tensor cut point is a candidate. None at all: refused in one line.
4. **Split.** Each block is a ``torch.fx.GraphModule`` of its nodes built on the user's model: it holds the
   model's own submodules and parameters (never copies), so training the blocks trains the user's object, and
   :meth:`Backbone.export_state_dict` gives the model's own ``state_dict``. The composed blocks are checked to
   reproduce the model's output on the probe batch (eval mode) before anything trains.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .cut import Cut

__all__ = ["GraphCutError", "graph_cut", "unwrap_compiled"]

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_POOLS = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AvgPoolNd,
          nn.modules.pooling._MaxPoolNd, nn.Flatten)
_POOL_FUNCTIONS = {torch.flatten, torch.mean, torch.amax, nn.functional.adaptive_avg_pool2d,
                   nn.functional.adaptive_max_pool2d, nn.functional.avg_pool2d, nn.functional.max_pool2d}
_POOL_METHODS = {"mean", "flatten", "view", "reshape", "amax", "sum"}
_MAX_RETRACES = 64


class GraphCutError(ValueError):
    """A model that has no usable cut (one line: why, and what to pass instead)."""


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, else ``model`` itself (without
    importing ``torch._dynamo``)."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


# --------------------------------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """torch.fx's tracer that records each node's enclosing module calls (``meta["mlaan_stack"]``, outermost
    first) and turns a submodule whose forward does not trace into a leaf (``leaves``, added to)."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["mlaan_stack"] = tuple(self.stack)
        return node

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            if self.is_leaf_module(m, name):
                return super().call_module(m, forward, args, kwargs)
            last = next(reversed(self.graph.nodes))  # the graph's last node before this call
            module_stack, num_calls = OrderedDict(self.module_stack), dict(self.num_calls)
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:  # its forward does not trace: it runs as one node
                while (node := next(reversed(self.graph.nodes))) is not last:
                    self.graph.erase_node(node)
                self.module_stack, self.num_calls = module_stack, num_calls
                self.leaves.add(name)
                return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()


def _concrete_args(model: nn.Module) -> dict[str, object]:
    """The forward's parameters after the first, at their defaults (one image batch in, as the engine calls it);
    GraphCutError for one without a default."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete: dict[str, object] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise GraphCutError(f"its forward takes {p.name!r} besides the images")
        concrete[p.name] = p.default
    return concrete


def _trace_once(model: nn.Module, leaves: set[str], training: bool) -> fx.Graph:
    model.train(training)
    tracer = _Tracer(leaves)
    return tracer.trace(model, concrete_args=_concrete_args(model) or None)


def _signature(graph: fx.Graph) -> list[tuple]:
    """Each node's (op, target, arguments), nodes named by position: two graphs with the same signature compute
    the same."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    key = lambda a: ("node", index[a]) if isinstance(a, fx.Node) else a  # noqa: E731
    return [(n.op, str(n.target), repr(fx.node.map_aggregate(n.args, key)), repr(fx.node.map_aggregate(n.kwargs, key)))
            for n in graph.nodes]


def _scrub_proxies(model: nn.Module) -> None:
    """Remove fx Proxies a traced forward left in its modules' attributes or dict caches (timm LeViT's attention
    bias cache in eval mode)."""
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, fx.Proxy):
                delattr(m, name)
            elif isinstance(value, dict) and not name.startswith("_"):
                for k in [k for k, v in value.items() if isinstance(v, fx.Proxy)]:
                    del value[k]


def _container_returned(graph: fx.Graph) -> str | None:
    """The name of the container type the graph returns (a tuple, a namedtuple it builds, a dict), None when it
    returns one value."""
    returned = list(graph.nodes)[-1].args[0]
    if not isinstance(returned, fx.Node):  # fx's immutable_dict / immutable_list: the user wrote a dict / list
        return type(returned).__name__.removeprefix("immutable_")
    target = returned.target
    if returned.op == "call_function" and isinstance(target, type) and issubclass(target, (tuple, list, dict)):
        return target.__name__
    return None


def trace(model: nn.Module) -> tuple[fx.Graph, set[str]]:
    """The forward's graph (traced in train mode) and the submodules made leaves. Retraced with one more leaf
    until train and eval mode give the same graph. GraphCutError when the top-level forward does not trace or
    differs between the modes outside any submodule."""
    modes = {m: m.training for m in model.modules()}
    leaves: set[str] = set()
    try:
        for _ in range(_MAX_RETRACES):
            try:
                train = _trace_once(model, leaves, True)
                evaluate = _trace_once(model, leaves, False)
            except GraphCutError:
                raise
            except Exception as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise GraphCutError(f"its forward does not trace with torch.fx ({reason[:200]})") from None
            a, b = _signature(train), _signature(evaluate)
            if a == b:
                return train, leaves
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)) - 1)
            sa = list(train.nodes)[i].meta.get("mlaan_stack", ())
            sb = list(evaluate.nodes)[i].meta.get("mlaan_stack", ())
            common = [p for p, q in zip(sa, sb) if p == q]
            culprit = common[-1] if common else (sa or sb or (None,))[0]
            returned = _container_returned(train)
            if returned:
                raise GraphCutError(f"in train() its forward returns a {returned} (auxiliary outputs: build the "
                                    f"model without them, e.g. aux_logits=False)")
            if culprit is None or culprit in leaves:
                raise GraphCutError("its forward computes differently in train() and eval() "
                                    "outside its submodules")
            leaves.add(culprit)
            kind = type(model.get_submodule(culprit))
            if not _is_container(model.get_submodule(culprit)):  # its class's other instances branch alike
                leaves.update(path for path, m in model.named_modules() if type(m) is kind)
        raise GraphCutError(f"its train() and eval() graphs still differ after "
                            f"{_MAX_RETRACES} retraces")
    finally:
        for m, mode in modes.items():
            m.training = mode
        _scrub_proxies(model)


# ------------------------------------------------------------------------------------------------ cut points
def _depends_on_input(graph: fx.Graph) -> dict[fx.Node, bool]:
    dep: dict[fx.Node, bool] = {}
    images = next(n for n in graph.nodes if n.op == "placeholder")  # the others: arguments fixed at defaults
    for n in graph.nodes:
        dep[n] = n is images or any(dep[a] for a in n.all_input_nodes)
    return dep


def _parameter_spans(root: nn.Module, nodes: list[fx.Node]) -> list[tuple[int, int]]:
    """(first, last) positions of the nodes reading each parameter used more than once (a module called at two
    depths, a weight read twice: tied weights): a cut inside would put it in two blocks."""
    pos = {n: i for i, n in enumerate(nodes)}
    uses: dict[int, set[int]] = {}
    for i, n in enumerate(nodes):
        if n.op == "call_module" and (m := _module(root, n.target)) is not None:
            held, at = list(m.parameters()), [i]
        elif n.op == "get_attr":
            obj = _attr(root, n.target)
            held = [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters()) if isinstance(
                obj, nn.Module) else []
            at = [pos[u] for u in n.users] or [i]  # read where it is used (each block re-reads it)
        else:
            continue
        for p in held:
            uses.setdefault(id(p), set()).update(at)
    return [(min(at), max(at)) for at in uses.values() if len(at) > 1]


def cut_points(graph: fx.Graph, root: nn.Module | None = None) -> list[int]:
    """Positions i (in node order) after which exactly one value computed from the input, a tensor other than
    the input itself, is used later: the single-tensor cut points (one per value: the last such position). With
    ``root`` (the traced model), no point lies between two uses of one parameter (tied weights)."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    dep = _depends_on_input(graph)
    count, index = [0] * (len(nodes) + 1), [0] * (len(nodes) + 1)  # live values and the sum of their positions
    for n in nodes:
        if dep[n] and n.users:
            last = max(pos[u] for u in n.users)
            count[pos[n]] += 1
            count[last] -= 1
            index[pos[n]] += pos[n]
            index[last] -= pos[n]
    points: dict[fx.Node, int] = {}
    result = nodes[-1].args[0] if nodes[-1].args else None  # a point before the output alone cuts nothing
    live = at = 0
    for i in range(len(nodes) - 1):
        live += count[i]
        at += index[i]
        if live == 1:
            value = nodes[at]
            if value.op != "placeholder" and value is not result and \
                    isinstance(value.meta.get("tensor_meta"), TensorMetadata):
                points[value] = i
    spans = _parameter_spans(root, nodes) if root is not None else []
    return sorted(p for p in points.values() if not any(a <= p < b for a, b in spans))


# ------------------------------------------------------------------------------------------------- choosing
def _module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_container(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _stack(n: fx.Node) -> tuple[str, ...]:
    return n.meta.get("mlaan_stack", ())


def _natural(root: nn.Module, nodes: list[fx.Node], dep: dict[fx.Node, bool], i: int) -> bool:
    """The point after position i lies between two calls of the top-level forward's or a Sequential's children."""
    before = next((n for n in reversed(nodes[:i + 1]) if dep[n]), None)
    after = next((n for n in nodes[i + 1:] if dep[n] and n.op != "output"), None)
    if before is None or after is None:
        return True
    common = [p for p, q in zip(_stack(before), _stack(after)) if p == q]
    return not common or _is_container(_module(root, common[-1]))


def _preferred(root: nn.Module, nodes: list[fx.Node], dep: dict[fx.Node, bool], points: list[int],
               blocks: list[nn.Module]) -> list[int]:
    """The points where the graph passes from one of an adapter's ``blocks`` to another."""
    owner: dict[int, int] = {}
    for k, block in enumerate(blocks):
        for m in block.modules():
            owner.setdefault(id(m), k)

    def block_of(n: fx.Node) -> int | None:
        paths = ((n.target,) if n.op == "call_module" else ()) + tuple(reversed(_stack(n)))
        for path in paths:
            m = _module(root, path)
            if m is not None and id(m) in owner:
                return owner[id(m)]
        return None

    owned = [(i, block_of(n)) for i, n in enumerate(nodes) if dep[n]]
    owned = [(i, k) for i, k in owned if k is not None]
    chosen = []
    for p in points:
        a = next((k for i, k in reversed(owned) if i <= p), None)
        b = next((k for i, k in owned if i > p), None)
        if a is not None and b is not None and a != b:
            chosen.append(p)
    return chosen


def _kind(root: nn.Module, piece: list[fx.Node]) -> str:
    """"weights" (a layer with weights, not only norms), "norm", "pool" (pooling / reshaping) or "other"."""
    weights = norm = pool = False
    for n in piece:
        if n.op == "call_module":
            m = _module(root, n.target)
            if any(True for _ in m.parameters()):
                norm |= isinstance(m, NORMS)
                weights |= not isinstance(m, NORMS)
            pool |= isinstance(m, _POOLS)
        elif n.op == "get_attr":  # a weight read by a later piece is copied there (see _split): not this one's
            weights |= isinstance(_attr(root, n.target), nn.Parameter) and any(u in piece for u in n.users)
        elif n.op == "call_function":
            pool |= n.target in _POOL_FUNCTIONS
        elif n.op == "call_method":
            pool |= n.target in _POOL_METHODS
    return "weights" if weights else "norm" if norm else "pool" if pool else "other"


def _group(root: nn.Module, nodes: list[fx.Node], points: list[int]) -> list[int]:
    """The points that stay after grouping the pieces between ``points`` into blocks (see the module's doc)."""
    bounds = [-1, *points, len(nodes) - 1]
    pieces = [(bounds[k], nodes[bounds[k] + 1: bounds[k + 1] + 1]) for k in range(len(bounds) - 1)]
    starts: list[int] = []  # the point before each block (-1: the first)
    pending: int | None = None  # the start of pieces waiting for the next block with weights
    for start, piece in pieces:
        kind = _kind(root, piece)
        if kind == "weights":
            starts.append(start if pending is None else pending)
            pending = None
        elif pending is None and (kind == "pool" or not starts):
            pending = start
    if not starts:
        return []
    return starts[1:]


def _attr(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------- split
def _split(root: nn.Module, graph: fx.Graph, points: list[int]) -> list[fx.GraphModule]:
    """One GraphModule per range of nodes between consecutive ``points``, on ``root`` (its own submodules)."""
    nodes = list(graph.nodes)
    dep = _depends_on_input(graph)
    pos = {n: i for i, n in enumerate(nodes)}
    output = nodes[-1]
    bounds = [0, *points, len(nodes) - 2]
    stages = []
    carried = next(n for n in nodes if n.op == "placeholder")
    for k in range(len(bounds) - 1):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {carried: g.placeholder("x")}

        def value(a: fx.Node, g=g, env=env) -> fx.Node:
            if a not in env:  # not computed from the input (a parameter, a constant): read here
                for b in a.all_input_nodes:
                    value(b)
                env[a] = g.node_copy(a, env.__getitem__)
            return env[a]

        for n in nodes[bounds[k] + 1: bounds[k + 1] + 1]:
            if n.op in ("placeholder", "output") or not dep[n]:
                continue  # a value not computed from the input is copied where it is used
            for a in n.all_input_nodes:
                value(a)
            env[n] = g.node_copy(n, env.__getitem__)
        result = output.args[0] if k == len(bounds) - 2 else _single_live(nodes, pos, dep, bounds[k + 1])
        g.output(value(result))
        g.lint()
        stages.append(fx.GraphModule(root, g, class_name="GraphBlock"))
        carried = result
    return stages


def _single_live(nodes: list[fx.Node], pos: dict, dep: dict, i: int) -> fx.Node:
    live = [n for n in nodes[:i + 1] if dep[n] and n.users and max(pos[u] for u in n.users) > i]
    assert len(live) == 1, live
    return live[0]


class _Unused(nn.Module):
    """The model's parameters and buffers its forward never reads, kept on the head block so that the backbone
    holds (and exports) every tensor of the model's state_dict."""


# ------------------------------------------------------------------------------------------------------ cut
def _in_channels(root: nn.Module, graph: fx.Graph) -> int:
    for n in graph.nodes:
        if n.op == "call_module":
            m = _module(root, n.target)
            if isinstance(m, nn.modules.conv._ConvNd):
                return m.in_channels
    return 3


def graph_cut(model: nn.Module, image_size: tuple[int, int], in_channels: int | None = None,
              prefer: list[nn.Module] | None = None) -> Cut:
    """``model`` cut by its traced forward into blocks sharing its parameters (the module's doc says how).
    ``image_size`` (H, W) and ``in_channels`` (None: the first convolution's) make the one-image probe batch;
    ``prefer``: a family adapter's blocks of this model, whose boundaries are taken where the graph has them.
    GraphCutError (a ValueError), one line, when the model has no usable cut."""
    attrs = set(vars(model))
    try:
        return _graph_cut(model, image_size, in_channels, prefer)
    finally:  # fx's tensor constants (_tensor_constant0) were copied onto the blocks
        for extra in set(vars(model)) - attrs:
            if extra.startswith("_tensor_constant"):
                delattr(model, extra)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _run(model: nn.Module, run: Callable[[], object], grad: bool = False) -> object:
    """``run()`` with ``model`` in eval mode and no grad (``grad``: with), its modules' modes restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.set_grad_enabled(grad):
            return run()
    finally:
        for m, mode in modes.items():
            m.training = mode


def _graph_cut(model: nn.Module, image_size: tuple[int, int], in_channels: int | None,
               prefer: list[nn.Module] | None) -> Cut:
    graph, _ = trace(model)
    returned = _container_returned(graph)
    if returned:
        raise GraphCutError(f"its forward returns a {returned}, not one tensor of class scores")
    whole = fx.GraphModule(model, graph)
    channels = in_channels if in_channels is not None else _in_channels(model, graph)
    like = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    device, dtype = (like.device, like.dtype) if like is not None else (torch.device("cpu"), torch.float32)
    probe = torch.randn(1, channels, *image_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    def probe_run() -> tuple[object, list[str]]:
        out, no_grad = _no_grad_modules(model, probe)  # first: its own error, not ShapeProp's node dump
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback first
            ShapeProp(whole).propagate(probe)
        return out, no_grad

    try:
        expected, no_grad = _run(model, probe_run, grad=True)
    except Exception as error:
        raise GraphCutError(f"it does not run on a ({channels}, {image_size[0]}, {image_size[1]}) "
                            f"image ({_first_line(error.__cause__ or error)}); pass image_size= and "
                            "in_channels=") from None
    nodes = list(graph.nodes)
    dep = _depends_on_input(graph)
    points = cut_points(graph, model)
    if not points:
        raise GraphCutError("no point of its forward is crossed by a single tensor (a skip "
                            "connection spans every one)")
    chosen = _preferred(model, nodes, dep, points, prefer) if prefer else []
    if not chosen:
        chosen = _group(model, nodes, [p for p in points if _natural(model, nodes, dep, p)])
    if not chosen:
        chosen = _group(model, nodes, points) or points
    blocks = _split(model, graph, chosen)
    _keep_unused(model, blocks)

    def composed() -> object:
        x = probe
        for block in blocks:
            x = block(x)
        return x

    got = _run(model, composed)
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) and got.shape == expected.shape
            and (device.type == "meta" or torch.allclose(got, expected, rtol=tolerance, atol=tolerance / 10))):
        raise GraphCutError("its traced blocks do not reproduce its output")
    called = {n.target for n in nodes if n.op == "call_module"}  # leaves: their own code runs, grad mode and all
    no_grad = [name for name in no_grad if not any(name.startswith(f"{leaf}.") for leaf in called)]
    if no_grad:  # torch.fx records no grad mode: the blocks would train what the forward keeps out of autograd
        raise GraphCutError(f"its forward runs {no_grad[0]!r} without gradient (torch.no_grad() or "
                            "set_grad_enabled(False), which torch.fx does not trace); freeze it with "
                            "requires_grad_(False) instead")
    return Cut(list(blocks), image_size=image_size)


def _no_grad_modules(model: nn.Module, images: torch.Tensor) -> tuple[object, list[str]]:
    """``model(images)`` (detached) and the submodules with trainable parameters of their own that its forward
    calls with gradient disabled."""
    found: list[str] = []

    def spy(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not torch.is_grad_enabled() and name not in found:
                found.append(name)
        return hook

    handles = [m.register_forward_pre_hook(spy(name)) for name, m in model.named_modules()
               if any(p.requires_grad for p in m.parameters(recurse=False))]
    try:
        out = model(images)
    finally:
        for h in handles:
            h.remove()
    return (out.detach() if isinstance(out, torch.Tensor) else out), found


def _keep_unused(model: nn.Module, blocks: list[nn.Module]) -> None:
    covered = {id(t) for b in blocks for t in b.state_dict(keep_vars=True).values()}
    unused = _Unused()
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in covered:
            continue
        safe = key.replace(".", "__")
        if isinstance(value, nn.Parameter):
            unused.register_parameter(safe, value)
        else:
            unused.register_buffer(safe, value)
        covered.add(id(value))
    if len(unused.state_dict()):
        blocks[-1].add_module("unused_by_forward", unused)
