"""`mlaan train --resume` and the output folder: a resumed run is the same run wherever it is written, never mixed
with another run's files; an empty `--output-dir`, a folder in use and `--overwrite` are handled safely."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_reliability import TINY, assert_one_line_error, cli, snapshot

import mlaan
from mlaan.cli import main
from mlaan.engine.options import options_unused_by
from mlaan.training import checkpoint as ckpt_io
from mlaan.training import export, safety
from mlaan.training.resume import check_resume_config
from mlaan.training.run_folder import RUN_FILES

RUN = [*TINY, "--threads", "1", "--epochs", "1"]  # 2 steps per epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs of different seeds: ``finished`` (seed 0, its one epoch done) and ``stopped`` (seed 7,
    stopped by --max-steps after 1 of its 2 steps)."""
    root = tmp_path_factory.mktemp("resume-folders")
    folders = {"finished": root / "finished", "stopped": root / "stopped"}
    for name, extra in (("finished", []), ("stopped", ["--seed", "7", "--max-steps", "1"])):
        assert main([str(a) for a in ["train", *RUN, *extra, "--output-dir", folders[name]]]) == 0
    return folders


def seeds(folder: Path) -> dict[str, int]:
    return {name: ckpt_io.load_training_checkpoint(folder / name)["config"]["seed"]
            for name in ("last.pt", "best.pt") if (folder / name).exists()}


def test_resume_into_a_folder_holding_another_run_is_refused_unless_overwrite(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs["finished"], other)
    before = snapshot(other)
    resume = ["train", *RUN, "--seed", "7", "--max-steps", "2", "--output-dir", other,
              "--resume", runs["stopped"] / "last.pt"]
    code, _, err = cli(capsys, *resume)
    assert_one_line_error(code, err, [str(other), "already holds run files", str(runs["stopped"]), "--overwrite"])
    assert snapshot(other) == before

    code, _, err = cli(capsys, *resume, "--overwrite")
    assert code == 0, err
    assert seeds(other) == {"last.pt": 7, "best.pt": 7}  # nothing of the seed-0 run left beside the seed-7 one
    lines = [json.loads(x) for x in (other / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in lines] == [(1, 2)]  # the resumed run's epoch, its only line
    assert json.loads((other / "metrics.json").read_text())["config"]["seed"] == 7


def test_resume_back_into_an_earlier_folder_of_the_chain_is_refused_without_calling_it_another_run(
        runs, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(runs["stopped"], first)
    code, _, err = cli(capsys, "train", *RUN, "--output-dir", second, "--resume", first / "last.pt")
    assert code == 0, err
    before = snapshot(first)
    code, _, err = cli(capsys, "train", *RUN, "--output-dir", first, "--resume", second / "last.pt")
    assert_one_line_error(code, err, [f"output dir {first} already holds run files", str(second), "--overwrite"])
    assert "another run" not in err and snapshot(first) == before


def test_resume_into_a_new_folder_refuses_changed_options(runs, tmp_path, capsys):
    before = snapshot(runs["stopped"])
    code, _, err = cli(capsys, "train", *RUN, "--seed", "7", "--lr", "0.3", "--output-dir", tmp_path / "fork",
                       "--resume", runs["stopped"] / "last.pt")
    assert_one_line_error(code, err, ["lr: 0.1 in the run, 0.3 given"])
    assert not (tmp_path / "fork").exists() and snapshot(runs["stopped"]) == before


def test_a_finished_run_resumed_into_a_new_folder_is_carried_over(runs, tmp_path, capsys):
    moved = tmp_path / "moved"
    code, out, err = cli(capsys, "train", *RUN, "--max-steps", "5", "--output-dir", moved,
                         "--resume", runs["finished"] / "last.pt")
    assert code == 0, err
    for name in ("last.pt", "best.pt", "metrics.jsonl"):  # the run as it was: nothing was left to train
        assert (moved / name).read_bytes() == (runs["finished"] / name).read_bytes(), name
    outputs = json.loads((moved / "metrics.json").read_text())["outputs"]
    assert sorted(outputs) == sorted(RUN_FILES) and all(Path(p).exists() for p in outputs.values())
    code, _, err = cli(capsys, "train", *RUN, "--output-dir", moved, "--resume")  # a run of its own now
    assert code == 0, err


def test_outputs_list_only_the_files_there(runs, tmp_path, capsys):
    """A checkpoint copied out of its folder has no log or best.pt beside it: none is claimed."""
    (tmp_path / "saved").mkdir()
    shutil.copy(runs["stopped"] / "last.pt", tmp_path / "saved" / "step1.pt")
    code, _, err = cli(capsys, "train", *RUN, "--seed", "7", "--max-steps", "1", "--output-dir", tmp_path / "new",
                       "--resume", tmp_path / "saved" / "step1.pt")
    assert code == 0, err
    outputs = json.loads((tmp_path / "new" / "metrics.json").read_text())["outputs"]
    assert sorted(outputs) == ["last.pt", "metrics.json"]
    assert all(Path(p).exists() for p in outputs.values())


def test_a_run_loads_back_as_its_whole_local_model(runs):
    ckpt = torch.load(runs["finished"] / "last.pt", weights_only=True)
    model = mlaan.load_local_model(runs["finished"] / "last.pt")
    assert model.training and model.spec.name == ckpt["method"]
    assert all(torch.equal(value, ckpt["model"][key]) for key, value in model.state_dict().items())
    with pytest.raises(ValueError, match="metrics.json"):
        mlaan.load_local_model(runs["finished"] / "metrics.json")
    from_folder = mlaan.load_local_model(runs["finished"])  # a run folder is its last.pt, as on the command line
    assert all(torch.equal(value, ckpt["model"][key]) for key, value in from_folder.state_dict().items())
    state, about = export.load_backbone(runs["finished"])
    assert about["step"] == ckpt["step"] and state.keys() == export.backbone_state(ckpt).keys()


def test_an_empty_path_is_never_the_current_folders_run(runs, monkeypatch):
    monkeypatch.chdir(runs["finished"])  # it holds last.pt: "" would be "." and "." that file
    for load in (mlaan.load_local_model, export.load_backbone, ckpt_io.load_training_checkpoint):
        with pytest.raises(FileNotFoundError, match="the checkpoint path is empty"):
            load("")


def test_the_library_resumes_from_a_run_folder(runs, tmp_path):
    from mlaan.training.resume import resolve_run

    _, ckpt, path = resolve_run(resume=runs["stopped"])
    assert path == runs["stopped"] / "last.pt" and ckpt["step"] == 1


def test_an_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    """``--output-dir "$UNSET"`` would otherwise write the run into the current folder."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "train", *RUN, "--max-steps", "1", "--output-dir", "")
    assert_one_line_error(code, err, ["output_dir ''", "empty", "--output-dir DIR"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given", ["auto", "file", "folder"])
def test_resume_of_a_folder_in_use_says_by_whom(tmp_path, capsys, given):
    busy = tmp_path / "busy"
    lock = safety.RunFolderLock(busy)
    lock.acquire()  # another run, started and not saved yet
    try:
        resume = {"auto": ["--resume"], "file": ["--resume", busy / "last.pt"], "folder": ["--resume", busy]}[given]
        code, _, err = cli(capsys, "train", *RUN, "--output-dir", busy, *resume)
    finally:
        lock.release()
    assert_one_line_error(code, err, [f"{busy / 'last.pt'} does not exist yet: {busy} is in use by another run",
                                      f"process {os.getpid()} on "])


def test_options_unused_by_a_method_are_other_methods_and_engine_parts_it_lacks():
    assert "temperature" in options_unused_by("dgl+mlaan") and "temperature" not in options_unused_by("infopro")
    assert {"window", "w_ind", "ema_momentum", "lam_depth", "grad_checkpointing"} <= options_unused_by("dgl")
    assert "window" not in options_unused_by("dgl+mlm") and "ema_momentum" in options_unused_by("dgl+mlm")
    assert "ema_momentum" not in options_unused_by("dgl+lam") and "window" in options_unused_by("dgl+lam")
    assert "aux_head" not in options_unused_by("dgl") and "aux_head" in options_unused_by("auglocal")
    assert "depth_shrink" in options_unused_by("dgl+mlaan") and "depth_shrink" not in options_unused_by("auglocal")
    assert {"aux_head", "balance"} <= options_unused_by("bp")


@pytest.mark.parametrize("method,option,value,given,reads_it_with", [
    ("infopro+mlaan", "temperature", 0.07, 0.5, {"infopro_task": "contrastive"}),
    ("dgl", "aux_width", 128, 64, {"aux_head": "mlp"}),
    ("dgl+mlm", "window", 2, 3, {}),
    ("dgl+lam", "ema_momentum", 0.995, 0.9, {}),
])
def test_resume_compares_only_the_options_the_run_reads(method, option, value, given, reads_it_with):
    unread_by = "auglocal" if option == "aux_width" else "dgl"
    check_resume_config({"method": unread_by, option: value}, {option: given}, "runs/x/last.pt")
    if reads_it_with:  # read only with another option's value: not compared without it
        check_resume_config({"method": method, option: value}, {option: given}, "runs/x/last.pt")
    with pytest.raises(ValueError, match=rf"{option}: {value} in the run, {given} given"):
        check_resume_config({"method": method, option: value, **reads_it_with}, {option: given},
                                    "runs/x/last.pt")


def test_overwrite_keeps_the_old_run_until_the_new_one_writes(runs, tmp_path, capsys):
    """A replacing run that fails before its first save (a non-finite loss at step 2) leaves the old run whole."""
    old = tmp_path / "old"
    shutil.copytree(runs["finished"], old)
    before = snapshot(old)
    code, _, err = cli(capsys, "train", *RUN, "--lr", "1e30", "--warmup-epochs", "0", "--output-dir", old,
                       "--overwrite")
    assert_one_line_error(code, err, ["non-finite", "the run --overwrite was to replace is left as it was"],
                          exit_code=1)
    assert snapshot(old) == before


def test_a_resume_with_nothing_to_train_says_so_and_leaves_the_run_alone(runs, tmp_path, capsys):
    """A finished run resumed in its folder, or a run resumed with --max-steps at or below its step, rewrote
    metrics.json with the figures of an evaluation-only process: now one line, every file as it was, exit 0."""
    done = tmp_path / "done"
    shutil.copytree(runs["finished"], done)
    before = snapshot(done)
    for extra in ([], ["--max-steps", "1"]):
        code, out, err = cli(capsys, "train", "--output-dir", done, "--resume", *extra)
        assert code == 0, err
        assert out.strip() == (f"mlaan train: {done / 'last.pt'} is already at the end of epoch 1, the run's last "
                               f"(step 2): nothing to train; {done} "
                               f"is left as it was (evaluate with: mlaan eval --checkpoint {done / 'last.pt'})")
        assert snapshot(done) == before
    stopped = tmp_path / "stopped"
    assert cli(capsys, "train", *TINY, "--threads", "1", "--epochs", "2", "--max-steps", "2",
               "--output-dir", stopped)[0] == 0
    before = snapshot(stopped)
    for max_steps, why in (("1", "past --max-steps 1"), ("2", "at --max-steps 2")):
        code, out, err = cli(capsys, "train", "--output-dir", stopped, "--resume", "--max-steps", max_steps)
        assert code == 0 and f"{stopped / 'last.pt'} is already at step 2, {why}: nothing to train" in out, err
        assert len(out.strip().splitlines()) == 1 and snapshot(stopped) == before


def test_a_run_stopped_before_writing_its_metrics_json_gets_it_from_a_resume(runs, tmp_path, capsys):
    """Killed after its last save but before its metrics.json (what the accuracy harness resumes): evaluated then,
    its checkpoints and log kept."""
    for summary in (None, "{}"):  # none, or one without a finished run's figures (a breaker's test)
        run = tmp_path / f"run-{summary}"
        shutil.copytree(runs["finished"], run)
        if summary is None:
            (run / "metrics.json").unlink()
        else:
            (run / "metrics.json").write_text(summary)
        before = {name: data for name, data in snapshot(run).items() if name != "metrics.json"}
        code, out, err = cli(capsys, "train", "--output-dir", run, "--resume")
        assert code == 0 and "nothing to train" not in out, err
        assert "resumed from" in out and "at step 2 (end of epoch 1) | " not in out  # the banner's last part
        assert out.splitlines()[0].endswith("at step 2 (end of epoch 1)"), out  # not "epoch 2, 0/2 steps"
        assert json.loads((run / "metrics.json").read_text())["steps"] == 2
        assert {name: data for name, data in snapshot(run).items() if name != "metrics.json"} == before


def test_a_run_stopped_before_its_first_evaluation_gets_a_best_pt_with_its_best_fields(runs, tmp_path, capsys):
    """A run stopped (by a signal) at its last step before any evaluation, resumed with nothing left: it is
    evaluated, and the best_* fields of its metrics.json name a best.pt that exists (a breaker found them
    written without one)."""
    run = tmp_path / "run"
    shutil.copytree(runs["finished"], run)
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    ckpt.update(best_accuracy=-1.0, best_epoch=0, best_step=0)  # as a stop before the first evaluation saves it
    torch.save(ckpt, run / "last.pt")
    for name in ("best.pt", "metrics.json"):
        (run / name).unlink()
    code, out, err = cli(capsys, "train", "--output-dir", run, "--resume")
    assert code == 0 and "nothing to train" not in out, err
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["best_step"] == 2 and summary["best_accuracy"] >= 0
    best = ckpt_io.load_training_checkpoint(run / "best.pt")
    assert best["step"] == 2 and best["best_accuracy"] == summary["best_accuracy"]


def test_a_run_folder_given_to_resume_is_its_last_pt_and_the_banner_says_where_it_resumed(
        runs, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "train", "--resume", "run")  # no --output-dir: the run's own folder, as for a file
    assert code == 0, err
    assert "mlaan: using run/last.pt\n" in err
    banner = next(line for line in out.splitlines() if line.startswith("mlaan train: "))
    assert " | 1 epoch x 2 steps, batch 32," in banner  # was "1 epochs x 2 steps"
    assert banner.endswith(" | output run | resumed from run/last.pt at step 1 (epoch 1, 1/2 steps)"), banner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written anywhere else
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 2 and summary["resumed_from"] == "run/last.pt"
    code, _, err = cli(capsys, "train", "--resume", tmp_path)  # a folder without last.pt: refused as before
    assert_one_line_error(code, err, [f"checkpoint {tmp_path} is a folder holding no checkpoint (last.pt, best.pt)"])
