"""Benchmarks at tiny sizes: memory accounting, FLOP floors, speed/memory/report outputs, CLI errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mlaan.bench import cli, common, flops, memory, report, speed


# --------------------------------------------------------------------------------------------- memory
def test_bp_accounted_peak_exceeds_dgl_k4():
    bp = memory.measure_case("resnet20", "bp", 1, batch=4)
    dgl = memory.measure_case("resnet20", "dgl", 4, batch=4)
    assert bp["peak_bytes"] > dgl["peak_bytes"] > 0
    # the static part (parameters, gradients, momentum) is there in both
    for r in (bp, dgl):
        assert r["breakdown"]["parameters+buffers"] > 0 and r["breakdown"]["optimizer state"] > 0
        assert r["peak_bytes"] == sum(r["breakdown"].values())


def test_grad_checkpointing_lowers_the_accounted_peak_of_mlaan():
    plain = memory.measure_case("resnet20", "dgl+mlaan", 10, batch=8)
    recomputed = memory.measure_case("resnet20", "dgl+mlaan", 10, batch=8, options={"grad_checkpointing": True})
    saved = "autograd-saved activations"
    assert recomputed["breakdown"][saved] < 0.8 * plain["breakdown"][saved]
    assert recomputed["peak_bytes"] < plain["peak_bytes"]


def test_grad_checkpointing_lowers_the_accounted_peak_of_a_cascade_without_aux_blocks():
    """dgl+mlm has no block-built aux net: what is recomputed is the module graphs its window keeps alive."""
    plain = memory.measure_case("resnet20", "dgl+mlm", 10, batch=8)
    recomputed = memory.measure_case("resnet20", "dgl+mlm", 10, batch=8, options={"grad_checkpointing": True})
    saved = "autograd-saved activations"
    assert recomputed["breakdown"][saved] < 0.8 * plain["breakdown"][saved]


def test_accounting_counts_each_storage_once():
    acc = memory.MemoryAccountant()
    with acc:
        x = torch.ones(1000, requires_grad=True)  # 4000 bytes, made by an op
        y = x.exp()  # 4000 bytes, saved by exp's backward
        z = y.view(10, 100).t()  # views: y's storage again
        w = (z * z).sum()  # mul saves z twice (self and other): still y's one storage; 4000 + 4 bytes more
    assert acc.peak == 4000 + 4000 + 4000 + 4
    assert acc.peak_breakdown["autograd-saved activations"] == 4000  # y alone, once
    assert acc.peak_breakdown["other live tensors"] == 4000 + 4000 + 4
    w.backward()
    assert x.grad is not None


def test_accounting_forgets_freed_storages():
    acc = memory.MemoryAccountant()
    with acc:
        for _ in range(5):
            t = torch.zeros(256)  # 1 KiB, freed when t is rebound
            del t
        keep = torch.zeros(512)
    assert acc.peak == 1024 * 2  # one 1 KiB buffer alive at a time, plus 2 KiB
    assert keep.numel() == 512


def test_registered_static_tensors_count_once_and_by_category():
    model = torch.nn.Linear(10, 10)
    acc = memory.MemoryAccountant()
    batch = torch.zeros(4, 10)
    acc.register_static(model, None, (batch, batch.view(40)))
    assert acc.peak == (100 + 10) * 4 + 40 * 4
    assert acc.peak_breakdown["inputs"] == 160


def test_plan_runs_bp_once_and_locals_at_k_at_least_2():
    plan = memory.plan_cases({"resnet32": [1, 2, 4]}, ["bp", "dgl"])
    assert plan == [("resnet32", "bp", 1), ("resnet32", "dgl", 2), ("resnet32", "dgl", 4)]


def test_memory_command_writes_table_json_png(tmp_path):
    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    args = parser.parse_args(["--archs", "resnet20", "--ks", "1,2", "--methods", "bp,dgl", "--batch", "2",
                              "--device", "cpu", "--no-isolate", "--output-dir", str(tmp_path)])
    assert memory.run(args) == 0
    data = json.loads((tmp_path / "memory.json").read_text())
    assert [r["method"] for r in data["results"]] == ["bp", "dgl"]
    assert data["results"][0]["pct_of_bp"] == pytest.approx(100.0)
    assert (tmp_path / "memory.png").stat().st_size > 0 and "% of BP" in (tmp_path / "memory.md").read_text()


# ---------------------------------------------------------------------------------------------- flops
def test_flop_floor_matches_measured_for_bp_and_exact_floor_for_mlaan():
    for method, k in (("bp", 1), ("dgl", 4), ("dgl+mlaan", 4)):
        model, _ = common.build("resnet20", method, k)
        x, y = common.synthetic_batch(model, 2)
        f = flops.step_flops(model, x, y)
        assert f["exact_floor"] >= f["floor"] > 0
        if method == "dgl+mlaan":
            # the engine's last module runs one input-gradient pass more than the exact floor (see flops.py)
            assert f["exact_floor"] <= f["measured"] <= 1.05 * f["exact_floor"]
        else:
            assert f["measured"] == f["floor"] == f["exact_floor"], method


def test_bp_floor_is_three_forwards_minus_first_input_gradient():
    model, _ = common.build("resnet20", "bp", 1)
    x, y = common.synthetic_batch(model, 2)
    parts = flops.floor_step_flops(model, x, y)["parts"]
    first_conv = 2 * 2 * 16 * 32 * 32 * 3 * 9  # stem conv: its input gradient is not needed
    assert parts["backbone_backward"] == 2 * parts["backbone_forward"] - first_conv


# ---------------------------------------------------------------------------------------------- speed
def test_speed_case_and_plot(tmp_path):
    case = speed.bench_case("resnet20", 2, ["dgl+mlaan"], batch=2, warmup=0, repeats=1, log=lambda s: None)
    methods = [r["method"] for r in case["methods"]]
    assert methods == ["bp", "dgl+mlaan"]  # bp is always added as the reference
    assert case["methods"][0]["time_ratio"] == pytest.approx(1.0)
    speed.plot([case], tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "time / BP" in speed.render([case])


@pytest.mark.parametrize(
    "text, message",
    [("resnet32", "ARCH:K"), ("resnet32:99", "too large"), ("vgg:4", "unknown architecture"), ("", "no ARCH:K")],
)
def test_speed_cases_reject_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        speed.parse_cases(text)


# --------------------------------------------------------------------------------------------- report
def _fake_run(path, method, accs, memory_bytes):
    path.mkdir(parents=True)
    lines = [json.dumps({"epoch": i + 1, "test_accuracy": a, "train_loss": 2.0 / (i + 1)}) for i, a in enumerate(accs)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    final = {"test_accuracy": accs[-1], "test_error": 1 - accs[-1], "best_accuracy": max(accs),
             "peak_memory_bytes": memory_bytes, "wall_time": 60.0, "steps": 10,
             "config": {"method": method, "arch": "resnet20", "num_local_modules": 1 if method == "bp" else 4}}
    (path / "metrics.json").write_text(json.dumps(final))


def test_report_writes_markdown_and_pngs(tmp_path):
    _fake_run(tmp_path / "bp", "bp", [0.5, 0.8], 4 * 2**20)
    _fake_run(tmp_path / "dgl", "dgl", [0.4, 0.7], 2 * 2**20)
    _fake_run(tmp_path / "mlaan", "dgl+mlaan", [0.45, 0.82], 3 * 2**20)
    out = tmp_path / "report"
    result = report.write_report([tmp_path / "bp", tmp_path / "dgl", tmp_path / "mlaan"], out)
    md = (out / "report.md").read_text()
    assert "dgl+mlaan" in md and "curves.png" in md and "memory.png" in md
    row = next(line for line in result["table"].splitlines() if "dgl+mlaan" in line)
    assert "-2.00" in row and "-12.00" in row  # Δ vs BP (18 vs 20 % error), Δ vs dgl (18 vs 30 %)
    for png in ("curves.png", "memory.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_report_reads_unfinished_run(tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": 0.6, "train_loss": 1.0}) + "\n")
    r = report.load_run(run)
    assert not r["finished"] and r["test_error"] == pytest.approx(0.4)


def test_report_rejects_folder_without_metrics(tmp_path):
    with pytest.raises(ValueError, match="not an `mlaan train` output"):
        report.load_run(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        report.load_run(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_registers_commands_and_turns_value_errors_into_exit_2(capsys):
    assert cli.main(["bench", "memory", "--methods", "nope", "--no-isolate"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli.main(["bench", "speed", "--cases", "resnet20:99"]) == 2
    assert cli.main(["report", "/definitely/not/here"]) == 2
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "accuracy", "--epochs", "1"])
    assert callable(args.func) and args.epochs == 1
