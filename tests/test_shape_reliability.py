"""Issue 28, items 2, 5 and 6: one definition of a finished run (bench accuracy, mlaan report, resume); a skip
connection across blocks kept in shared state refused in one line; bf16 autocast on a CPU without bf16 warned of."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from torch import nn

import mlaan
from mlaan import runtime
from mlaan.bench import accuracy, cli, report
from mlaan.cli import main
from mlaan.training import metrics_log


# ------------------------------------------------------------------------ 2. one definition of "finished"
def _args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "accuracy", "--dataset", "synthetic", "--arch", "resnet20", "--k", "2",
                              "--epochs", "1", "--batch-size", "16", "--threads", "1", "--train-arg",
                              "--synthetic-train-size 64 --synthetic-test-size 32 --workers 0",
                              "--output-dir", str(tmp_path / "out"), *extra])


def _stopped_run(args: argparse.Namespace, method: str = "dgl", seed: int = 0):
    """A real run of the harness's own command, stopped by --max-steps after 2 of its 4 steps (as a user would
    leave one, trying a run out by hand in the comparison's folder)."""
    folder = accuracy.run_dir(accuracy.Path(args.output_dir), accuracy.Arm(method), seed)
    cmd = accuracy.train_command(args, accuracy.Arm(method), seed, folder, 1)
    assert main([*cmd[3:], "--max-steps", "2"]) == 0
    return folder


def test_a_max_steps_run_is_stopped_for_report_bench_and_resume_alike(tmp_path):
    args = _args(tmp_path)
    folder = _stopped_run(args)
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["steps"] == 2 and summary["steps_per_epoch"] == 4
    assert metrics_log.run_state(folder) == "stopped" and not metrics_log.summary_finished(summary)
    assert metrics_log.stopped_early(summary) == (2, 4)
    run = report.load_run(folder)
    assert run["finished"] is False and run["stopped"] is True
    assert report._finished_text(run) == "--max-steps (2 of 4)"
    # a resume in its own folder trains on to the schedule's end, and then all three call it finished
    assert main(["train", "--output-dir", str(folder), "--resume"]) == 0
    assert metrics_log.run_state(folder) == "finished" and report.load_run(folder)["finished"] is True
    assert json.loads((folder / "metrics.json").read_text())["steps"] == 4


def test_bench_accuracy_continues_a_stopped_run_and_keeps_it_out_of_the_tables(tmp_path, capsys):
    args = _args(tmp_path, "--methods", "dgl")
    folder = _stopped_run(args)
    out = tmp_path / "out"
    # --report-only: the stopped run is listed as not finished, and enters neither mean ± std nor Δ
    assert accuracy.run(_args(tmp_path, "--methods", "dgl", "--report-only")) == 0
    data = json.loads((out / "accuracy.json").read_text())
    assert data["summary"] == [] and data["runs"][0]["finished"] is False
    assert data["unfinished"] == ["dgl seed 0 (stopped by --max-steps at step 2 of 4)"]
    assert "dgl seed 0: stopped by --max-steps, 0 of 1 epoch (step 2)" in capsys.readouterr().out
    # the next call continues it (--resume) to the end of its schedule
    assert accuracy.run(args) == 0
    printed = capsys.readouterr().out
    assert "dgl seed 0: continuing:" in printed and "--resume" in printed
    assert json.loads((folder / "metrics.json").read_text())["steps"] == 4
    data = json.loads((out / "accuracy.json").read_text())
    assert [e["label"] for e in data["summary"]] == ["dgl"] and data["unfinished"] == []


class _StoppedTrain:
    """Stands in for a `mlaan train` that ends on --max-steps (exit 0, a metrics.json of 3 of 160 steps)."""

    def __init__(self, cmd, log) -> None:
        folder = accuracy.Path(cmd[cmd.index("--output-dir") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 3, "complete": False,
                                                          "test_accuracy": 0.16}) + "\n")
        (folder / "last.pt").write_bytes(b"")
        (folder / "metrics.json").write_text(json.dumps({
            "test_accuracy": 0.16, "test_error": 0.84, "steps": 3, "epochs_completed": 0, "steps_per_epoch": 160,
            "config": {"method": cmd[cmd.index("--method") + 1], "arch": "resnet20", "epochs": 1}}))
        self.returncode = 0

    def poll(self):
        return 0


def test_a_run_that_ends_before_its_schedule_is_a_failure_not_a_result(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accuracy, "start_process", _StoppedTrain)
    monkeypatch.setattr(accuracy.time, "sleep", lambda s: None)
    assert accuracy.run(_args(tmp_path, "--methods", "bp,infopro")) == 1
    assert "infopro seed 0: FAILED: ended at step 3 of 160, before the end of its schedule" in capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert data["summary"] == [] and len(data["unfinished"]) == 2  # no mean ± std, no Δ of 3-step runs


@pytest.mark.parametrize("flags", [["--train-arg", "--max-steps 3"], ["--train-arg=--max-steps=3"],
                                   ["--arm", "short=--max-steps 3"]])
def test_max_steps_among_a_runs_flags_is_refused_in_one_line(tmp_path, monkeypatch, capsys, flags):
    started = []
    monkeypatch.setattr(accuracy, "start_process", lambda cmd, log: started.append(cmd))
    assert main(["bench", "accuracy", "--methods", "dgl", "--dataset", "synthetic", "--arch", "resnet20",
                 "--output-dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlaan: error: ") and "--max-steps is not allowed" in err and "--epochs" in err
    assert len(err.strip().splitlines()) == 1 and started == []


# ------------------------------------------------------------- 5. a skip connection kept in shared state
STORE: dict[str, torch.Tensor] = {}  # a UNet's skips, as users keep them: a dict the blocks share


class _Block(nn.Module):
    """A conv block that may stash its output in a shared store (``stash``) or add the stored one (``use``)."""

    def __init__(self, store: dict, stash: bool = False, use: bool = False) -> None:
        super().__init__()
        self.store, self.stash, self.use = store, stash, use
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.use:
            y = y + self.store["skip"]
        if self.stash:
            self.store["skip"] = y
        return y


def _unet_blocks(stash: int, use: int, store: dict) -> list[nn.Module]:
    return ([nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())]
            + [_Block(store, i == stash, i == use) for i in range(1, 6)]
            + [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))])


def _two_steps(method: str, k: int, stash: int, use: int, store: dict) -> None:
    torch.manual_seed(0)
    model = mlaan.create_local_model(_unet_blocks(stash, use, store), method=method, num_local_modules=k,
                                     image_size=16)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for _ in range(2):
        model.train_step(x, y)


@pytest.mark.parametrize(("method", "k", "stash", "use", "why"), [
    # autograd's "Trying to backward through the graph a second time" before
    ("dgl+mlaan", 3, 1, 4, "under dgl+mlaan with K=3 they fall in local modules 0 and 2"),
    ("infopro+mlaan", 4, 2, 5, "under infopro+mlaan with K=4 they fall in local modules 1 and 3"),
    # within one module, but a LAM trunk copies block 4 (module 1's cascaded aux net)
    ("dgl+mlaan", 3, 4, 5, "the aux nets of dgl+mlaan run copies of block 4"),
])
def test_a_skip_across_blocks_in_shared_state_is_refused_in_one_line(method, k, stash, use, why):
    torch.set_num_threads(1)
    with pytest.raises(ValueError) as caught:
        _two_steps(method, k, stash, use, STORE)
    message = str(caught.value)
    assert message.startswith(f"block {use} (block, _Block) uses a tensor computed by block {stash} (block, _Block) "
                              "that is not its input")
    assert why in message and f"make blocks {stash} to {use} one block" in message and "bp" in message
    assert "\n" not in message


def test_a_store_held_by_the_blocks_is_refused_before_any_copy_is_made():
    """The store as the blocks' own attribute: deep-copying a block for a LAM trunk met the stored non-leaf tensor
    (autograd's "Only Tensors created explicitly by the user ... deepcopy") before."""
    with pytest.raises(ValueError, match=r"uses a tensor computed by block 1 .* local modules 0 and 1"):
        _two_steps("dgl+mlaan", 3, 1, 2, {})


@pytest.mark.parametrize(("method", "k", "stash", "use"), [("bp", 1, 1, 4), ("dgl", 3, 2, 3), ("dgl+mlaan", 2, 3, 5)])
def test_a_skip_inside_one_module_without_copies_trains(method, k, stash, use):
    torch.set_num_threads(1)
    _two_steps(method, k, stash, use, STORE)  # nothing crosses a module, no aux net copies a block of it


# ----------------------------------------------------------- 6. bf16 autocast on a CPU without bf16 instructions
@pytest.fixture
def fresh_bf16_check(monkeypatch):
    monkeypatch.setattr(runtime, "_BF16_CHECKED", False)


def _tiny_model() -> mlaan.LocalModel:
    torch.manual_seed(0)
    return mlaan.create_local_model("resnet20", "dgl", 2)


def _steps_warned(model: mlaan.LocalModel, steps: int = 2) -> list[str]:
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model.train_step(x, y)
    return [str(w.message) for w in caught if "bf16" in str(w.message)]


def test_users_own_bf16_autocast_on_a_cpu_without_bf16_warns_once(monkeypatch, fresh_bf16_check):
    torch.set_num_threads(1)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"fpu", "avx", "avx2", "fma"})  # an AVX2-only EPYC
    model = _tiny_model()
    warned = _steps_warned(model)
    assert len(warned) == 1 and "without AVX512-BF16 or AMX-BF16" in warned[0] and "fp32" in warned[0]
    assert _steps_warned(model) == []  # once per process


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, {"avx512_bf16", "amx_bf16"}])
def test_bf16_autocast_where_the_cpu_has_bf16_is_not_warned_of(monkeypatch, fresh_bf16_check, flags):
    torch.set_num_threads(1)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    assert _steps_warned(_tiny_model(), steps=1) == []


def test_a_models_own_bf16_autocast_dtype_is_warned_of_too(monkeypatch, fresh_bf16_check):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2"})
    with pytest.warns(RuntimeWarning, match="without AVX512-BF16"):
        runtime.warn_slow_bf16("cpu", torch.bfloat16)
    runtime.warn_slow_bf16("cpu", torch.bfloat16)  # once: no second warning (an error under -W error)


def test_make_demos_fast_path_on_an_avx2_only_cpu_is_fp32(monkeypatch):
    """The Makefile's FAST_PATH line itself, run with an AVX2-only CPU's flags: no --amp, and it says why."""
    import re
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    snippet = re.search(r"^FAST_PATH := (.*?\n(?:\t.*\n)*)", makefile, re.M).group(1)
    code = snippet.replace("\\\n", "\n").replace("\t", "").strip()
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"fpu", "avx", "avx2", "fma"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    scope: dict = {}
    exec(code.replace("; ", "\n"), scope)
    assert scope["flags"] == [] and "fp32 + channels_last (bf16 off: no bf16 instructions)" in scope["why"]
