"""Module parallelism (mlaan.distributed.pipeline): gloo ranks on the CPU, one thread each, against one process.

Each spawn runs every case of a rank count in one set of processes (a spawn costs seconds); the process group has
a timeout and the spawn a deadline, so a protocol bug fails instead of hanging.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlaan import create_local_model
from mlaan.distributed.pipeline import (
    ModulePipeline,
    boundaries,
    check_partition,
    merge_model_states,
    merge_optimizer_states,
    module_costs,
    partition_modules,
    state_owners,
)
from mlaan.training.loop import make_optimizer, optimizer_step

STEPS = 3
BATCH = 6
DEADLINE_S = 240

# (name, method, K, options, boundary): the options the reference engine is built with are the same
CASES = {
    "dgl": ("dgl", 4, {}, "exact"),
    "infopro": ("infopro", 4, {}, "exact"),
    "auglocal": ("auglocal", 4, {}, "exact"),
    "dgl+mlaan-w2": ("dgl+mlaan", 4, {"ema_lag": 1}, "exact"),
    "dgl+mlaan-w3": ("dgl+mlaan", 4, {"ema_lag": 1, "window": 3}, "exact"),
    "dgl+mlm-w2-cut": ("dgl+mlm", 4, {}, "cut"),
    "dgl+lam": ("dgl+lam", 4, {"ema_lag": 1}, "exact"),
}
CASES_4 = {
    "dgl": ("dgl", 6, {}, "exact"),
    "dgl+mlaan-w3": ("dgl+mlaan", 8, {"ema_lag": 1, "window": 3}, "exact"),
}


def _model(method: str, k: int, options: dict, barriers: tuple[int, ...] = ()):
    torch.manual_seed(0)
    return create_local_model("resnet20", method=method, num_local_modules=k, image_size=16,
                              cascade_barriers=barriers, **options)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _ranges(model, world: int, boundary: str):
    from mlaan.distributed.pipeline import min_modules_per_rank
    return partition_modules(module_costs(model, "blocks"), world, min_modules_per_rank(model, boundary))


def _worker(rank: int, world: int, store: str, out: str, cases: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, (method, k, options, boundary) in cases.items():
            ranges = _ranges(_model(method, k, options), world, boundary)
            barriers = boundaries(ranges) if boundary == "cut" else ()
            model = _model(method, k, options, barriers)
            pipe = ModulePipeline(model, ranges, rank, boundary)
            optimizer = make_optimizer(model, lr=0.05)
            for images, targets in _batches():
                stats = pipe.optimizer_step(optimizer, images, targets)
            pipe.drain()
            own = set(pipe.owned_state_keys())
            state = {k: v.clone() for k, v in model.state_dict().items() if k in own}
            meta = sorted(k for k, v in model.state_dict().items() if v.is_meta)
            evaluation = pipe.evaluate(_batches())
            precise = pipe.evaluate(_batches(), pipe.precise_batchnorm(images for images, _ in _batches()[:2]))
            try:  # a released block, run
                model(_batches()[0][0])
                released_error = None
            except RuntimeError as err:
                released_error = str(err)
            torch.save({"ranges": ranges, "state": state, "optimizer": optimizer.state_dict(), "stats": stats,
                        "meta": meta, "evaluation": evaluation, "precise": precise, "released_error": released_error,
                        "params": pipe.parameter_count()}, Path(out) / f"{name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: dict, tmp_path: Path) -> None:
    ctx = mp.start_processes(_worker, args=(world, str(tmp_path / "store"), str(tmp_path), cases), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"pipeline ranks still running after {DEADLINE_S} s")


def _reference(method: str, k: int, options: dict, barriers: tuple[int, ...]):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: results depend on it in the last bits
    try:
        model = _model(method, k, options, barriers)
        optimizer = make_optimizer(model, lr=0.05)
        for images, targets in _batches():
            optimizer_step(model, optimizer, images, targets)
        return model, optimizer
    finally:
        torch.set_num_threads(threads)


def _check(tmp_path: Path, world: int, name: str, case: tuple, cut_matches_barriers: bool = True) -> None:
    method, k, options, boundary = case
    shards = [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=False) for r in range(world)]
    ranges = shards[0]["ranges"]
    barriers = boundaries(ranges) if boundary == "cut" else ()
    model, optimizer = _reference(method, k, options, barriers)
    merged = merge_model_states(model, ranges, [s["state"] for s in shards])
    expected = model.state_dict()
    assert merged.keys() == expected.keys()
    differ = [key for key in expected if not torch.equal(merged[key], expected[key])]
    assert not differ, f"{name}: {len(differ)} tensors differ from one process, first {differ[0]}"
    opt = merge_optimizer_states([s["optimizer"] for s in shards])
    ref = optimizer.state_dict()
    assert opt["state"].keys() == ref["state"].keys()
    for i, state in ref["state"].items():
        assert torch.equal(opt["state"][i]["momentum_buffer"], state["momentum_buffer"]), (name, i)
    owners = state_owners(model, ranges)
    for r, shard in enumerate(shards):  # a rank holds its own state only: every other entry is on the meta device
        assert shard["meta"] == sorted(key for key, owner in owners.items() if owner != r), (name, r)
    assert sum(s["params"] for s in shards) == sum(p.numel() for p in model.parameters())
    if world > 1:
        assert "released its parameters to the meta device" in shards[-1]["released_error"]
    # pipelined evaluation (and precise BatchNorm) gives the one process's figures, on every rank
    assert all(s["evaluation"] == _evaluate(model.backbone) for s in shards), name
    assert all(s["precise"] == _evaluate(_precise(model.backbone)) for s in shards), name
    last = shards[-1]["stats"]
    assert last["modules"][-1] == k - 1 and last["loss"] == last["loss"]  # the last rank reports the real loss


def _evaluate(backbone) -> dict:
    from mlaan.training.loop import evaluate_backbone

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate_backbone(backbone, _batches(), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def _precise(backbone):
    from torch.optim.swa_utils import update_bn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone = __import__("copy").deepcopy(backbone)
        update_bn((images for images, _ in _batches()[:2]), backbone)
        return backbone
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline2")
    _spawn(2, CASES, path)
    return path


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline4")
    _spawn(4, CASES_4, path)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(two_ranks, name):
    _check(two_ranks, 2, name, CASES[name])


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_ranks_equal_one_process(four_ranks, name):
    _check(four_ranks, 4, name, CASES_4[name])


def test_cut_boundary_differs_from_uncut(two_ranks):
    """The negative control: cutting cascades at the rank boundary changes the algorithm."""
    method, k, options, _ = CASES["dgl+mlm-w2-cut"]
    shards = [torch.load(two_ranks / f"dgl+mlm-w2-cut.rank{r}.pt", weights_only=False) for r in range(2)]
    uncut, _ = _reference(method, k, options, ())
    merged = merge_model_states(uncut, shards[0]["ranges"], [s["state"] for s in shards])
    boundary = shards[0]["ranges"][0].stop - 1
    key = next(k for k in uncut.state_dict() if k.startswith(f"local_modules.{boundary}.") and k.endswith("weight"))
    assert not torch.equal(merged[key], uncut.state_dict()[key])


def test_partition_is_min_max_and_respects_the_window():
    assert partition_modules([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert partition_modules([4, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    assert partition_modules([4, 1, 1, 1, 1], 2, min_modules=2) == [range(0, 2), range(2, 5)]
    with pytest.raises(ValueError, match="cannot be split over 3 ranks with at least 2"):
        partition_modules([1] * 5, 3, min_modules=2)


def test_ema_lag_one_follows_the_previous_step():
    """With ema_lag=1 a twin moves toward its block as it was before the step just taken."""
    model = _model("dgl+lam", 4, {"ema_lag": 1, "ema_momentum": 0.5})
    trunk = model.leap_trunks[0]
    block = model.backbone.blocks[trunk.source_index]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    twin = {k: v.clone() for k, v in trunk.twin.module.state_dict().items()}
    with torch.no_grad():
        for p in block.parameters():
            p.add_(1.0)
    model.after_optimizer_step()
    name, weight = next((k, v) for k, v in trunk.twin.module.state_dict().items() if k.endswith("weight"))
    assert torch.allclose(weight, 0.5 * twin[name] + 0.5 * before[name])
    assert torch.equal(trunk.source_snapshot.state_dict()[name], block.state_dict()[name])


def test_partition_checks_name_the_problem():
    lam = _model("dgl+lam", 4, {})
    with pytest.raises(ValueError, match="need ema_lag=1"):
        check_partition(lam, [range(0, 2), range(2, 4)], "exact")
    check_partition(lam, [range(0, 4)], "exact")  # one rank: every twin's block is local
    mlaan = _model("dgl+mlaan", 4, {"ema_lag": 1, "window": 3})
    with pytest.raises(ValueError, match="rank 1 owns 1 local module.*window 3 need at least 2"):
        check_partition(mlaan, [range(0, 3), range(3, 4)], "exact")
    with pytest.raises(ValueError, match=r"needs the model built with cascade_barriers=\(1,\)"):
        check_partition(mlaan, [range(0, 2), range(2, 4)], "cut")
    with pytest.raises(ValueError, match="unknown boundary 'stale'; allowed: exact, cut"):
        check_partition(mlaan, [range(0, 4)], "stale")
    with pytest.raises(ValueError, match="must cover local modules 0..3"):
        check_partition(mlaan, [range(0, 2), range(3, 4)], "exact")


def test_bench_pipeline_writes_its_table_and_model(tmp_path, capsys):
    from mlaan.cli import main

    assert main(["bench", "pipeline", "--arch", "resnet20", "--local-modules", "4", "--batch-size", "8",
                 "--steps", "1", "--warmup", "1", "--rounds", "1", "--partition", "blocks",
                 "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pipeline.json").read_text())
    assert set(result["seconds_per_step"]) == {"sequential", "pipeline", "bp_sequential", "bp_1f1b"}
    assert len(result["per_rank"]) == 2 and all(r["wait_s"] >= 0 for r in result["per_rank"])
    assert [tuple(r) for r in result["ranges"]][0][0] == 0 and result["ranges"][-1][1] == 4
    assert result["model"]["predicted_tick_s"] > 0 and "4" in result["model"]["predictions"]
    # each rank's parameters are its share of the one process's; its accounted peak is below the one process's
    one = result["one_process"]
    assert sum(r["params"] for r in result["per_rank"]) == one["params"]
    assert all(0 < r["peak_bytes"] < one["peak_bytes"] and r["peak_kind"] == "accounted" for r in result["per_rank"])
    out = capsys.readouterr().out
    assert "pipeline, 2 ranks" in out and "| one process |" in out and "peak MiB" in out


@pytest.mark.parametrize(("sequential_s", "warned"), [(1.5, False), (3.0, True)])
def test_bench_pipeline_flags_a_speed_up_beyond_its_rank_count(sequential_s, warned):
    from mlaan.bench.pipeline import _table

    result = {"seconds_per_step": {"sequential": sequential_s, "pipeline": 1.0, "bp_sequential": 1.0, "bp_1f1b": 1.0},
              "config": {"method": "dgl", "cores": 2, "ranks": 2, "loadavg_before": 2.5, "loadavg_after": 2.1},
              "ranges": [[0, 2], [2, 4]], "per_rank": [{"step_s": 1.0, "wait_s": 0.0}] * 2,
              "model": {"predicted_s_per_step": 1.0, "measured_s_per_step": 1.0, "error": 0.0, "one_device_s": 2.0,
                        "message_s": 1e-3, "predictions": {}}}
    text = _table(result)
    assert ("warning: a speed-up above 2 with 2 ranks cannot come from the pipeline" in text) == warned
    assert ("load average 2.5 before, 2.1 after" in text) == warned


def test_bench_pipeline_refuses_bad_input(capsys):
    from mlaan.cli import main

    assert main(["bench", "pipeline", "--method", "bp"]) == 2
    assert "trains end to end" in capsys.readouterr().err
    assert main(["bench", "pipeline", "--ranks", "1"]) == 2
    assert "--ranks must be at least 2, got 1" in capsys.readouterr().err
    if torch.cuda.device_count() < 4:
        assert main(["bench", "pipeline", "--device", "cuda", "--ranks", "4"]) == 2
        assert f"--device cuda --ranks 4 needs 4 GPUs, found {torch.cuda.device_count()}" in capsys.readouterr().err


# ------------------------------------------------------------------------ mlaan train --parallel modules
TRAIN = ["--device", "cpu", "--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "16",
         "--arch", "resnet20", "-K", "4", "--method", "dgl+mlaan", "--epochs", "1", "--batch-size", "16",
         "--threads", "1", "--parallel", "modules", "--seed", "2", "--precise-bn", "2"]


def _torchrun(args: list[str], ranks: int = 2, expect: int = 0) -> str:
    """`mlaan train ARGS` under torchrun; its output (stdout + stderr), once its exit code is ``expect``."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "mlaan", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == expect, f"torchrun exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _one_process(args: list[str]) -> None:
    from mlaan.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["train", *args]) == 0
    finally:
        torch.set_num_threads(threads)


def _model_state(folder: Path) -> dict:
    return torch.load(folder / "last.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seq")
    _one_process([*TRAIN, "--output-dir", str(out)])
    return out


def test_train_parallel_modules_equals_one_process(one_process_run, tmp_path):
    out = tmp_path / "pipe"
    _torchrun([*TRAIN, "--output-dir", str(out)])
    expected, got = _model_state(one_process_run), _model_state(out)
    assert got.keys() == expected.keys()
    assert not [k for k in expected if not torch.equal(got[k], expected[k])]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["module_parallel"]["ranks"] == 2 and summary["config"]["ema_lag"] == 1
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    reference = json.loads((one_process_run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("train_loss", "train_accuracy", "train_independent_losses", "train_cascaded_losses"):
        assert record[key] == reference[key], key  # per-rank sums added up with zeros: exact
    # every rank re-estimates the BatchNorm statistics (--precise-bn) alike and evaluates its share of the test set
    assert record["test_accuracy"] == reference["test_accuracy"]
    assert record["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-6)
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["step"] == 4 and sorted(manifest["shards"]) == ["rank0.pt", "rank1.pt"]


def test_a_stopped_pipelined_run_resumes_in_one_process_and_on_two_ranks(one_process_run, tmp_path):
    """Two steps on two ranks, then the rest in one process (or again on two ranks): the same weights as one
    uninterrupted process."""
    first = tmp_path / "first"
    _torchrun([*TRAIN, "--output-dir", str(first), "--max-steps", "2"])
    assert torch.load(first / "last.pt", weights_only=False)["step"] == 2
    again = tmp_path / "again"
    __import__("shutil").copytree(first, again)
    _one_process([*TRAIN, "--output-dir", str(first), "--resume", "--parallel", "data"])
    _torchrun([*TRAIN, "--output-dir", str(again), "--resume"])
    expected = _model_state(one_process_run)
    for folder in (first, again):
        got = _model_state(folder)
        assert not [k for k in expected if not torch.equal(got[k], expected[k])], folder.name


@pytest.mark.parametrize("flags, message", [
    (["--method", "bp"], "--parallel modules needs a local-learning method; 'bp' trains end to end"),
    (["--sync-bn"], "--sync-bn is for --parallel data"),
    (["--dist-timeout", "0"], "dist_timeout must be a positive number of seconds, got 0.0"),
])
def test_train_parallel_modules_refuses_bad_settings_in_one_line(tmp_path, capsys, flags, message):
    from mlaan.cli import main

    assert main(["train", *TRAIN, "--output-dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_a_split_that_does_not_go_round_is_refused_by_every_rank_and_said_once(tmp_path):
    """Only rank 0 checked the split, while rank 1 waited for its partition in a broadcast and died of the lost
    connection with a traceback (a newcomer's test). Every rank refuses it; rank 0 alone says so."""
    flags = [f for f in TRAIN if f not in ("-K", "4")]
    output = _torchrun([*flags, "-K", "3", "--window", "3", "--output-dir", str(tmp_path / "run")], expect=1)
    line = "mlaan: error: K=3 local modules cannot be split over 2 ranks with at least 2 each"
    assert output.count(line) == 1, output[-3000:]
    assert "exitcode  : 2" in output, output[-3000:]  # torchrun's report: the ranks left with the usage code
    assert "broadcast_object_list" not in output and not (tmp_path / "run").exists()


def test_bad_parallel_choice_is_refused_by_the_parser(capsys):
    from mlaan.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--parallel", "tensor"])
    assert stop.value.code == 2 and "invalid choice: 'tensor'" in capsys.readouterr().err


def test_a_rank_releases_what_other_ranks_train_and_says_so_when_asked_for_it():
    """release_unowned (what ModulePipeline does on every rank): rank 1 of 2 keeps its modules' blocks, aux nets
    and EMA twins real and every other tensor on the meta device; running a released block says whose it is."""
    from mlaan.distributed.pipeline import owned_parameter_count, release_unowned

    model = _model("dgl+lam", 4, {"ema_lag": 1})
    ranges = [range(0, 2), range(2, 4)]
    owners = state_owners(model, ranges)
    total = sum(p.numel() for p in model.parameters())
    released = release_unowned(model, ranges, 1)
    held = {k for k, v in model.state_dict().items() if not v.is_meta}
    assert held == {k for k, r in owners.items() if r == 1} and released > 0
    assert release_unowned(model, ranges, 1) == 0  # idempotent
    assert owned_parameter_count(model, ranges, 1) == sum(p.numel() for p in model.parameters() if not p.is_meta)
    assert 0 < owned_parameter_count(model, ranges, 1) < total
    with pytest.raises(RuntimeError, match="local module 0 is trained by rank 0; rank 1 released its parameters"):
        model(torch.randn(2, 3, 16, 16))
    with torch.no_grad():  # its own modules still run
        x = torch.randn(2, *model.profile.out_shapes[model.split[1][-1]])
        assert model.local_modules[3](model.local_modules[2](x)).shape == (2, 10)
