"""`mlaan report` that does not mislead (issue 15.3): runs grouped by what makes them comparable, epochs and time
over resumed segments, bases chosen explicitly, and on CPU the training memory by the exact accounting."""

from __future__ import annotations

import json
import shutil

import pytest

from mlaan.bench import report
from mlaan.bench.memory import measure_case
from mlaan.cli import main
from mlaan.runtime import format_bytes

TINY = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32", "--arch",
        "resnet20", "--batch-size", "16", "--device", "cpu", "--epochs", "1"]


def train(folder, *args: object) -> None:
    assert main(["train", *TINY, "--output-dir", str(folder), *[str(a) for a in args]]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """bp twice (two seeds), dgl, all 4 steps (one epoch); dgl+mlaan stopped at 2 steps and resumed to 4;
    dgl+mlaan with a budget of 2 steps."""
    root = tmp_path_factory.mktemp("report")
    train(root / "bp", "--method", "bp")
    train(root / "bp-seed1", "--method", "bp", "--seed", "1")
    train(root / "dgl", "--method", "dgl", "-K", "4")
    train(root / "mlaan", "--method", "dgl+mlaan", "-K", "4", "--max-steps", "2")
    assert main(["train", "--output-dir", str(root / "mlaan"), "--resume"]) == 0
    train(root / "short", "--method", "dgl+mlaan", "-K", "4", "--max-steps", "2")
    return root


def row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
    return [c.strip() for c in line.strip("|").split("|")]


COLUMNS = ["run", "method", "arch", "K", "epochs", "steps", "test acc %", "test error %", "Δ vs BP (pp)",
           "Δ vs base (pp)", "best acc %", "peak memory", "wall min", "finished"]  # peak memory: (source) follows


def test_runs_of_other_budgets_are_not_compared_and_the_difference_is_said(runs, tmp_path):
    result = report.write_report([runs / n for n in ("bp", "dgl", "mlaan", "short")], tmp_path, memory="none")
    assert [[r["name"] for r in g] for g in result["groups"]] == [["bp", "dgl", "mlaan"], ["short"]]
    md = (tmp_path / "report.md").read_text()
    assert "steps: 4 vs 2" in md
    short = dict(zip(COLUMNS, row(md, "short")))
    assert short["Δ vs BP (pp)"] == "—"  # no BP run had its budget
    mlaan = dict(zip(COLUMNS, row(md, "mlaan")))
    assert mlaan["Δ vs BP (pp)"] != "—" and mlaan["Δ vs base (pp)"] != "—"
    # "short" ended on its --max-steps budget; "mlaan" was stopped there too, then resumed to the schedule's end
    assert short["finished"] == "--max-steps (2 of 4)" and mlaan["finished"] == "yes"


def test_two_runs_of_the_base_method_need_an_explicit_choice(runs, tmp_path):
    dirs = [runs / n for n in ("bp", "bp-seed1", "dgl")]
    result = report.write_report(dirs, tmp_path / "a", memory="none")
    assert dict(zip(COLUMNS, row(result["table"], "dgl")))["Δ vs BP (pp)"] == "—"
    assert any("2 bp runs (bp, bp-seed1)" in n and "--bp" in n for n in result["notes"])
    bp1 = report.load_run(runs / "bp-seed1")
    dgl = report.load_run(runs / "dgl")
    chosen = report.write_report(dirs, tmp_path / "b", bp=str(runs / "bp-seed1"), memory="none")
    expected = f"{100 * (dgl['test_error'] - bp1['test_error']):+.2f}"
    assert dict(zip(COLUMNS, row(chosen["table"], "dgl")))["Δ vs BP (pp)"] == expected and not chosen["notes"]


def test_resumed_run_counts_every_segment(runs):
    r = report.load_run(runs / "mlaan")
    final = json.loads((runs / "mlaan" / "metrics.json").read_text())
    assert r["num_epochs"] == 1 and r["steps"] == 4 and len(r["epochs"]) == 1
    assert r["wall_time"] == final["total_wall_time_seconds"] > final["wall_time_seconds"]


def test_an_epoch_logged_twice_is_one_point(tmp_path):
    """metrics.jsonl of an older mlaan: the epoch cut by --max-steps and its resumed end, both logged."""
    run = tmp_path / "old"
    run.mkdir()
    lines = [{"epoch": 1, "step": 2, "complete": False, "test_accuracy": 0.2, "train_loss": 2.0},
             {"epoch": 1, "step": 4, "complete": True, "test_accuracy": 0.3, "train_loss": 1.5},
             {"epoch": 2, "step": 8, "complete": True, "test_accuracy": 0.4, "train_loss": 1.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = report.load_run(run)
    assert [e["step"] for e in r["epochs"]] == [4, 8] and r["num_epochs"] == 2


def test_on_cpu_the_memory_chart_is_the_training_accounting(runs, tmp_path):
    result = report.write_report([runs / "bp", runs / "dgl"], tmp_path, log=lambda m: None)
    assert result["memory_source"] == "accounted" and (tmp_path / "memory.png").is_file()
    md = (tmp_path / "report.md").read_text()
    assert "exact accounting" in md
    expected = measure_case("resnet20", "dgl", 4, 16)["peak_bytes"]

    assert "peak memory (accounted)" in md
    assert dict(zip(COLUMNS, row(md, "dgl")))["peak memory"] == format_bytes(expected)
    bp = measure_case("resnet20", "bp", 1, 16)["peak_bytes"]
    assert expected < bp  # what the RSS of both processes (mostly the torch runtime) hid


def test_a_run_of_a_method_not_installed_here_is_reported_without_its_memory(runs, tmp_path):
    plugin = tmp_path / "plugin-run"
    shutil.copytree(runs / "dgl", plugin)
    final = json.loads((plugin / "metrics.json").read_text())
    final["config"]["method"] = "smooth+mlaan"  # trained with a plug-in since uninstalled
    (plugin / "metrics.json").write_text(json.dumps(final))
    said = []
    result = report.write_report([runs / "bp", plugin], tmp_path / "out", log=said.append)
    assert "method 'smooth+mlaan' is not installed here, so its memory is not accounted" in "\n".join(said)
    cells = dict(zip(COLUMNS, row((tmp_path / "out" / "report.md").read_text(), "plugin-run")))
    assert cells["method"] == "smooth+mlaan" and cells["test acc %"] and cells["peak memory"] == "—"
    assert result["memory_source"] == "accounted"


def test_a_folder_of_runs_reports_every_run_below_it_once(runs, tmp_path):
    result = report.write_report([runs, runs / "bp"], tmp_path, memory="none")
    assert sorted(r["name"] for g in result["groups"] for r in g) == ["bp", "bp-seed1", "dgl", "mlaan", "short"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has neither metrics.jsonl nor metrics.json"):
        report.write_report([tmp_path / "empty"], tmp_path / "again")  # no run in it or below


def test_report_cli_takes_the_choices(runs, tmp_path, capsys):
    assert main(["report", str(runs / "bp"), str(runs / "bp-seed1"), "--bp", str(runs / "bp"), "--memory", "none",
                 "--output-dir", str(tmp_path)]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs / "bp"), "--memory", "rss"])
    assert exit_info.value.code == 2 and "invalid choice: 'rss'" in capsys.readouterr().err


@pytest.mark.parametrize("flag,choice,message", [
    ("--bp", "nope", r"--bp nope: not one of the runs given \(bp, dgl, mlaan\)"),
    ("--bp", "mlaan", r"--bp mlaan: that run trains dgl\+mlaan, not end to end"),
    ("--base", "mlaan", r"--base mlaan: that run trains dgl\+mlaan, not a base method"),
    ("--base", "bp", r"--base bp: that run trains bp, not a base method"),
])
def test_a_wrong_choice_of_base_run_is_refused_not_ignored(runs, tmp_path, capsys, flag, choice, message):
    import re

    code = main(["report", *(str(runs / n) for n in ("bp", "dgl", "mlaan")), flag, choice, "--memory", "none",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_run_labels_are_the_shortest_tails_that_differ(tmp_path, monkeypatch):
    assert report.run_names(["x/a/bp", "x/b/bp", "x/a/dgl"]) == ["a/bp", "b/bp", "dgl"]  # dgl: unique already
    assert report.run_names(["r/a/s/bp", "r/b/s/bp", "r/c/bp"]) == ["a/s/bp", "b/s/bp", "c/bp"]
    monkeypatch.chdir(tmp_path)
    assert report.run_names(["."]) == [tmp_path.name]  # not "": a run reported from inside its folder


def test_runs_in_folders_of_one_name_are_told_apart(runs, tmp_path, saved_figures):
    for parent in ("a", "b"):
        shutil.copytree(runs / "bp", tmp_path / parent / "bp")
    shutil.copytree(runs / "dgl", tmp_path / "a" / "dgl")
    result = report.write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", memory="recorded")
    assert [r["name"] for r in result["runs"]] == ["a/bp", "dgl", "b/bp"]
    assert row(result["table"], "a/bp") != row(result["table"], "b/bp")
    assert any("2 bp runs (a/bp, b/bp)" in note for note in result["notes"])
    curves, memory = saved_figures
    assert [t.get_text() for t in curves.axes[0].get_legend().get_texts()] == ["bp (a/bp)", "dgl", "bp (b/bp)"]
    assert [t.get_text() for t in memory.axes[0].get_xticklabels()] == ["bp\n(a/bp)", "dgl", "bp\n(b/bp)"]
    # a run named as the report names it is a choice of base run
    chosen = report.write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", bp="b/bp", memory="none")
    assert not chosen["notes"]


def _whole(ticks) -> bool:
    return all(float(t).is_integer() for t in ticks)


def test_epoch_ticks_are_whole_unless_a_run_stopped_mid_epoch(runs, tmp_path, saved_figures):
    report.write_report([runs / "bp", runs / "dgl"], tmp_path / "whole", memory="none")
    report.write_report([runs / "bp", runs / "short"], tmp_path / "part", memory="none")  # short: 0.5 epochs
    whole, part = saved_figures
    assert all(_whole(ax.get_xticks()) for ax in whole.axes)  # one point at epoch 1: no tick at 0.98
    assert not _whole(part.axes[0].get_xticks())
    assert 0.5 in [line.get_xdata()[0] for line in part.axes[0].lines]


def test_group_heading_counts_one_epoch_in_the_singular(runs, tmp_path):
    report.write_report([runs / "bp", runs / "short"], tmp_path, memory="none")
    md = (tmp_path / "report.md").read_text()
    assert "4 steps (1 of 1 epoch)" in md and "2 steps (0.50 of 1 epoch)" in md and "epochs)" not in md


def test_saved_figures_hold_their_labels_whole(runs, tmp_path, saved_figures):
    """Nothing drawn sticks out of the figure (the memory chart's y label once ran past its top and bottom)."""
    report.write_report([runs / "bp", runs / "dgl"], tmp_path, log=lambda m: None)  # memory: the long label
    assert len(saved_figures) == 2
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for fig in saved_figures:  # closed once saved: drawn again on a canvas of its own
        drawn, page = fig.get_tightbbox(FigureCanvasAgg(fig).get_renderer()), fig.bbox_inches
        assert page.x0 <= drawn.x0 and drawn.x1 <= page.x1 and page.y0 <= drawn.y0 and drawn.y1 <= page.y1


def _fake_finished_run(folder, method: str, accuracy: float, **options: object) -> None:
    """A finished run's metrics.json holding the config `mlaan train` records (every option, defaults included)."""
    from mlaan.training.config import TrainConfig

    folder.mkdir(parents=True)
    config = TrainConfig(method=method, arch="resnet20", dataset="synthetic", local_modules=4, epochs=1,
                         **options).to_dict()
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 4, "test_accuracy": accuracy,
                                                      "train_loss": 1.0}) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy, "test_error": 1 - accuracy,
                                                     "steps": 4, "config": config}))


def test_runs_of_one_method_with_other_options_are_labelled_with_them(tmp_path, saved_figures):
    """Two dgl+mlaan runs that differ by lam_trunk were both 'dgl+mlaan' in the method column and the legend;
    the label names the non-default options the method reads (dgl reads no lam_trunk), as `bench accuracy`
    labels a --vary arm."""
    _fake_finished_run(tmp_path / "runs" / "copies", "dgl+mlaan", 0.8)
    _fake_finished_run(tmp_path / "runs" / "twins", "dgl+mlaan", 0.7, lam_trunk="twins")
    _fake_finished_run(tmp_path / "runs" / "dgl", "dgl", 0.6, lam_trunk="twins")
    result = report.write_report([tmp_path / "runs"], tmp_path / "out", memory="none")
    methods = {name: dict(zip(COLUMNS, row(result["table"], name)))["method"] for name in ("copies", "twins", "dgl")}
    assert methods == {"copies": "dgl+mlaan", "twins": "dgl+mlaan lam_trunk=twins", "dgl": "dgl"}
    assert "| dgl+mlaan lam_trunk=twins " in (tmp_path / "out" / "report.md").read_text()
    curves = saved_figures[0]
    assert sorted(t.get_text() for t in curves.axes[0].get_legend().get_texts()) == [
        "dgl", "dgl+mlaan", "dgl+mlaan lam_trunk=twins"]


def test_an_empty_output_dir_is_refused_not_the_current_folder(tmp_path, capsys, monkeypatch):
    from mlaan.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["report", str(tmp_path / "no-run"), "--output-dir", ""]) == 2
    assert "--output-dir '' is empty" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
