"""Pipeline replicas (``--parallel modules --data-parallel R``, mlaan.distributed.mesh): R × P gloo ranks on the
CPU, one thread each, against ``--parallel data`` on R ranks.

The claim: each replica reads its shard of the global batch, each stage averages its gradients (and BatchNorm
statistics) with its replicas, so after every step every stage holds what every data-parallel rank holds — bit for
bit with R = 2 (a sum of two numbers does not depend on their order, and the pipeline's arithmetic is the one
process's). The reference is a real data-parallel run (the default process group, GradientAverager as ``mlaan
train --parallel data`` uses it), in a spawn of its own.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_pipeline import _torchrun  # `mlaan train` under torchrun, which must succeed

from mlaan import create_local_model
from mlaan.distributed import DistContext, GradientAverager
from mlaan.distributed.mesh import ReplicaLayout, build_groups, check_layout
from mlaan.distributed.pipeline import ModulePipeline, merge_model_states, module_costs, partition_modules
from mlaan.training.loop import make_optimizer, optimizer_step

STEPS = 3
REPLICAS, STAGES = 2, 2
PER_REPLICA = 4
DEADLINE_S = 180
# (method, K, options): LAM needs ema_lag=1 under module parallelism; the data-parallel reference gets the same
CASES = {
    "dgl": ("dgl", 4, {}),
    "dgl+mlaan": ("dgl+mlaan", 4, {"ema_lag": 1}),
}


def _model(method: str, k: int, options: dict):
    torch.manual_seed(0)
    return create_local_model("resnet20", method=method, num_local_modules=k, image_size=16, **options)


def _shard(step: int, replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ``replica``'s share of step ``step``'s global batch (R × PER_REPLICA images)."""
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(REPLICAS * PER_REPLICA, 3, 16, 16, generator=g)
    targets = torch.randint(0, 10, (REPLICAS * PER_REPLICA,), generator=g)
    return images[replica::REPLICAS], targets[replica::REPLICAS]


def _join(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _replica_worker(rank: int, store: str, out: str) -> None:
    _join(rank, REPLICAS * STAGES, store)
    try:
        layout = check_layout(REPLICAS * STAGES, REPLICAS, "modules")
        pipeline_group, stage_group = build_groups(layout, "cpu")
        ctx = DistContext(rank=rank, world_size=layout.world_size, enabled=True, backend="gloo")
        replica, stage = layout.replica(rank), layout.stage(rank)
        for name, (method, k, options) in CASES.items():
            model = _model(method, k, options)
            ranges = partition_modules(module_costs(model, "blocks"), STAGES, 1)
            pipe = ModulePipeline(model, ranges, stage, group=pipeline_group)
            averager = GradientAverager(model, ctx, group=stage_group, buffer_modules=pipe.owned_parts())
            optimizer = make_optimizer(model, lr=0.05)
            losses = []
            for step in range(STEPS):
                stats = optimizer_step(pipe, optimizer, *_shard(step, replica), wait_for_gradients=averager.wait)
                losses.append(stats["loss"])
            pipe.drain()
            own = set(pipe.owned_state_keys())
            torch.save({"ranges": ranges, "losses": losses,
                        "state": {k: v.clone() for k, v in model.state_dict().items() if k in own}},
                       Path(out) / f"{name}.replica{replica}.stage{stage}.pt")
    finally:
        dist.destroy_process_group()


def _data_worker(rank: int, store: str, out: str) -> None:
    _join(rank, REPLICAS, store)
    try:
        ctx = DistContext(rank=rank, world_size=REPLICAS, enabled=True, backend="gloo")
        for name, (method, k, options) in CASES.items():
            model = _model(method, k, options)
            averager = GradientAverager(model, ctx)  # --parallel data: the default group, every BatchNorm
            optimizer = make_optimizer(model, lr=0.05)
            losses = [optimizer_step(model, optimizer, *_shard(step, rank),
                                     wait_for_gradients=averager.wait)["loss"] for step in range(STEPS)]
            torch.save({"losses": losses, "state": model.state_dict()}, Path(out) / f"{name}.data{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(worker, nprocs: int, path: Path) -> None:
    ctx = mp.start_processes(worker, args=(str(path / "store"), str(path)), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {DEADLINE_S} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    replicas, data = tmp_path_factory.mktemp("replicas"), tmp_path_factory.mktemp("data")
    _spawn(_replica_worker, REPLICAS * STAGES, replicas)
    _spawn(_data_worker, REPLICAS, data)
    return replicas, data


@pytest.mark.parametrize("name", list(CASES))
def test_two_by_two_equals_data_parallel_on_two_ranks_bit_for_bit(runs, name):
    replicas, data = runs
    method, k, options = CASES[name]
    shards = {(d, s): torch.load(replicas / f"{name}.replica{d}.stage{s}.pt", weights_only=False)
              for d in range(REPLICAS) for s in range(STAGES)}
    references = [torch.load(data / f"{name}.data{r}.pt", weights_only=False) for r in range(REPLICAS)]
    # the data-parallel ranks agree with each other, and so do the replicas of every stage
    expected = references[0]["state"]
    assert all(torch.equal(references[1]["state"][key], v) for key, v in expected.items())
    ranges = shards[0, 0]["ranges"]
    model = _model(method, k, options)
    for d in range(REPLICAS):
        merged = merge_model_states(model, ranges, [shards[d, s]["state"] for s in range(STAGES)])
        assert merged.keys() == expected.keys()
        differ = [key for key in expected if not torch.equal(merged[key], expected[key])]
        assert not differ, f"{name}, replica {d}: {len(differ)} tensors differ from --parallel data, first {differ[0]}"
        # the last stage's loss is its replica's shard's, as the data-parallel rank of that shard computes it
        assert shards[d, STAGES - 1]["losses"] == references[d]["losses"], name


def test_layout_numbers_ranks_replica_major():
    layout = ReplicaLayout(replicas=2, stages=3)
    assert layout.world_size == 6
    assert [layout.replica(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [layout.stage(r) for r in range(6)] == [0, 1, 2, 0, 1, 2]
    assert layout.replica_ranks(1) == [3, 4, 5] and layout.stage_ranks(2) == [2, 5]
    assert check_layout(4, 1, "modules") == ReplicaLayout(1, 4)
    assert check_layout(1, 1, "data") == ReplicaLayout(1, 1)
    assert check_layout(8, 2, "modules") == ReplicaLayout(2, 4)


@pytest.mark.parametrize(("world", "replicas", "parallel", "message"), [
    (4, 2, "data", "needs --parallel modules"),
    (6, 4, "modules", "does not divide the 6 processes"),
    (2, 2, "modules", "use --parallel data"),
    (1, 2, "modules", "does not divide the 1 processes"),
    (4, 0, "modules", "must be a number of replicas >= 1"),
])
def test_bad_layouts_are_refused_in_one_line(world, replicas, parallel, message):
    with pytest.raises(ValueError, match=message) as err:
        check_layout(world, replicas, parallel)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ mlaan train --parallel modules --data-parallel
TRAIN = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "16",
         "--arch", "resnet20", "-K", "4", "--method", "dgl+mlaan", "--epochs", "1", "--batch-size", "8",
         "--threads", "1", "--seed", "2", "--ema-lag", "1", "--partition", "blocks"]
REPLICATED = ["--parallel", "modules", "--data-parallel", "2"]
DATA = ["--parallel", "data", "--data-parallel", "1"]


def _last(folder: Path) -> dict:
    return torch.load(folder / "last.pt", weights_only=False)


def _record(folder: Path) -> dict:
    import json

    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data2") / "run"
    _torchrun([*TRAIN, *DATA, "--output-dir", str(out)], ranks=2)
    return out


def test_train_two_replicas_of_two_stages_equals_parallel_data_on_two(data_parallel_run, tmp_path):
    out = tmp_path / "replicas"
    _torchrun([*TRAIN, *REPLICATED, "--output-dir", str(out)], ranks=4)
    expected, got = _last(data_parallel_run), _last(out)
    assert got["model"].keys() == expected["model"].keys()
    assert not [k for k in expected["model"] if not torch.equal(got["model"][k], expected["model"][k])]
    assert got["schedule"]["global_batch"] == expected["schedule"]["global_batch"] == 16
    assert got["schedule"]["replicas"] == 2 and got["pipeline"]["ranks"] == 2
    record, reference = _record(out), _record(data_parallel_run)
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert record[key] == reference[key], key  # two replicas' sums, added with zeros: exact
    # replica r scores test shard r, pipelined, as data-parallel rank r does
    assert record["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-6)
    assert sorted(p.name for p in (out / "shards").glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]


@pytest.mark.slow  # two more torchrun launches
def test_a_stopped_replicated_run_resumes_with_parallel_data(data_parallel_run, tmp_path):
    """Two steps as 2 × 2, the rest as --parallel data on 2 processes (the same global batch, so the same
    algorithm): the weights of the uninterrupted data-parallel run."""
    out = tmp_path / "run"
    _torchrun([*TRAIN, *REPLICATED, "--output-dir", str(out), "--max-steps", "2"], ranks=4)
    assert _last(out)["step"] == 2
    _torchrun([*TRAIN, *DATA, "--output-dir", str(out), "--resume"], ranks=2)
    expected, got = _last(data_parallel_run)["model"], _last(out)["model"]
    assert not [k for k in expected if not torch.equal(got[k], expected[k])]


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "data", "--data-parallel", "2"], "--data-parallel 2 replicates a module pipeline: it needs "
                                                     "--parallel modules"),
    (["--parallel", "modules", "--data-parallel", "2"], "--data-parallel 2 does not divide the 1 processes"),
    (["--parallel", "modules", "--data-parallel", "0"], "data_parallel must be a number of replicas >= 1"),
])
def test_train_refuses_a_layout_that_does_not_fit_in_one_line(tmp_path, capsys, flags, message):
    from mlaan.cli import main

    assert main(["train", *TRAIN, "--output-dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_checkpoint_shape_records_the_replicas_and_a_resume_keeps_the_global_batch():
    from mlaan.training import resume as resume_io

    replicated = resume_io.schedule_shape(4, "modules", 16, 4, 4, 4, replicas=2)
    assert replicated["replicas"] == 2 and "replicas" not in resume_io.schedule_shape(2, "data", 16, 4, 4, 4)
    assert "4 processes (--parallel modules --data-parallel 2)" in resume_io.describe_shape(replicated)
    # the same global batch on another layout: the same algorithm, allowed
    for now in (resume_io.schedule_shape(2, "data", 16, 4, 4, 4),
                resume_io.schedule_shape(8, "modules", 16, 4, 4, 4, replicas=2)):
        assert resume_io.check_schedule({"schedule": replicated}, now, False, "last.pt") is None
    with pytest.raises(ValueError, match="resume with --parallel modules --data-parallel 2") as err:
        resume_io.check_schedule({"schedule": replicated}, resume_io.schedule_shape(4, "modules", 8, 8, 8, 8),
                                 False, "last.pt")
    assert "\n" not in str(err.value)


def test_each_data_shard_keeps_its_random_streams_across_layouts():
    from mlaan.training.resume import schedule_shape, shard_streams

    ranks = [{"rank": r} for r in range(4)]
    two_by_two = {"rng_ranks": ranks, "schedule": schedule_shape(4, "modules", 16, 4, 4, 4, replicas=2)}
    assert shard_streams(two_by_two) == [ranks[0], ranks[2]]  # each replica's first stage
    assert shard_streams({"rng_ranks": ranks, "schedule": schedule_shape(4, "data", 32, 4, 4, 4)}) == ranks
    assert shard_streams({"rng_ranks": ranks}) == ranks  # a checkpoint from before the shape was recorded
    assert shard_streams({"schedule": two_by_two["schedule"]}) is None
