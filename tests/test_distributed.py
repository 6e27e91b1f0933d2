"""Data-parallel local learning (mlaan.distributed): 2 gloo processes on CPU against one process.

The 2-process runs are started with torchrun (``python -m torch.distributed.run --standalone``, which picks a
free port) on this very file, in worker mode; each rank writes its final state and the test compares.

How BatchNorm is made comparable:
- ``sync_bn=True``: every BatchNorm (backbone, aux nets, LAM copies and EMA twins) is mlaan's SyncBatchNorm, which
  normalises with the statistics of the union of both ranks' batches (PyTorch's own nn.SyncBatchNorm refuses
  CPU tensors; ours runs on gloo). So 2 ranks × 4 images must equal ONE process taking the 8-image union batch
  in one ``train_step`` with plain BatchNorm — parameters, running statistics and EMA twins alike.
- ``sync_bn=False`` (DDP's default): each rank normalises with its own 4 images. The exact single-process
  equivalent is gradient accumulation over the two halves (each ``train_step`` on one half, gradients summed
  then halved), with the running statistics of the two halves averaged, as GradientAverager does.

Everything runs in float64. In float32 the comparison would test rounding, not the algorithm: a few SGD steps
on random data amplify last-bit differences (the same single process run with 1 and with 2 CPU threads ends
up to 1e-3 apart after 3 steps at lr 0.1), whereas in float64 both sides agree to ~1e-12.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mlaan
from mlaan import distributed as D

ARCH, METHOD, K = "resnet20", "dgl+mlaan", 4
GLOBAL_BATCH, WORLD, STEPS = 8, 2, 3
RTOL, ATOL = 1e-9, 1e-11  # float64 (measured: SyncBN run 3e-15 from the union batch, local-BN run exact)
DTYPE = torch.float64


def make_model() -> mlaan.LocalModel:
    return mlaan.create_local_model(ARCH, method=METHOD, num_local_modules=K, num_classes=10, image_size=16)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)


def global_batch(step: int, dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g, dtype=dtype)
    return images, torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def shard(step: int, rank: int, world: int = WORLD) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ worker (torchrun)
def worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(DTYPE)
    ctx = D.init_from_env("cpu")
    assert ctx.enabled and ctx.world_size == WORLD and ctx.backend == "gloo"
    for sync_bn in (True, False):
        torch.manual_seed(100 + ctx.rank)  # ranks start different: only prepare_model's broadcast aligns them
        model = make_model()
        D.prepare_model(model, ctx, sync_bn=sync_bn)
        averager = D.GradientAverager(model, ctx)
        opt = make_optimizer(model)
        for step in range(STEPS):
            x, y = shard(step, ctx.rank)
            model.zero_grad(set_to_none=True)
            model.train_step(x, y)
            averager.wait()
            opt.step()
            model.after_optimizer_step()
        syncs = sum(isinstance(m, D.SyncBatchNorm) for m in model.modules())
        info = {"stragglers": averager.stragglers, "overlapped": averager.overlapped_buckets, "sync_modules": syncs}
        torch.save(
            {"state": full_state(model), **info},
            Path(out_dir) / f"rank{ctx.rank}_sync{int(sync_bn)}.pt",
        )
    metrics = D.reduce_metrics(
        {"loss": float(ctx.rank), "correct": 3, "module_losses": [float(ctx.rank), 1.0], "name": "x"}, ctx
    )
    sampler = D.make_train_sampler(list(range(10)), ctx, seed=0)
    torch.save(
        {"metrics": metrics, "sampler": list(sampler), "eval": list(D.make_eval_sampler(list(range(7)), ctx))},
        Path(out_dir) / f"rank{ctx.rank}_misc.pt",
    )
    ctx.barrier()
    D.cleanup(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(WORLD),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        __file__,
        "worker",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


def _load(out: Path, name: str) -> dict:
    return torch.load(out / name, weights_only=False)


def _assert_states_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{what}: {k}: {m}")


# ----------------------------------------------------------------------------------- single-process references
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions gain nothing from more threads, and on a busy machine an OpenMP team waiting for a
    descheduled thread makes them crawl (measured: 2 s → 37 s for the same reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    yield
    torch.set_default_dtype(previous)


def reference_union_batch() -> dict:
    """One process, plain BatchNorm, the 8-image union batch in one train_step."""
    torch.manual_seed(100)
    model = make_model()
    opt = make_optimizer(model)
    for step in range(STEPS):
        x, y = global_batch(step)
        model.zero_grad(set_to_none=True)
        model.train_step(x, y)
        opt.step()
        model.after_optimizer_step()
    return full_state(model)


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def reference_accumulated_halves() -> dict:
    """One process, plain BatchNorm, each rank's half in its own train_step: gradients averaged over the two
    halves, BatchNorm running statistics of the two halves averaged (what 2 unsynchronised-BN ranks do)."""
    torch.manual_seed(100)
    model = make_model()
    opt = make_optimizer(model)
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        start = [b.clone() for b in _bn_buffers(model)]
        after = []
        for rank in range(WORLD):
            with torch.no_grad():
                for b, s in zip(_bn_buffers(model), start):
                    b.copy_(s)
            model.train_step(*shard(step, rank))
            after.append([b.clone() for b in _bn_buffers(model)])
        with torch.no_grad():
            for i, b in enumerate(_bn_buffers(model)):
                b.copy_(sum(a[i] for a in after) / WORLD)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(WORLD)
        opt.step()
        model.after_optimizer_step()
    return full_state(model)


# ----------------------------------------------------------------------------------------------- tests
def test_ranks_identical_and_equal_to_union_batch_with_sync_bn(two_rank_run, float64):
    r0, r1 = _load(two_rank_run, "rank0_sync1.pt"), _load(two_rank_run, "rank1_sync1.pt")
    assert r0["sync_modules"] > 0 and r0["stragglers"] == 0
    # every module's and aux net's reduction was launched from the engine's hook, during train_step
    assert r0["overlapped"] >= 2 * K - 2
    for k in r0["state"]:  # identical across ranks, EMA twins included
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    _assert_states_close(r0["state"], reference_union_batch(), "2 ranks (SyncBN) vs 1 process, union batch")


def test_ranks_identical_and_equal_to_accumulated_halves_without_sync_bn(two_rank_run, float64):
    r0, r1 = _load(two_rank_run, "rank0_sync0.pt"), _load(two_rank_run, "rank1_sync0.pt")
    assert r0["sync_modules"] == 0 and r0["stragglers"] == 0
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=1e-12, msg=k)
    _assert_states_close(r0["state"], reference_accumulated_halves(), "2 ranks (local BN) vs accumulated halves")


def test_sync_bn_really_changes_the_result(two_rank_run, float64):
    """Guard against a vacuous pass: per-rank BatchNorm must NOT match the union-batch reference."""
    local_bn = _load(two_rank_run, "rank0_sync0.pt")["state"]
    union = reference_union_batch()
    worst = max((local_bn[k] - union[k]).abs().max().item() for k in union if union[k].is_floating_point())
    assert worst > 1e-3


def test_metrics_and_samplers(two_rank_run):
    m0, m1 = _load(two_rank_run, "rank0_misc.pt"), _load(two_rank_run, "rank1_misc.pt")
    assert m0["metrics"] == m1["metrics"] == {"loss": 0.5, "correct": 6, "module_losses": [0.5, 1.0], "name": "x"}
    assert sorted(m0["sampler"] + m1["sampler"]) == list(range(10)) and not set(m0["sampler"]) & set(m1["sampler"])
    assert sorted(m0["eval"] + m1["eval"]) == list(range(7))


# ------------------------------------------------------------------------------------- single-process side
def test_single_process_context_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = D.init_from_env("cpu")
    assert (ctx.enabled, ctx.rank, ctx.world_size, ctx.is_main, ctx.device) == (False, 0, 1, True, torch.device("cpu"))
    ctx.barrier()
    model = make_model()
    before = full_state(model)
    assert D.prepare_model(model, ctx, sync_bn=True) is model
    assert not any(isinstance(m, D.SyncBatchNorm) for m in model.modules())
    averager = D.GradientAverager(model, ctx)
    model.train_step(*global_batch(0, torch.float32))
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    averager.wait()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]))
    assert D.reduce_metrics({"loss": 1.0}, ctx) == {"loss": 1.0}
    assert D.make_train_sampler(range(4), ctx, 0) is None and D.make_eval_sampler(range(4), ctx) is None
    assert before.keys() == full_state(model).keys()
    D.cleanup(ctx)


def test_bad_device_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="unknown device"):
        D.init_from_env("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.init_from_env("cuda")


def test_sync_bn_conversion_keeps_views_shared_and_twins_untracked():
    model = make_model()
    bn_before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    twin_bn_ids = {id(m) for t in model.leap_trunks for m in t.twin.modules() if isinstance(m, nn.BatchNorm2d)}
    params_before = {id(p) for p in model.parameters()}
    state_before = full_state(model)
    converted = D.convert_sync_batchnorm(model)
    assert converted == bn_before > 0 and twin_bn_ids
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, D.SyncBatchNorm) for m in model.modules()
    )
    # local_modules are still views of the very backbone blocks, whose BatchNorms are the new ones
    flat_views = [block for view in model.local_modules for block in view]
    assert all(any(b is blk for blk in model.backbone.blocks) for b in flat_views)
    assert model.local_modules[0][0] is model.backbone.blocks[0]
    assert isinstance(model.backbone.blocks[1].bn1, D.SyncBatchNorm)
    # same Parameter objects and values, same state_dict keys (export into a plain ResNet still works)
    assert {id(p) for p in model.parameters()} == params_before
    _assert_states_close(full_state(model), state_before, "conversion")
    plain = mlaan.models.create(ARCH, image_size=16)
    plain.load_state_dict(model.backbone.state_dict())
    # EMA twins keep normalising with batch statistics without touching their buffers
    for trunk in model.leap_trunks:
        for m in trunk.twin.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert isinstance(m, D.SyncBatchNorm) and not m.track_running_stats
    twin = model.leap_trunks[0].twin
    buffers = [b.clone() for b in twin.buffers()]
    model.train_step(*global_batch(0, torch.float32))  # single process: SyncBatchNorm falls back to plain BatchNorm
    assert all(torch.equal(a, b) for a, b in zip(buffers, twin.buffers()))
    model.after_optimizer_step()


def test_count_keys_are_summed():
    assert D.is_count_key("correct") and D.is_count_key("num_samples") and D.is_count_key("val_total")
    assert not D.is_count_key("loss") and not D.is_count_key("accuracy")


@pytest.mark.slow
@pytest.mark.parametrize("data", [[], ["--data-on-device"]], ids=["loader", "data-on-device"])
def test_two_nodes_rendezvous_with_the_cli(tmp_path, data):
    """docs/PARALLELISM.md's several-machines command, two "nodes" of one process each on this machine (c10d
    rendezvous), with a DataLoader and with batches made on the device (each rank its shard and its own crops)."""
    pytest.importorskip("mlaan.cli")
    port, out = _free_port(), tmp_path / "run"
    train = ["-m", "mlaan", "train", "--device", "cpu", "--dataset", "synthetic", "--synthetic-train-size", "64"]
    train += ["--synthetic-test-size", "16", "--arch", "resnet20", "-K", "4", "--epochs", "1", "--batch-size", "8"]
    train += ["--output-dir", str(out), "--precise-bn", "2", *data]  # both ranks re-estimate alike before evaluating
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(launch + train, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)]
    nodes.append(subprocess.Popen(launch + train, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(log[-3000:] for log in logs)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary.get("world_size", 2) == 2 and summary.get("steps", 4) == 4  # 64 images / (8 per rank x 2)


def big_worker(out_dir: str) -> None:
    """ResNet-101 cut into K=34 modules (every block its own, the stem's included), one step on 2 ranks."""
    torch.set_num_threads(1)
    ctx = D.init_from_env("cpu")
    torch.manual_seed(ctx.rank)
    model = mlaan.create_local_model(
        "resnet101", method="dgl+mlaan", num_local_modules=34, num_classes=5, image_size=32, lam_depth=1
    )
    D.prepare_model(model, ctx, sync_bn=True)
    averager = D.GradientAverager(model, ctx)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(ctx.rank)
    model.train_step(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g))
    averager.wait()
    opt.step()
    model.after_optimizer_step()
    sums = torch.stack([t.double().sum() for t in model.state_dict().values()])
    torch.save({"sums": sums, "overlapped": averager.overlapped_buckets}, Path(out_dir) / f"big{ctx.rank}.pt")
    D.cleanup(ctx)


@pytest.mark.slow
def test_resnet101_with_34_modules_on_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", __file__, "big", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    r0, r1 = _load(tmp_path, "big0.pt"), _load(tmp_path, "big1.pt")
    assert torch.equal(r0["sums"], r1["sums"])
    assert r0["overlapped"] >= 2 * 34 - 2


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2])
elif __name__ == "__main__" and sys.argv[1:2] == ["big"]:
    big_worker(sys.argv[2])


def test_each_rank_and_step_gets_its_own_seed():
    from mlaan.training.sampling import rank_seed

    seeds = {rank_seed(seed, rank, step) for seed in (0, 1) for rank in range(8) for step in (0, 1, 500)}
    assert len(seeds) == 2 * 8 * 3
    assert all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(0, 0, 0) == 0  # rank 0 of a fresh run keeps the run's own seed
