"""Benchmarks at tiny sizes: memory accounting, FLOP floors, speed/memory/report outputs, CLI errors."""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from mlaan.bench import accuracy, cli, common, flops, memory, report, seeds, speed
from mlaan.engine import phases
from mlaan.engine.methods import registry
from mlaan.engine.methods.bp import BP


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
    # BP's activation checkpointing is measured beside it by default (--grad-checkpointing both)
    assert [common.label(r) for r in data["results"]] == ["bp", "bp +ckpt", "dgl"]
    assert data["results"][0]["pct_of_bp"] == pytest.approx(100.0) and data["results"][1]["pct_of_bp"] < 100.0
    assert (tmp_path / "memory.png").stat().st_size > 0 and "% of BP" in (tmp_path / "memory.md").read_text()


def test_memory_command_names_its_options_and_records_them_only_for_the_methods_that_read_them(tmp_path, capsys):
    """The header line and memory.md did not name --option values, so a table of lam_trunk=twins looked like the
    default's; and every case recorded every option, bp's and dgl's a lam_trunk they do not read."""
    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    args = parser.parse_args(["--archs", "resnet20", "--ks", "2", "--methods", "bp,dgl,dgl+mlaan", "--batch", "2",
                              "--device", "cpu", "--no-isolate", "--grad-checkpointing", "off",
                              "--option", "lam_trunk=twins", "--output-dir", str(tmp_path)])
    assert memory.run(args) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("mlaan bench memory") and "options lam_trunk=twins" in header
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["options"] == {"lam_trunk": "twins"}
    assert {r["method"]: r["options"].get("lam_trunk") for r in data["results"]} == {
        "bp": None, "dgl": None, "dgl+mlaan": "twins"}
    md = (tmp_path / "memory.md").read_text()
    assert md.startswith("Engine options (--option): lam_trunk=twins;")
    assert [line.split("|")[2].strip() for line in md.splitlines() if line.startswith("| resnet20")] == [
        "bp", "dgl", "dgl+mlaan lam_trunk=twins"]


def test_planned_cases_hold_only_the_options_their_method_reads():
    planned = common.plan_variants([("resnet20", "bp", 1), ("resnet20", "dgl", 4), ("resnet20", "dgl+mlaan", 4)],
                                   {"lam_trunk": "twins", "checkpoint_modules": 2}, "both")
    # asked of the method (MethodSpec.engine_options): bp and dgl read no lam_trunk, dgl+mlaan no
    # checkpoint_modules without grad_checkpointing
    assert [(method, options) for _, method, _, options in planned][::2] == [
        ("bp", {"grad_checkpointing": False}), ("dgl", {}),
        ("dgl+mlaan", {"lam_trunk": "twins", "checkpoint_modules": 2, "grad_checkpointing": True})]
    assert planned[3][3] == {"lam_trunk": "twins", "grad_checkpointing": False}
    labels = [common.label_with_options({"method": m, "options": o}) for _, m, _, o in planned]
    assert labels[2:] == ["dgl", "dgl+mlaan lam_trunk=twins", "dgl+mlaan lam_trunk=twins +ckpt first=2"]
    assert labels[0] == "bp" and "lam_trunk" not in labels[1]


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


def test_speed_breakdown_reads_the_engine_phase_markers(tmp_path):
    b = speed.breakdown("resnet20", 3, "dgl+mlaan", batch=2, steps=1, trace_dir=tmp_path)
    parts = {p["part"]: p["seconds"] for p in b["parts"]}
    assert sum(parts.values()) == pytest.approx(b["step_s"])
    for part in ("backbone forward", "backbone weight backward", "cascade input-gradient passes",
                 "aux cascade: backward", "aux cascade: LAM/AugLocal trunk forward", "aux cascade: head forward",
                 "aux independent: head forward", "aux independent: backward", "optimizer step", "EMA twin update"):
        assert parts[part] > 0, part
    assert b["unprofiled_step_s"] > 0 and "aten::" in b["top_ops"]
    assert "profiled steps" in speed.render_breakdown(b)
    assert (tmp_path / "breakdown_trace.json").stat().st_size > 0


def _event(name, start, end, device_us=0.0, thread=1, device_type=DeviceType.CPU):
    return SimpleNamespace(name=name, thread=thread, time_range=SimpleNamespace(start=start, end=end),
                           self_device_time_total=device_us, device_type=device_type)


def test_phase_seconds_are_exclusive_and_kernels_go_to_the_innermost_phase():
    events = [
        _event(speed.STEP_MARKER, 0, 100),
        _event(phases.MODULE_FORWARD, 10, 30),
        _event(phases.AUX_LOSS["cascaded"], 30, 70),
        _event(phases.AUX_FORWARD, 35, 50),
        _event(phases.AUX_TRUNK_FORWARD, 36, 45),
        _event("aten::convolution", 37, 40, device_us=5.0, thread=2),  # an op that launched a kernel
        _event("void conv_kernel", 900, 905, device_us=5.0, thread=7, device_type=DeviceType.CUDA),  # its kernel
        _event("Optimizer.step#SGD.step", 80, 95),
        _event(phases.MODULE_FORWARD, 200, 300, thread=3),  # another thread's marker: not this step's
    ]
    wall, device, total = speed.phase_seconds(events)
    us = {part: round(seconds * 1e6, 6) for part, seconds in wall.items()}
    assert us == {"backbone forward": 20, "aux cascade: LAM/AugLocal trunk forward": 9,
                  "aux cascade: head forward": 6, "aux cascade: backward": 25, "optimizer step": 15,
                  speed.OTHER: 25}
    assert total * 1e6 == pytest.approx(100) and sum(wall.values()) == pytest.approx(total)
    assert device == {"aux cascade: LAM/AugLocal trunk forward": pytest.approx(5e-6)}


@pytest.mark.parametrize(
    "text, message",
    [("resnet32", "ARCH:K"), ("resnet32:99", "too large"), ("vgg:4", "unknown architecture"), ("", "no ARCH:K"),
     ("torchvision:resnet18", "ARCH:K"), ("torchvision:resnet18:10", "allowed 1 to 9"), ("resnet32:x", "ARCH:K")],
)
def test_speed_cases_reject_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        speed.parse_cases(text)


def test_speed_cases_take_library_architectures():
    # K follows the last colon, so a torchvision/timm name's own colon is part of the architecture
    assert speed.parse_cases("ResNet20:4, torchvision:resnet18:8") == [("resnet20", 4), ("torchvision:resnet18", 8)]


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


# ------------------------------------------------------------------------------------ optional extras
def test_without_matplotlib_commands_write_tables_and_json_and_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert not common.plots_available()
    with pytest.raises(common.PlotsUnavailable, match=r"pip install 'mlaan\[bench\]'"):
        common.pyplot()
    capsys.readouterr()

    def said_once() -> str:
        out, err = capsys.readouterr()
        assert err.count(common.NO_MATPLOTLIB) == 1 and ".png" not in out
        return out

    _fake_run(tmp_path / "bp", "bp", [0.5, 0.8], 4 * 2**20)
    _fake_run(tmp_path / "dgl", "dgl", [0.4, 0.7], 2 * 2**20)
    out = tmp_path / "report"
    assert cli.main(["report", str(tmp_path / "bp"), str(tmp_path / "dgl"), "--output-dir", str(out)]) == 0
    said_once()
    assert "dgl" in (out / "report.md").read_text() and ".png" not in (out / "report.md").read_text()
    assert sorted(f.name for f in out.iterdir()) == ["report.md"]

    out = tmp_path / "memory"
    assert cli.main(["bench", "memory", "--archs", "resnet20", "--ks", "2", "--methods", "bp,dgl", "--batch", "2",
                     "--device", "cpu", "--no-isolate", "--threads", "1", "--output-dir", str(out)]) == 0
    said_once()
    assert sorted(f.name for f in out.iterdir()) == ["memory.json", "memory.md"]
    assert ", 1 thread, " in json.loads((out / "memory.json").read_text())["machine"]

    out = tmp_path / "speed"
    assert cli.main(["bench", "speed", "--cases", "resnet20:2", "--methods", "dgl", "--batch", "2", "--warmup",
                     "0", "--repeats", "1", "--formats", "fp32", "--threads", "2", "--breakdown", "none",
                     "--output-dir", str(out)]) == 0
    said_once()
    assert sorted(f.name for f in out.iterdir()) == ["speed.json", "speed.md"]

    out = tmp_path / "accuracy"
    _fake_run(out / "dgl" / "seed0", "dgl", [0.4, 0.7], None)
    result = accuracy.write_report(out, "t", "m", {"epochs": 2})
    said_once()
    assert [f.rsplit("/", 1)[-1] for f in result["files"]] == ["accuracy.md", "accuracy.json"]
    assert not (out / "curves.png").exists() and ".png" not in (out / "accuracy.md").read_text()


def test_benchmarks_ask_the_method_whether_it_trains_end_to_end(monkeypatch):
    class Whole(BP):
        name = "whole"  # an end-to-end method under another name than bp

    monkeypatch.setitem(registry._METHODS, "whole", Whole)
    assert common.end_to_end("whole") and common.model_k("whole", 4) == 1
    assert not common.end_to_end("dgl") and not common.end_to_end("not-a-method")
    assert memory.plan_cases({"resnet20": [1, 2]}, ["dgl", "whole"]) == [("resnet20", "whole", 1),
                                                                          ("resnet20", "dgl", 2)]
    peaks = [{"arch": "a", "batch": 2, "method": "dgl", "peak_bytes": 50},
             {"arch": "a", "batch": 2, "method": "whole", "peak_bytes": 100}]
    memory.add_percentages(peaks)
    assert peaks[0]["pct_of_bp"] == pytest.approx(50.0)
    runs = [{"finished": True, "test_error": e, "seed": 0, "method": m} for m, e in (("whole", 0.1), ("dgl", 0.3))]
    dgl = next(e for e in seeds.summarise(runs) if e["method"] == "dgl")
    assert dgl["vs_bp"]["mean"] == pytest.approx(0.2)
    rows = [{"name": m, "method": m, "path": m, "arch": "resnet20", "k": 1, "num_epochs": 1, "steps": 1,
             "test_accuracy": 1 - e, "test_error": e, "best_accuracy": 1 - e, "peak_memory_bytes": None,
             "wall_time": None, "finished": True} for m, e in (("whole", 0.1), ("dgl", 0.3))]
    assert "+20.00" in next(line for line in report.table(rows).splitlines() if "| dgl " in line)


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
