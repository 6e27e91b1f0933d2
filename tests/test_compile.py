"""``torch.compile`` of what a step runs (``compile=True``, ``mlaan train --compile``; mlaan.engine.compile).

The steps are compiled with ``backend="aot_eager"`` here: AOTAutograd's forward/backward graphs (where buffer
donation and retained graphs meet) without inductor's C++ code generation, so the test stays fast; the product's
default backend is inductor (BENCHMARKS.md#torchcompile measures it)."""

from __future__ import annotations

import copy

import pytest
import torch

import mlaan
from mlaan.engine.compile import compile_step_parts, compiled_parts

dynamo = pytest.importorskip("torch._dynamo")


def _steps(model, batches):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    out = []
    for x, y in batches:
        out.append(model.train_step(x, y)["module_losses"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
    return out


# 11-20 s each on a shared core (dynamo traces every part): dgl+mlaan (the cascade's retained graphs, which
# buffer donation would refuse) in the default run, bp and dgl among the slow tests
@pytest.mark.parametrize("method,k", [pytest.param("bp", 1, marks=pytest.mark.slow),
                                      pytest.param("dgl", 3, marks=pytest.mark.slow), ("dgl+mlaan", 3)])
def test_compiled_and_eager_steps_agree(method, k):
    """Two SGD steps of resnet20: compiled parts give the eager losses and parameters to float tolerance. Under
    dgl+mlaan each module's graph is backwarded twice (the cascade's retain_graph), which AOTAutograd's buffer
    donation would refuse; and nothing is renamed in state_dict."""
    dynamo.reset()
    torch.manual_seed(0)
    eager = mlaan.create_local_model("resnet20", method, k)
    compiled = copy.deepcopy(eager)
    compile_step_parts(compiled, backend="aot_eager")
    parts = compiled_parts(compiled)
    assert len(parts) == len(compiled.local_modules) + len(compiled.independent_heads) + len(compiled.cascade_heads)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    dynamo.utils.counters.clear()
    compiled_losses = _steps(compiled, batches)
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= len(parts)  # every part ran compiled
    eager_losses = _steps(eager, batches)
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    a, b = eager.state_dict(), compiled.state_dict()
    assert list(a) == list(b)  # no _orig_mod. prefixes: checkpoints of either load into the other
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    eager.load_state_dict(b)  # strict, both ways
    compiled.load_state_dict(a)


def test_the_compile_option_compiles_each_part_in_place():
    model = mlaan.create_local_model("resnet20", "dgl+mlaan", 3, compile=True)  # compiled lazily, at the first step
    eager = mlaan.create_local_model("resnet20", "dgl+mlaan", 3)
    assert model.options.compile and len(compiled_parts(model)) == 3 + 2 + 1
    assert list(model.state_dict()) == list(eager.state_dict())
    assert compiled_parts(copy.deepcopy(model)) == []  # a copy runs eager (nn.Module drops the compiled call)
    assert compiled_parts(eager) == []
