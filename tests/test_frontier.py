"""`mlaan bench frontier`: its points, its Pareto marking, its accuracy annotation and one tiny run end to end.
No timing is asserted: only that every point has a time and a memory, relative to plain BP."""

from __future__ import annotations

import json

import pytest

from mlaan.bench import common, frontier, speed
from mlaan.cli import main


def test_pareto_marks_the_points_no_other_beats_in_both():
    points = [
        {"name": "bp", "pct_of_bp": 100.0, "time_ratio": 1.0},
        {"name": "ckpt", "pct_of_bp": 30.0, "time_ratio": 1.3},
        {"name": "fast-small", "pct_of_bp": 20.0, "time_ratio": 0.9},  # beats bp and ckpt in both
        {"name": "smallest", "pct_of_bp": 10.0, "time_ratio": 4.0},
        {"name": "tie", "pct_of_bp": 20.0, "time_ratio": 0.9},  # equal to another: neither beats the other
        {"name": "dominated", "pct_of_bp": 50.0, "time_ratio": 5.0},
        {"name": "unmeasured", "pct_of_bp": None, "time_ratio": 0.1},
    ]
    marks = dict(zip([p["name"] for p in points], frontier.pareto(points, ("pct_of_bp", "time_ratio"))))
    assert marks == {"bp": False, "ckpt": False, "fast-small": True, "smallest": True, "tie": True,
                     "dominated": False, "unmeasured": False}


def test_pareto_with_error_keeps_a_slower_point_that_is_more_accurate():
    points = [{"pct_of_bp": 20.0, "time_ratio": 1.0, "test_error": 0.10},
              {"pct_of_bp": 30.0, "time_ratio": 4.0, "test_error": 0.06},
              {"pct_of_bp": 30.0, "time_ratio": 5.0, "test_error": 0.06},
              {"pct_of_bp": 5.0, "time_ratio": 0.5}]  # no error: off the set with error, on the other
    frontier.mark_pareto(points)
    assert [p["pareto"] for p in points] == [False, False, False, True]
    assert [p["pareto_with_error"] for p in points] == [True, True, False, False]


def test_plan_has_plain_bp_first_each_segment_and_each_recompute_setting():
    points = frontier.plan_points("resnet20", [1, 4], ["dgl+mlaan", "bp", "dgl"], segments=[1, 3])
    assert [(p["label"], p["k"]) for p in points] == [
        ("bp", 1), ("bp +ckpt", 1), ("bp +ckpt seg=3", 1), ("dgl+mlaan", 4), ("dgl+mlaan +ckpt", 4), ("dgl", 4)]
    assert points[2]["options"] == {"grad_checkpointing": True, "checkpoint_segment": 3}


def test_accuracy_annotates_the_same_setting_only():
    points = frontier.plan_points("resnet20", [2, 4], ["bp", "dgl"], segments=[2])
    report = {"recipe": {"arch": "resnet20", "k": 4, "dataset": "fashion-mnist", "epochs": 3},
              "summary": [{"method": "bp", "variant": "", "mean": 0.06, "std": 0.001, "seeds": [0, 1]},
                          {"method": "dgl", "variant": "", "mean": 0.1, "std": None, "seeds": [0]},
                          {"method": "dgl", "variant": "window=3", "mean": 0.5, "seeds": [0]}]}
    frontier.annotate_accuracy(points, "resnet20", report)
    errors = {(p["label"], p["k"]): p.get("test_error") for p in points}
    assert errors == {("bp", 1): 0.06, ("bp +ckpt seg=2", 1): 0.06, ("dgl", 2): None, ("dgl", 4): 0.1}
    other = frontier.plan_points("resnet32", [4], ["bp"])
    frontier.annotate_accuracy(other, "resnet32", report)  # another architecture's report: nothing
    assert all("test_error" not in p for p in other)


def test_a_point_that_only_recomputes_shares_the_error_and_one_with_another_option_does_not():
    """`--option lam_trunk=twins` points took the paper's trunk's test error (they compute other steps: a silent
    wrong number), and a `--variant lead=checkpoint_trunk=lead` point had none (it computes the same steps)."""
    report = {"recipe": {"arch": "resnet20", "k": 4}, "summary": [
        {"method": "dgl+mlaan", "variant": "", "mean": 0.1, "std": 0.01, "seeds": [0, 1]}]}
    variants = frontier.parse_variants(["lead=checkpoint_modules=2,checkpoint_trunk=lead", "shallow=lam_depth=2"])
    points = frontier.plan_points("resnet20", [4], ["dgl+mlaan", "bp"], segments=[], variants=variants)
    frontier.annotate_accuracy(points, "resnet20", report)
    errors = {p["label"]: p.get("test_error") for p in points if p["method"] != "bp"}
    assert errors == {"dgl+mlaan": 0.1, "dgl+mlaan +ckpt": 0.1, "dgl+mlaan lead +ckpt first=2 trunk=lead": 0.1,
                      "dgl+mlaan shallow": None, "dgl+mlaan shallow +ckpt": None}
    twins = frontier.plan_points("resnet20", [4], ["dgl+mlaan", "bp"], segments=[], options={"lam_trunk": "twins"})
    frontier.annotate_accuracy(twins, "resnet20", report)
    assert [p["label"] for p in twins if "test_error" in p] == []


def test_options_at_their_default_make_no_point_of_their_own_and_keep_the_error():
    report = {"recipe": {"arch": "resnet20", "k": 4}, "summary": [
        {"method": "dgl+mlaan", "variant": "", "mean": 0.1, "std": 0.01, "seeds": [0, 1]}]}
    copies = frontier.plan_points("resnet20", [4], ["dgl+mlaan", "bp"], segments=[], options={"lam_trunk": "copies"})
    frontier.annotate_accuracy(copies, "resnet20", report)
    assert [p["test_error"] for p in copies if p["method"] == "dgl+mlaan"] == [0.1, 0.1]
    with pytest.raises(ValueError, match="--variant all: every point it would add builds one already planned"):
        frontier.plan_points("resnet20", [4], ["dgl+mlaan", "bp"], variants={"all": {"checkpoint_trunk": "all"}})
    with pytest.raises(ValueError, match="--variant lead: every point it would add builds one already planned"):
        frontier.plan_points("resnet20", [4], ["dgl+mlaan", "bp"], recompute="off",
                             variants={"lead": {"checkpoint_trunk": "lead"}})


def test_a_report_trained_with_extra_flags_annotates_nothing():
    """A report of runs given `--train-arg '--lam-trunk twins'` put the twins' error on the copies' point."""
    report = {"recipe": {"arch": "resnet20", "k": 4, "train_arg": ["--lam-trunk twins"]}, "summary": [
        {"method": "dgl+mlaan", "variant": "", "mean": 0.3, "std": 0.01, "seeds": [0, 1]}]}
    points = frontier.plan_points("resnet20", [4], ["dgl+mlaan", "bp"], segments=[])
    frontier.annotate_accuracy(points, "resnet20", report)
    assert all("test_error" not in p for p in points)


def test_bench_frontier_end_to_end(tmp_path):
    accuracy = tmp_path / "accuracy.json"
    accuracy.write_text(json.dumps({"recipe": {"arch": "resnet20", "k": 2, "dataset": "synthetic"}, "summary": [
        {"method": "bp", "variant": "", "mean": 0.2, "std": 0.01, "seeds": [0, 1]}]}))
    out = tmp_path / "out"
    assert main(["bench", "frontier", "--arch", "resnet20", "--ks", "2", "--methods", "bp,dgl", "--segments", "1,5",
                 "--batch", "4", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-isolate",
                 "--accuracy", str(accuracy), "--output-dir", str(out)]) == 0
    result = json.loads((out / "frontier.json").read_text())
    points = {p["label"]: p for p in result["points"]}
    assert list(points) == ["bp", "bp +ckpt", "bp +ckpt seg=5", "dgl"]
    assert points["bp"]["pct_of_bp"] == 100.0 and points["bp"]["time_ratio"] == 1.0
    # BP checkpointed holds less memory by the accountant, whatever the times
    assert points["bp +ckpt"]["pct_of_bp"] < 100.0 and points["bp +ckpt seg=5"]["pct_of_bp"] < 100.0
    assert all(p["median_step_s"] > 0 and isinstance(p["pareto"], bool) for p in points.values())
    assert points["bp +ckpt"]["test_error"] == 0.2 and "test_error" not in points["dgl"]
    table = (out / "frontier.md").read_text()
    assert "| bp +ckpt seg=5" in table and "Pareto" in table and "20.00 ± 1.00 (2 seeds)" in table
    assert "--option" not in table and result["options"] == {}


def test_variant_parses_a_label_and_engine_options():
    assert frontier.parse_variant("twins=lam_trunk=twins") == ("twins", {"lam_trunk": "twins"})
    assert frontier.parse_variant("shallow=lam_depth=2,lam_trunk=twins") == (
        "shallow", {"lam_depth": 2, "lam_trunk": "twins"})


@pytest.mark.parametrize("item,message", [
    ("twins", "must be LABEL=KEY=VALUE"),
    ("=lam_trunk=twins", "must be LABEL=KEY=VALUE"),
    ("twins=lam_trunk", "must be LABEL=KEY=VALUE"),
    ("twins=lam_trunk=twins,=2", "must be LABEL=KEY=VALUE"),
    ("two words=lam_trunk=twins", "must be one word"),
    ("a+b=lam_trunk=twins", "must be one word"),
    ("x=no_such_option=1", "no_such_option"),
])
def test_a_bad_variant_is_refused_naming_it(item, message):
    with pytest.raises(ValueError, match=message):
        frontier.parse_variant(item)


def test_a_label_given_twice_is_refused():
    with pytest.raises(ValueError, match="'twins' is given twice"):
        frontier.parse_variants(["twins=lam_trunk=twins", "twins=lam_depth=2"])


def test_variant_points_follow_the_plain_ones_for_the_methods_that_read_the_option_only():
    variants = frontier.parse_variants(["twins=lam_trunk=twins"])
    points = frontier.plan_points("resnet20", [4], ["bp", "dgl", "dgl+mlaan"], segments=[1],
                                  options={"window": 2}, variants=variants)
    assert [p["label"] for p in points] == ["bp", "bp +ckpt", "dgl", "dgl+mlaan", "dgl+mlaan +ckpt",
                                            "dgl+mlaan twins", "dgl+mlaan twins +ckpt"]
    twins = [p for p in points if p.get("variant") == "twins"]
    assert all(p["options"]["lam_trunk"] == "twins" and p["options"]["window"] == 2 for p in twins)
    assert all("lam_trunk" not in p["options"] for p in points if not p.get("variant"))
    with pytest.raises(ValueError, match="--variant twins: no method of --methods \\(bp, dgl\\) reads lam_trunk"):
        frontier.plan_points("resnet20", [4], ["bp", "dgl"], variants=variants)


def test_a_variant_point_that_builds_an_earlier_one_is_left_out():
    """--variant twinsel=lam_trunk=twins,checkpoint_modules=2 beside --variant twins=lam_trunk=twins: without
    recomputation checkpoint_modules is not read, so 'twinsel' plain was the 'twins' step timed again (and
    sel=checkpoint_modules=2 gave bp a point of its own, the same as bp +ckpt)."""
    variants = frontier.parse_variants(["twins=lam_trunk=twins", "twinsel=lam_trunk=twins,checkpoint_modules=2",
                                        "sel=checkpoint_modules=2"])
    points = frontier.plan_points("resnet20", [4], ["bp", "dgl+mlaan"], segments=[1], variants=variants)
    assert [p["label"] for p in points] == ["bp", "bp +ckpt", "dgl+mlaan", "dgl+mlaan +ckpt", "dgl+mlaan twins",
                                            "dgl+mlaan twins +ckpt", "dgl+mlaan twinsel +ckpt first=2",
                                            "dgl+mlaan sel +ckpt first=2"]


def test_a_variant_reaches_the_model_of_its_point_and_not_the_others(monkeypatch):
    points = frontier.plan_points("resnet20", [4], ["bp", "dgl+mlaan"], recompute="off",
                                  variants=frontier.parse_variants(["twins=lam_trunk=twins"]))
    built = {}
    real_build = common.build

    def spy(arch, method, k, **options):
        model, optimizer = real_build(arch, method, k, **options)
        built[(method, options.get("lam_trunk"))] = model
        return model, optimizer

    monkeypatch.setattr(common, "build", spy)
    monkeypatch.setattr(speed, "interleaved_times", lambda steps, *_: ({key: [1.0] for key in steps}, None, None))
    frontier.measure_time("resnet20", points, batch=2, repeats=1)
    assert set(built) == {("bp", None), ("dgl+mlaan", None), ("dgl+mlaan", "twins")}
    assert built[("dgl+mlaan", "twins")].twin_bank is not None and not built[("dgl+mlaan", "twins")].leap_trunks
    assert built[("dgl+mlaan", None)].twin_bank is None and built[("dgl+mlaan", None)].leap_trunks


def test_accuracy_is_not_given_to_a_variant_point():
    points = frontier.plan_points("resnet20", [4], ["bp", "dgl+mlaan"], recompute="off",
                                  variants=frontier.parse_variants(["twins=lam_trunk=twins"]))
    report = {"recipe": {"arch": "resnet20", "k": 4}, "summary": [
        {"method": "dgl+mlaan", "variant": "", "mean": 0.1, "std": 0.0, "seeds": [0, 1]}]}
    frontier.annotate_accuracy(points, "resnet20", report)
    assert {p["label"]: p.get("test_error") for p in points} == {"bp": None, "dgl+mlaan": 0.1,
                                                                  "dgl+mlaan twins": None}


def test_cli_refuses_a_bad_variant_with_exit_2(tmp_path, capsys):
    assert main(["bench", "frontier", "--arch", "resnet20", "--ks", "2", "--methods", "bp,dgl", "--accuracy", "none",
                 "--variant", "twins=lam_trunk=twins", "--output-dir", str(tmp_path)]) == 2
    assert "--variant twins: no method" in capsys.readouterr().err


def test_memory_counts_the_twins_as_frozen_parameters_and_trains_none_of_them():
    points = frontier.plan_points("resnet20", [4], ["bp", "dgl+mlaan"], recompute="off",
                                  variants=frontier.parse_variants(["twins=lam_trunk=twins"]))
    frontier.measure_memory("resnet20", points, batch=2, isolate=False, log=lambda _: None)
    counts = {p["label"]: (p["trainable_params"], p["frozen_params"]) for p in points}
    assert counts["bp"][1] == 0
    copies, twins = counts["dgl+mlaan"], counts["dgl+mlaan twins"]
    assert twins[0] < copies[0]  # no trained trunk copies
    assert 0 < twins[1] <= counts["bp"][0]  # frozen twins of at most one backbone


@pytest.mark.parametrize(("command", "flags", "message"), [
    # breaker findings: a traceback after the measurement began (frontier), an error row in a table that exited 0
    # (memory); an option the command's own flag overwrote, recorded as if applied (memory)
    ("frontier", ["--option", "window=9"], "--option with dgl+mlaan: cascade window=9 is not allowed with K=3"),
    ("frontier", ["--variant", "w9=window=9"], "--variant w9 with dgl+mlaan: cascade window=9 is not allowed"),
    ("frontier", ["--option", "checkpoint_segment=2"], "checkpoint_segment is set by this command's --segments"),
    ("memory", ["--option", "window=9"], "--option with dgl+mlaan: cascade window=9 is not allowed with K=3"),
    ("memory", ["--option", "grad_checkpointing=true"],
     "--option: grad_checkpointing is set by this command's --grad-checkpointing, not by --option"),
])
def test_options_the_cases_cannot_take_are_refused_before_measuring(tmp_path, capsys, command, flags, message):
    where = ["--arch", "resnet20", "--accuracy", "none"] if command == "frontier" else ["--archs", "resnet20"]
    code = main(["bench", command, *where, "--ks", "3", "--methods", "bp,dgl+mlaan", "--batch", "2",
                 *flags, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_table_names_the_options_every_point_was_built_with():
    """`--option lam_trunk=twins` points were named 'dgl+mlaan' with nothing in frontier.md saying twins."""
    point = {"label": "dgl+mlaan", "k": 4, "peak_bytes": 2**20, "pct_of_bp": 50.0, "median_step_s": 0.1,
             "time_ratio": 2.0}
    result = {"arch": "resnet20", "batch": 4, "time_batch": 4, "format": "fp32", "repeats": 1, "warmup": 0,
              "threads": 1, "machine": "test", "points": [point], "options": {"lam_trunk": "twins"}}
    assert "Engine options of every point (--option): lam_trunk=twins" in frontier.render(result)
    assert "--option" not in frontier.render({**result, "options": {}})
