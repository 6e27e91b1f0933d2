"""`mlaan bench accuracy`: arms and seeds, reuse and resume of runs, the folder's recipe, paired statistics."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlaan.bench import accuracy, cli, seeds


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "accuracy", "--dataset", "synthetic", "--arch", "resnet20", "--k", "2",
                              "--epochs", "1", "--output-dir", str(tmp_path / "out"), *extra])


class _FakeTrain:
    """Stands in for the `mlaan train` subprocess: records its command and writes the run's metrics."""

    commands: list[list[str]] = []

    def __init__(self, cmd, log) -> None:
        self.commands.append(cmd)
        folder = accuracy.Path(cmd[cmd.index("--output-dir") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        seed = int(cmd[cmd.index("--seed") + 1])
        error = 0.1 + 0.01 * seed + (0.05 if "--window" in cmd else 0.0)
        line = {"epoch": 1, "test_accuracy": 1 - error, "test_error": error, "train_loss": 1.0,
                "train_independent_losses": [1.0, 0.5]}
        (folder / "metrics.jsonl").write_text(json.dumps(line) + "\n")
        config = {"method": cmd[cmd.index("--method") + 1], "arch": "resnet20"}
        (folder / "metrics.json").write_text(json.dumps({"test_accuracy": 1 - error, "test_error": error,
                                                         "config": config}))
        self.returncode = 0

    def poll(self):
        return 0

    def wait(self):
        return 0


@pytest.fixture
def fake_train(monkeypatch):
    _FakeTrain.commands = []
    monkeypatch.setattr(accuracy, "start_process", _FakeTrain)
    monkeypatch.setattr(accuracy.time, "sleep", lambda s: None)
    return _FakeTrain.commands


def test_every_arm_and_seed_is_trained_once_then_reused(tmp_path, fake_train, capsys):
    # K=4: window=3 needs at least 3 local modules (`mlaan train` refuses it at K=2, and so does the harness now)
    args = _args(tmp_path, "--methods", "bp,dgl+mlaan", "--seeds", "0,1", "--vary", "window=2,3", "--jobs", "2",
                 "--k", "4")
    assert accuracy.run(args) == 0
    trained = sorted((c[c.index("--method") + 1], c[c.index("--seed") + 1], "--window" in c) for c in fake_train)
    # window=2 is the default: only window=3 adds an arm, and only for the method that reads it
    assert trained == sorted([("bp", s, False) for s in ("0", "1")]
                             + [("dgl+mlaan", s, w) for s in ("0", "1") for w in (False, True)])
    assert all(c[c.index("--threads") + 1] == "1" for c in fake_train)  # one thread per run with --jobs 2
    report = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert ", 1 thread per run, " in report["machine"]  # the runs' threads, not the harness's own
    summary = report["summary"]
    varied = next(e for e in summary if e["label"] == "dgl+mlaan window=3")
    assert varied["vs_plain"]["mean"] == pytest.approx(0.05) and varied["vs_plain"]["seeds"] == [0, 1]
    fake_train.clear()
    assert accuracy.run(args) == 0
    assert fake_train == [] and "finished earlier, kept" in capsys.readouterr().out


def test_report_only_trains_nothing(tmp_path, fake_train, capsys):
    assert accuracy.run(_args(tmp_path, "--methods", "dgl")) == 0
    fake_train.clear()
    partial = tmp_path / "out" / "bp" / "seed0"  # stopped in its first epoch
    partial.mkdir(parents=True)
    (partial / "last.pt").write_bytes(b"")
    (partial / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 7, "complete": False,
                                                       "test_accuracy": 0.5}) + "\n")
    capsys.readouterr()
    assert accuracy.run(_args(tmp_path, "--methods", "dgl,dgl+mlaan,bp", "--report-only")) == 0
    assert fake_train == [] and "| dgl " in (tmp_path / "out" / "accuracy.md").read_text()
    out = capsys.readouterr().out
    assert "dgl+mlaan seed 0: not started" in out
    assert "bp seed 0: unfinished, 0 of 1 epoch (step 7), test accuracy 50.00% so far" in out


def test_report_only_of_an_empty_folder_is_one_line(tmp_path, fake_train, capsys):
    from mlaan.cli import main

    assert main(["bench", "accuracy", "--methods", "dgl", "--output-dir", str(tmp_path / "empty"),
                 "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlaan: error: --report-only: ") and "holds no run with metrics yet" in err
    assert fake_train == []


def test_an_unfinished_run_is_continued_with_resume(tmp_path, fake_train):
    folder = tmp_path / "out" / "dgl" / "seed0"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"")  # what an interrupted run leaves: a checkpoint, no metrics.json
    assert accuracy.run(_args(tmp_path, "--methods", "dgl,dgl+mlaan")) == 0
    resumed = {c[c.index("--method") + 1]: "--resume" in c for c in fake_train}
    assert resumed == {"dgl": True, "dgl+mlaan": False}


def test_a_run_another_process_is_training_is_left_to_it(tmp_path, fake_train, capsys):
    from mlaan.training.safety import RunFolderLock

    held = RunFolderLock(tmp_path / "out" / "dgl" / "seed0")
    held.acquire()  # as a second harness on the same folder would, through its `mlaan train`
    try:
        assert RunFolderLock.holder(held.folder).startswith(f"process {os.getpid()} on ")
        assert accuracy.run(_args(tmp_path, "--methods", "dgl,bp")) == accuracy.NOT_DONE_YET == 75
        assert [c[c.index("--method") + 1] for c in fake_train] == ["bp"]
        captured = capsys.readouterr()
        assert f"dgl seed 0: being trained by process {os.getpid()} on " in captured.out
        assert ", left to it" in captured.out
        assert captured.err == ("mlaan bench accuracy: not finished yet, being trained by another process: dgl seed 0; "
                                "run the same command again when they are done to report them too\n")
        assert accuracy.run(_args(tmp_path, "--methods", "dgl,bp", "--report-only")) == 0
        assert "dgl seed 0: unfinished, no epoch logged yet, being trained by process" in capsys.readouterr().out
    finally:
        held.release()
    assert RunFolderLock.holder(held.folder) is None and not (held.folder / held.OWNER_NAME).exists()
    assert accuracy.run(_args(tmp_path, "--methods", "dgl,bp")) == 0
    assert [c[c.index("--method") + 1] for c in fake_train] == ["bp", "dgl"]


def test_a_run_another_harness_has_claimed_is_left_to_it(tmp_path, fake_train, capsys):
    """Two invocations started together: the second finds the first's claim on the folder (taken before its
    `mlaan train` starts up and locks the folder itself) and leaves the run alone, instead of starting it too."""
    from mlaan.training.safety import HarnessClaim

    claim = HarnessClaim(tmp_path / "out" / "dgl" / "seed0")
    assert claim.try_acquire() is None
    try:
        assert accuracy.run(_args(tmp_path, "--methods", "dgl,bp")) == accuracy.NOT_DONE_YET
        assert [c[c.index("--method") + 1] for c in fake_train] == ["bp"]
        assert "dgl seed 0: being trained by process" in capsys.readouterr().out
    finally:
        claim.release()
    assert HarnessClaim.holder(claim.folder) is None  # each run's claim is given back when it ends
    assert HarnessClaim.holder(tmp_path / "out" / "bp" / "seed0") is None


def test_a_comparison_whose_every_run_is_elsewhere_is_not_done_rather_than_failed(tmp_path, fake_train, capsys):
    """Two invocations started together: the second one has nothing to train and no metrics to report yet."""
    from mlaan.training.safety import HarnessClaim

    claim = HarnessClaim(tmp_path / "out" / "dgl" / "seed0")
    assert claim.try_acquire() is None
    try:
        assert accuracy.run(_args(tmp_path, "--methods", "dgl")) == accuracy.NOT_DONE_YET
    finally:
        claim.release()
    assert fake_train == [] and not (tmp_path / "out" / "accuracy.md").exists()
    assert "not finished yet, being trained by another process: dgl seed 0" in capsys.readouterr().err


def test_a_recipe_none_of_whose_runs_saved_anything_is_replaced(tmp_path, fake_train):
    """A first invocation whose runs all failed at start-up (a bad --train-arg) must not lock the folder."""
    (tmp_path / "out" / "dgl" / "seed0").mkdir(parents=True)  # what the failed run left: its folder, no files
    accuracy.check_recipe(tmp_path / "out", {**accuracy._recipe(_args(tmp_path)), "epochs": 9})
    assert accuracy.run(_args(tmp_path, "--methods", "dgl")) == 0
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["epochs"] == 1


def test_a_folder_keeps_its_recipe(tmp_path, fake_train):
    assert accuracy.run(_args(tmp_path, "--methods", "dgl")) == 0
    assert accuracy.run(_args(tmp_path, "--methods", "dgl+mlaan", "--seeds", "3")) == 0  # adding is fine
    with pytest.raises(ValueError, match=r"holds runs of another recipe \(epochs: 1 there, 2 now\)"):
        accuracy.run(_args(tmp_path, "--methods", "dgl", "--epochs", "2"))


class _StoppableTrain:
    """A `mlaan train` stand-in that runs until it gets a signal, then "saves" (last.pt) and exits 128 + signum
    (or, with ``dies``, is killed by it: a run still starting up). When the first one starts, ``stop_first``
    sends it SIGTERM (a run killed from outside) and ``ctrl_c_at_start`` sends the harness SIGINT; at the first
    one's first poll, ``harness_signals`` are sent to the harness in quick succession."""

    started: list[_StoppableTrain] = []
    stop_first = ctrl_c_at_start = dies = saved_before = False
    harness_signals: tuple[int, ...] = ()

    def __init__(self, cmd, log) -> None:
        self.cmd, self.signals, self.returncode, self.polled = cmd, [], None, False
        self.folder = accuracy.Path(cmd[cmd.index("--output-dir") + 1])
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.saved_before:  # a periodic save before the signal came
            (self.folder / "last.pt").write_bytes(b"")
        self.started.append(self)
        if self.stop_first and len(self.started) == 1:
            self.send_signal(signal.SIGTERM)
        if self.ctrl_c_at_start and len(self.started) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    def send_signal(self, signum) -> None:
        self.signals.append(signum)
        if self.returncode is None and not self.dies:
            (self.folder / "last.pt").write_bytes(b"")
        self.returncode = -signum if self.dies else 128 + signum

    def poll(self):
        if not self.polled and self is self.started[0]:
            self.polled = True
            for signum in self.harness_signals:
                os.kill(os.getpid(), signum)
        return self.returncode

    def wait(self):
        return self.returncode


@pytest.fixture
def stoppable_train(monkeypatch):
    # A background job of a non-interactive shell starts with SIGINT ignored, and the harness leaves an ignored
    # signal alone: without this a Ctrl-C test run that way would wait forever for a stop that never comes.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(_StoppableTrain, "started", [])
    for flag in ("stop_first", "ctrl_c_at_start", "dies", "saved_before"):
        monkeypatch.setattr(_StoppableTrain, flag, False)
    monkeypatch.setattr(_StoppableTrain, "harness_signals", ())
    monkeypatch.setattr(accuracy, "start_process", _StoppableTrain)
    yield _StoppableTrain
    signal.signal(signal.SIGINT, previous)


def test_a_run_stopped_by_a_signal_stops_the_comparison(tmp_path, stoppable_train, monkeypatch, capsys):
    stoppable_train.stop_first = True
    monkeypatch.setattr(accuracy.time, "sleep", lambda s: None)
    code = accuracy.run(_args(tmp_path, "--methods", "dgl,dgl+mlaan,bp", "--jobs", "2"))
    first, second = stoppable_train.started  # bp never starts
    assert code == 128 + signal.SIGTERM
    assert first.signals == [signal.SIGTERM] and second.signals == [signal.SIGTERM]  # passed on, once
    out, err = capsys.readouterr()
    assert "dgl seed 0: stopped by SIGTERM, checkpoint saved" in out and "FAILED" not in out
    assert "dgl seed 0 was stopped by SIGTERM: stopping the comparison" in out
    assert "stopping (SIGTERM): 1 running run(s) save their checkpoint, 1 not started" in out
    assert err.strip() == "mlaan bench accuracy: stopped by SIGTERM; run the same command again to continue"


def test_a_signal_to_the_harness_reaches_every_run_once(tmp_path, stoppable_train, monkeypatch, capsys):
    monkeypatch.setattr(accuracy.time, "sleep", lambda s: None)
    stoppable_train.ctrl_c_at_start = True  # Ctrl-C reaches the harness (alone) once the first run is going
    code = accuracy.run(_args(tmp_path, "--methods", "dgl,bp", "--jobs", "1"))
    (only,) = stoppable_train.started  # bp never starts
    assert code == 130 and only.signals == [signal.SIGINT]
    assert "stopping (SIGINT): 1 running run(s) save their checkpoint, 1 not started" in capsys.readouterr().out


def test_quick_signals_are_each_passed_on_at_once_and_the_harness_waits(tmp_path, stoppable_train, monkeypatch):
    """Two SIGTERMs within a moment (say a scheduler's and then a user's): the runs get both, at once — not just
    the first, a second later — and the harness outlives them, so that none is left orphaned."""
    monkeypatch.setattr(accuracy.time, "sleep", lambda s: None)
    stoppable_train.harness_signals = (signal.SIGTERM, signal.SIGTERM)
    code = accuracy.run(_args(tmp_path, "--methods", "dgl,bp", "--jobs", "2"))
    first, second = stoppable_train.started
    assert code == 143 and first.signals == second.signals == [signal.SIGTERM, signal.SIGTERM]


def test_a_run_stopped_while_starting_up_is_not_a_failure(tmp_path, stoppable_train, monkeypatch, capsys):
    monkeypatch.setattr(accuracy.time, "sleep", lambda s: None)
    stoppable_train.ctrl_c_at_start = stoppable_train.dies = True  # killed before its handlers were set
    assert accuracy.run(_args(tmp_path, "--methods", "dgl,bp")) == 130
    out = capsys.readouterr().out
    assert "dgl seed 0: stopped by SIGINT while starting up" in out and "FAILED" not in out


def test_a_run_killed_between_periodic_saves_says_where_it_continues(tmp_path, stoppable_train, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(accuracy.time, "sleep", lambda s: None)
    stoppable_train.ctrl_c_at_start = stoppable_train.dies = stoppable_train.saved_before = True
    assert accuracy.run(_args(tmp_path, "--methods", "dgl,bp")) == 130
    out = capsys.readouterr().out
    assert ("dgl seed 0: stopped by SIGINT before a step boundary: it continues from its last periodic save"
            in out) and "FAILED" not in out and "starting up" not in out


@pytest.mark.parametrize(("flags", "message"), [
    (["--seeds", "0,x"], r"--seeds: 'x' is not a non-negative integer"),
    (["--vary", "windw=3"], r"--vary: unknown option 'windw'"),
    (["--vary", "window"], r"--vary 'window': expected OPTION=V1,V2"),
    (["--arm", "nolabel"], r"--arm 'nolabel': expected LABEL="),
    (["--jobs", "0"], r"--jobs must be at least 1, got 0"),
    (["--arch", "resnet20", "--k", "30", "--methods", "bp,dgl"], r"--k 30 is too large for resnet20 \(allowed 1 to 10"),
    # extra flags setting what the harness sets for every run: a row labelled bp trained dgl (breaker finding)
    (["--methods", "bp,dgl", "--train-arg", "--method dgl"], r"--train-arg '--method dgl': sets method, which "
                                                              r"`bench accuracy` sets .* use --methods instead"),
    (["--train-arg", "-K 4"], r"sets local_modules, .* use --k instead"),
    (["--train-arg", "--epoch 2 --outp x"], r"sets epochs, .* use --epochs instead"),  # abbreviations too
    (["--arm", "x=--seed 7"], r"--arm/--vary 'x': sets seed, .* use --seeds instead"),
    (["--train-arg", "--max-steps 3"], r"--max-steps is not allowed in `bench accuracy`"),
])
def test_bad_harness_input_is_one_line_exit_2(tmp_path, capsys, flags, message):
    from mlaan import cli as main_cli

    code = main_cli.main(["bench", "accuracy", "--output-dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


@pytest.mark.parametrize(("flags", "message"), [
    (["--methods", "bp,dgl+mlaan", "--vary", "lam_trunk=copies,twins", "--train-arg=--ema-update last"],
     r"dgl\+mlaan lam_trunk=twins \(its flags: --lam-trunk twins\): `mlaan train` refuses its command line: "
     r"lam_trunk 'twins' needs ema_update 'all'"),
    (["--methods", "dgl", "--train-arg=--windw 3"], r"dgl: `mlaan train` refuses its command line: "
                                                     r"unrecognized arguments: --windw 3"),
    (["--methods", "dgl", "--arm", "x=--lr nan"], r"dgl x \(its flags: --lr nan\): .*nan"),
])
def test_every_runs_command_line_is_checked_before_any_run_starts(tmp_path, fake_train, capsys, flags, message):
    """A bad arm (the engine refuses lam_trunk twins with ema_update last) failed only once the runs before it had
    trained, hours in; now every arm's whole `mlaan train` command line is resolved first (as --print-config does):
    one line, exit 2, no run started and no folder written."""
    from mlaan import cli as main_cli

    out = tmp_path / "out"
    code = main_cli.main(["bench", "accuracy", "--dataset", "synthetic", "--arch", "resnet20", "--k", "2",
                          "--epochs", "1", "--output-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mlaan: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert fake_train == [] and not out.exists()


def test_arm_flags_follow_the_recipe_so_they_win():
    arms = accuracy.parse_arms(["dgl+mlaan"], ["bf16+cl=--amp --channels-last"], ["aux_head=linear,mlp",
                                                                                "grad_checkpointing=true"])
    assert [a.label for a in arms] == ["dgl+mlaan", "dgl+mlaan bf16+cl", "dgl+mlaan aux_head=mlp",
                                       "dgl+mlaan grad_checkpointing=true"]
    assert arms[1].flags == ("--amp", "--channels-last") and arms[3].flags == ("--grad-checkpointing",)
    ns = argparse.Namespace(arch="resnet20", k=2, dataset="synthetic", epochs=1, batch_size=8, lr=0.1,
                            weight_decay=0.0, warmup_epochs=0.0, train_samples=0, test_samples=None,
                            data_root=None, device=None, save_every=None, train_arg=["--no-amp"])
    cmd = accuracy.train_command(ns, arms[1], 0, accuracy.Path("x"), None)
    assert cmd[0] == sys.executable and cmd.index("--no-amp") < cmd.index("--amp")


@pytest.mark.parametrize("arch", ["torchvision:vgg11_bn", "timm:vit_tiny_patch16_224"])
def test_library_archs_are_accepted_and_image_size_goes_to_every_run(tmp_path, fake_train, arch):
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    args = _args(tmp_path, "--methods", "bp,dgl", "--arch", arch, "--image-size", "32")
    assert accuracy.run(args) == 0
    assert all(c[c.index("--arch") + 1] == arch and c[c.index("--image-size") + 1] == "32" for c in fake_train)
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["image_size"] == 32
    with pytest.raises(ValueError, match=r"image_size: 32 there, None now"):  # part of the folder's recipe
        accuracy.run(_args(tmp_path, "--methods", "bp", "--arch", arch))
    fake_train.clear()
    assert accuracy.run(_args(tmp_path / "b", "--methods", "bp", "--arch", arch)) == 0  # the arch's own size
    assert "--image-size" not in fake_train[0]
    assert "image_size" not in json.loads((tmp_path / "b" / "out" / "recipe.json").read_text())


@pytest.mark.parametrize(("command", "flags", "message"), [
    ("accuracy", ["--arch", "torchvision:nonet"], r"unknown or unsupported torchvision model 'nonet'"),
    ("accuracy", ["--arch", "vgg"], r"unknown architecture 'vgg'; available: .*torchvision:NAME / timm:NAME"),
    ("accuracy", ["--image-size", "0"], r"--image-size must be at least 1, got 0"),
    ("memory", ["--archs", "torchvision:nonet"], r"unknown or unsupported torchvision model 'nonet'"),
])
def test_bad_arch_in_a_bench_is_the_librarys_one_line_error(tmp_path, capsys, command, flags, message):
    from mlaan import cli as main_cli

    code = main_cli.main(["bench", command, "--output-dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_memory_bench_takes_a_library_arch_at_an_image_size(tmp_path):
    from mlaan.bench import memory

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "memory", "--archs", "torchvision:vgg11_bn", "--image-size", "32", "--ks",
                              "2", "--methods", "bp,dgl", "--batch", "2", "--mode", "account", "--no-isolate",
                              "--grad-checkpointing", "off", "--output-dir", str(tmp_path / "m")])
    assert memory.run(args) == 0
    results = json.loads((tmp_path / "m" / "memory.json").read_text())["results"]
    assert [(r["method"], r["k"], r["image_size"]) for r in results] == [("bp", 1, 32), ("dgl", 2, 32)]
    assert all(r["peak_bytes"] > 0 and "error" not in r for r in results)


# ------------------------------------------------------------------------------------------- statistics
def test_paired_differences_use_only_common_seeds():
    d = seeds.paired_difference({0: 0.10, 1: 0.14, 2: 0.30}, {0: 0.12, 1: 0.15})
    assert d["seeds"] == [0, 1] and d["values"] == pytest.approx([-0.02, -0.01])
    assert d["mean"] == pytest.approx(-0.015) and d["std"] == pytest.approx(0.00707, abs=1e-5)
    assert seeds.mean_std([0.2]) == (0.2, None) and seeds.mean_std([]) == (None, None)


def test_epoch_band_takes_a_resumed_epochs_later_line():
    runs = [{"epochs": [{"epoch": 1, "test_error": 0.5}, {"epoch": 1, "test_error": 0.4},
                        {"epoch": 2, "test_error": 0.3}]},
            {"epochs": [{"epoch": 1, "test_error": 0.6}]}]
    epochs, mean, low, high = seeds.epoch_band(runs, "test_error")
    assert epochs == [1, 2] and mean == pytest.approx([0.5, 0.3]) and (low[0], high[0]) == (0.4, 0.6)


def test_an_unfinished_run_is_compared_epoch_for_epoch_with_the_same_seed():
    def run(label, seed, errors, finished, partial=None):
        epochs = [{"epoch": e, "complete": True, "test_error": x} for e, x in enumerate(errors, 1)]
        if partial is not None:  # an epoch cut off mid-way: not compared
            epochs.append({"epoch": len(errors) + 1, "complete": False, "test_error": partial})
        return {"label": label, "method": label.split()[0], "seed": seed, "finished": finished, "epochs": epochs}

    runs = [run("bp", 0, [0.5, 0.3, 0.2, 0.1], True), run("bp", 1, [0.6, 0.4, 0.25, 0.12], True),
            run("dgl+mlaan", 0, [0.55, 0.35, 0.22, 0.11], True),
            run("dgl+mlaan twins", 0, [0.52, 0.33], False, partial=0.01),
            run("dgl+mlaan twins", 1, [0.62], False), run("dgl+mlaan twins", 2, [], False)]
    standing = seeds.interim(runs)
    assert [(e["label"], e["seed"], e["epoch"]) for e in standing] == [("dgl+mlaan twins", 0, 2),
                                                                       ("dgl+mlaan twins", 1, 1)]
    assert standing[0]["test_error"] == 0.33  # its last complete epoch, not the cut-off one
    assert standing[0]["versus"] == {"bp": 0.3, "dgl+mlaan": 0.35}  # seed 0's runs at epoch 2
    assert standing[1]["versus"] == {"bp": 0.6}  # seed 1: no finished dgl+mlaan run
    text = seeds.interim_table(standing)
    assert "| dgl+mlaan twins | 0    | 2     | 33.00" in text and "30.00 (+3.00)" in text and "35.00 (-2.00)" in text
    assert seeds.interim([runs[0]]) == [] and seeds.interim_table([]) == ""


def _harness_mid_run(out: Path) -> subprocess.Popen:
    """A real `bench accuracy` of dgl then bp (500 epochs of a tiny synthetic set), returned once dgl has logged
    its first epoch: mid-run."""
    cmd = [sys.executable, "-m", "mlaan", "bench", "accuracy", "--methods", "dgl,bp", "--dataset", "synthetic",
           "--arch", "resnet20", "--k", "3", "--epochs", "500", "--batch-size", "32", "--threads", "1",
           "--train-arg", "--synthetic-train-size 64 --synthetic-test-size 32 --workers 0", "--output-dir", str(out)]
    harness = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 300
    while not (out / "dgl" / "seed0" / "metrics.jsonl").exists():
        assert harness.poll() is None and time.monotonic() < deadline, harness.communicate()
        time.sleep(0.2)
    return harness


def test_sigterm_to_the_harness_alone_stops_and_saves_its_runs(tmp_path):
    """`kill PID` of the harness (its runs are not signalled): the running run saves at a step boundary, the next
    one never starts, the harness waits for it and exits 143 — no run is left behind, orphaned."""
    out = tmp_path / "out"
    try:
        harness = _harness_mid_run(out)
        harness.send_signal(signal.SIGTERM)
        stdout, stderr = harness.communicate(timeout=300)
    finally:
        orphans = _kill_runs_under(out)
    log = (out / "logs" / "dgl-seed0.log").read_text()
    assert harness.returncode == 143 and orphans == [], stderr.decode()
    assert "mlaan: stopped by SIGTERM at step" in log and "Traceback" not in log
    assert (out / "dgl" / "seed0" / "last.pt").exists() and not (out / "bp").exists()
    assert "dgl seed 0: stopped by SIGTERM, checkpoint saved" in stdout.decode()
    assert stderr.decode().strip().endswith("stopped by SIGTERM; run the same command again to continue")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_harness_leaves_no_run_training_orphaned(tmp_path):
    """SIGKILL of the harness (or the OOM killer) gives it no chance to pass anything on: its run is sent SIGTERM
    by the kernel, saves at a step boundary and exits; the same command would continue it."""
    out = tmp_path / "out"
    try:
        harness = _harness_mid_run(out)
        harness.kill()
        harness.communicate(timeout=60)
        log = out / "logs" / "dgl-seed0.log"
        deadline = time.monotonic() + 120
        while "mlaan: stopped by SIGTERM at step" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # the run's last words are logged just before it exits
    finally:
        orphans = _kill_runs_under(out)
    assert orphans == [] and "Traceback" not in log.read_text(), log.read_text()[-2000:]
    assert "mlaan: stopped by SIGTERM at step" in log.read_text()
    assert (out / "dgl" / "seed0" / "last.pt").exists() and not (out / "bp").exists()


def _kill_runs_under(out) -> list[int]:
    """SIGKILL every process whose command line names ``out`` (a test's leftovers); returns their pids."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(out) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def test_modules_are_measured_once_per_finished_run_and_tabled(tmp_path, fake_train, monkeypatch, capsys):
    evals = []

    def fake_eval(cmd):  # `mlaan eval --checkpoint RUN/last.pt --modules --json`
        evals.append(cmd)
        folder = Path(cmd[cmd.index("--checkpoint") + 1]).parent
        own = [0.5] if folder.parent.name == "bp" else [0.25, 0.5, 0.75]
        cascaded = [None, 0.6, 0.75] if "mlaan" in folder.parent.name else own
        if folder.parent.name == "dgl":
            return subprocess.CompletedProcess(cmd, 2, "", "mlaan: error: something\n")
        body = {"test_accuracy": own[-1], "module_accuracies": {"independent": own, "cascaded": cascaded}}
        return subprocess.CompletedProcess(cmd, 0, json.dumps(body), "")

    monkeypatch.setattr(accuracy, "run_eval", fake_eval)
    assert accuracy.run(_args(tmp_path, "--methods", "bp,dgl,dgl+mlaan")) == 0
    for folder in (tmp_path / "out").glob("*/seed0"):
        (folder / "last.pt").write_bytes(b"")  # the fake runs write no checkpoint
    assert accuracy.run(_args(tmp_path, "--methods", "bp,dgl,dgl+mlaan", "--modules", "--report-only")) == 1
    assert "dgl/seed0: mlaan eval FAILED (exit 2): mlaan: error: something" in capsys.readouterr().out
    assert len(evals) == 3 and all("--modules" in c and "--json" in c for c in evals)
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "| bp        |   |      | 50.0 |" in md  # end-to-end: the network under the last module
    assert "| dgl+mlaan | — | 60.0 | 75.0 |" in md  # the cascaded aux net; the first module has none
    runs = {r["method"]: r for r in json.loads((tmp_path / "out" / "accuracy.json").read_text())["runs"]}
    assert runs["dgl+mlaan"]["module_accuracies"]["cascaded"] == [None, 0.6, 0.75]
    assert runs["dgl"]["module_accuracies"] is None
    evals.clear()
    accuracy.run(_args(tmp_path, "--methods", "bp,dgl,dgl+mlaan", "--modules", "--report-only"))
    assert [Path(c[c.index("--checkpoint") + 1]).parent.parent.name for c in evals] == ["dgl"]  # the rest kept


def test_main_path_takes_the_aux_net_that_trains_each_module():
    own, cascaded = [0.1, 0.2, 0.3, 0.9], [None, 0.8, 0.85, None]
    assert seeds.main_path(own, None) == own  # no MLM: each module's own aux net
    assert seeds.main_path(own, [None] * 4) == own
    assert seeds.main_path(own, [None, None, None, 0.9]) == own  # `mlaan eval --modules` of a DGL run
    # MLM: the cascaded aux nets; the first module has none (not its chance-level independent one); the last
    # module is the network itself on either path
    assert seeds.main_path(own, cascaded) == [None, 0.8, 0.85, 0.9]
    runs = [{"method": "dgl+mlaan", "module_accuracies": {"independent": own, "cascaded": c}}
            for c in ([None, 0.5, 0.75, None], [None, 0.25, 0.5, None])]  # exact in binary: exact means
    assert seeds.module_accuracy_means(runs) == {"dgl+mlaan": [None, 0.375, 0.625, 0.9]}


def test_a_one_epoch_recipe_is_titled_in_the_singular(tmp_path, fake_train, capsys):
    assert accuracy.run(_args(tmp_path, "--methods", "dgl")) == 0
    title = (tmp_path / "out" / "accuracy.md").read_text().splitlines()[0]
    assert title.startswith("# synthetic, resnet20 K=2, 1 epoch, batch ")
    assert ", 1 epoch, batch " in capsys.readouterr().out  # the line the harness starts with
    assert ", 2 epochs, " in accuracy.report_title(_args(tmp_path, "--epochs", "2"))


def test_epochs_and_modules_are_ticked_at_whole_numbers(tmp_path, saved_figures):
    measured = {"independent": [0.2, 0.4, 0.6], "cascaded": None}
    runs = [{"method": method, "seed": 0, "module_accuracies": measured if method == "dgl" else None,
             "epochs": [{"epoch": e, "test_error": 0.5 / e, "train_independent_losses": [1.0, 0.8, 0.5 / e]}
                        for e in (1, 2)]} for method in ("bp", "dgl")]
    seeds.plot(runs, tmp_path / "curves.png", "t")
    (fig,) = saved_figures
    assert len(fig.axes) == 3 and (tmp_path / "curves.png").is_file()
    for ax in fig.axes:  # epochs 1, 2; modules 1 to 3: matplotlib's own ticks would fall at 1.25, 1.5, …
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_merge_reports_an_earlier_reports_runs_and_trains_only_what_it_lacks(tmp_path, fake_train, capsys):
    earlier = tmp_path / "earlier"
    assert accuracy.run(_args(tmp_path, "--methods", "bp,dgl", "--output-dir", str(earlier))) == 0
    fake_train.clear()
    capsys.readouterr()
    args = _args(tmp_path, "--methods", "bp,dgl,dgl+mlaan", "--merge", str(earlier))  # a folder: its accuracy.json
    assert accuracy.run(args) == 0
    assert [c[c.index("--method") + 1] for c in fake_train] == ["dgl+mlaan"]
    assert f"bp seed 0: finished in {earlier / 'accuracy.json'} (--merge), kept" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert [r["label"] for r in report["summary"]] == ["bp", "dgl", "dgl+mlaan"]
    mlaan = next(r for r in report["summary"] if r["label"] == "dgl+mlaan")
    assert mlaan["vs_bp"]["mean"] == pytest.approx(0.0) and mlaan["vs_base"]["seeds"] == [0]  # paired across
    (source,) = report["merged"]
    assert source["runs"] == ["bp s0", "dgl s0"] and "thread" in source["machine"]
    assert {r["label"]: r.get("source") for r in report["runs"]} == {
        "bp": str(earlier / "accuracy.json"), "dgl": str(earlier / "accuracy.json"), "dgl+mlaan": None}
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert f"Merged from {earlier / 'accuracy.json'} (bp s0, dgl s0), machine: " in md


def test_a_run_of_the_output_folder_wins_over_a_merged_one(tmp_path, fake_train):
    earlier = tmp_path / "earlier"
    assert accuracy.run(_args(tmp_path, "--methods", "dgl", "--output-dir", str(earlier))) == 0
    data = json.loads((earlier / "accuracy.json").read_text())
    data["runs"][0]["test_error"] = 0.5  # tell the two apart
    (earlier / "accuracy.json").write_text(json.dumps(data))
    assert accuracy.run(_args(tmp_path, "--methods", "dgl")) == 0
    assert accuracy.run(_args(tmp_path, "--methods", "dgl", "--merge", str(earlier / "accuracy.json"))) == 0
    report = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert [r["test_error"] for r in report["runs"]] == [pytest.approx(0.1)] and report["merged"] == []


def test_merge_refuses_a_report_of_another_recipe_or_none(tmp_path, fake_train, capsys):
    from mlaan.cli import main

    earlier = tmp_path / "earlier"
    assert accuracy.run(_args(tmp_path, "--methods", "dgl", "--output-dir", str(earlier))) == 0
    with pytest.raises(ValueError, match=r"--merge .*another recipe \(epochs: 1 there, 2 now\)"):
        accuracy.run(_args(tmp_path, "--methods", "dgl", "--merge", str(earlier), "--epochs", "2"))
    capsys.readouterr()
    assert main(["bench", "accuracy", "--methods", "dgl", "--merge", str(tmp_path / "nowhere.json"),
                 "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere.json: no such report" in err
    assert len(fake_train) == 1 and not (tmp_path / "x").exists()  # refused before training or writing anything


def test_a_merged_report_that_merged_others_keeps_their_machines(tmp_path, fake_train):
    first, second = tmp_path / "first", tmp_path / "second"
    assert accuracy.run(_args(tmp_path, "--methods", "bp", "--output-dir", str(first))) == 0
    data = json.loads((first / "accuracy.json").read_text())
    data["machine"] = "machine A"
    (first / "accuracy.json").write_text(json.dumps(data))
    assert accuracy.run(_args(tmp_path, "--methods", "bp,dgl", "--output-dir", str(second), "--merge", str(first))) == 0
    assert accuracy.run(_args(tmp_path, "--methods", "bp,dgl", "--merge", str(second), "--report-only")) == 0
    (source,) = json.loads((tmp_path / "out" / "accuracy.json").read_text())["merged"]
    assert source["runs"] == ["bp s0", "dgl s0"]
    assert source["machine"].endswith(f"; bp s0 from {first / 'accuracy.json'}, machine: machine A")


@pytest.mark.parametrize("report, why", [
    ({"recipe": None, "runs": []}, "not an accuracy.json of `mlaan bench accuracy`"),
    ({"recipe": {}, "runs": []}, "a report of another recipe (arch: None there, 'resnet20' now;"),
    ({"runs": [{"finished": True, "method": "dgl", "seed": "s1", "test_error": 0.1}]}, "seed 's1' (expected"),
    ({"runs": [{"finished": True, "method": "dgl", "seed": 0}]}, "dgl seed 0 has no test_error"),
])
def test_merge_refuses_a_malformed_report_in_one_line(tmp_path, fake_train, report, why):
    assert accuracy.run(_args(tmp_path, "--methods", "dgl", "--output-dir", str(tmp_path / "earlier"))) == 0
    recorded = json.loads((tmp_path / "earlier" / "accuracy.json").read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"recipe": recorded["recipe"], **report}))
    with pytest.raises(ValueError, match=re.escape(f"--merge {bad}: ") + ".*" + re.escape(why)):
        accuracy.run(_args(tmp_path, "--methods", "dgl", "--merge", str(bad)))


def test_a_merged_runs_seed_written_as_text_pairs_and_is_stored_as_a_number(tmp_path, fake_train):
    earlier = tmp_path / "earlier"
    assert accuracy.run(_args(tmp_path, "--methods", "bp", "--output-dir", str(earlier))) == 0
    data = json.loads((earlier / "accuracy.json").read_text())
    data["runs"][0].update(seed="0", variant=None, label=None)
    (earlier / "accuracy.json").write_text(json.dumps(data))
    assert accuracy.run(_args(tmp_path, "--methods", "bp,dgl", "--merge", str(earlier))) == 0
    report = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert [(r["label"], r["seed"], r["variant"]) for r in report["runs"]] == [("bp", 0, ""), ("dgl", 0, "")]
    assert next(r for r in report["summary"] if r["label"] == "dgl")["vs_bp"]["seeds"] == [0]


def test_vary_labels_a_choice_as_the_option_spells_it():
    arms = accuracy.parse_arms(["dgl"], [], ["aux_head=MLP", "ema_momentum=0.990"])
    assert [a.label for a in arms] == ["dgl", "dgl aux_head=mlp"]  # dgl has no EMA twins: not varied
    assert accuracy.parse_arms(["dgl+mlaan"], [], ["ema_momentum=0.990"])[1].label == "dgl+mlaan ema_momentum=0.990"
