"""The CPU fast path: bf16 autocast, channels-last, the thread count — and the engine's guarantees under them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_engine import batch, step
from test_training import TINY, run

import mlaan
from mlaan import runtime
from mlaan.training import make_trainer


def _model(method: str = "dgl+mlaan", k: int = 4) -> mlaan.LocalModel:
    torch.manual_seed(0)
    return mlaan.create_local_model("resnet20", method, k)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


# ------------------------------------------------------------------------------------------ choosing the path
@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "AMX-BF16"),
    ("fpu avx512f avx512_bf16", "AVX512-BF16"),
    ("fpu avx2", None),
])
def test_cpu_bf16_support_is_read_from_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: set(flags.split()))
    assert runtime.cpu_bf16() == expected
    assert runtime.recommended_amp(torch.device("cpu")) == (expected == "AMX-BF16")


def test_amp_without_bf16_instructions_warns_once_and_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2"})
    path, warnings = runtime.resolve_fast_path(torch.device("cpu"), amp=True, channels_last=None, threads=1)
    assert path.autocast_dtype is None and len(warnings) == 1
    assert "neither AVX512-BF16 nor AMX-BF16" in warnings[0] and "fp32" in warnings[0]
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512_bf16"})
    path, warnings = runtime.resolve_fast_path(torch.device("cpu"), amp=True, channels_last=None, threads=1)
    assert path.autocast_dtype == torch.bfloat16 and warnings == [] and path.bf16 == "AVX512-BF16"


def test_channels_last_defaults_on_for_cpu_only():
    cpu, _ = runtime.resolve_fast_path(torch.device("cpu"), amp=False, channels_last=None, threads=1)
    mps, _ = runtime.resolve_fast_path(torch.device("mps"), amp=False, channels_last=None, threads=None)
    forced, _ = runtime.resolve_fast_path(torch.device("cpu"), amp=False, channels_last=False, threads=1)
    assert cpu.channels_last and not mps.channels_last and not forced.channels_last
    assert mps.threads is None  # a GPU run leaves torch's CPU threads alone


def test_more_threads_than_cores_is_said(monkeypatch):
    """`--threads 64` on 2 cores was taken without a word; its team would wait on itself."""
    monkeypatch.setattr(runtime, "_usable_cpus", lambda: [0, 1])
    path, warnings = runtime.resolve_fast_path(torch.device("cpu"), amp=False, channels_last=None, threads=64)
    assert path.threads == 64 and len(warnings) == 1
    assert warnings[0].startswith("--threads 64 x 1 process(es) is more than the 2 core(s)")
    assert runtime.resolve_fast_path(torch.device("cpu"), amp=False, channels_last=None, threads=2)[1] == []
    assert len(runtime.resolve_fast_path(torch.device("cpu"), False, None, threads=2, share=2)[1]) == 1


def test_threads_follow_the_idle_cores_unless_chosen(monkeypatch):
    samples = iter([{0: (0, 0), 1: (0, 0)}, {0: (100, 100), 1: (2, 100)}])  # core 0 idle, core 1 busy
    monkeypatch.setattr(runtime, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(runtime, "_usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.choose_threads(None) == 1
    assert runtime.choose_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.choose_threads(None) == torch.get_num_threads()
    with pytest.raises(ValueError, match=r"threads must be 1 to \d+ .*, got 0"):
        runtime.choose_threads(0)
    # a team OpenMP cannot create aborts the process (libgomp: "Thread creation failed"): a fuzzed checkpoint's
    # threads of 100000 ended a test session without a word
    with pytest.raises(ValueError, match=rf"threads must be 1 to {runtime.max_threads()} .*, got 100000"):
        runtime.choose_threads(100_000)


def test_free_cores_counts_mostly_idle_cores(monkeypatch):
    samples = iter([{0: (0, 0), 1: (0, 0), 2: (0, 0)}, {0: (90, 100), 1: (70, 100), 2: (10, 100)}])
    monkeypatch.setattr(runtime, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(runtime, "_usable_cpus", lambda: [0, 1, 2])
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    assert runtime.free_cores() == 2  # 0.9 + 0.7 + 0.1 = 1.7 idle cores


# ------------------------------------------------------------------------------------- the engine under them
@pytest.mark.parametrize("method", ["bp", "dgl+mlaan", "infopro+mlaan"])
def test_channels_last_changes_results_only_by_rounding(method):
    """Channels-last is a memory layout: a layout error moves losses and gradients by O(1), rounding by little.
    The tolerances are about ten times the spread measured between the two layouts (one step, 2 threads): module
    losses differ by at most 1.1e-4 (absolute, AMD EPYC AVX2; 1e-7 relative on an AMD EPYC Zen 4), a weight
    gradient by at most 2.2e-3 in norm relative to its own (infopro+mlaan's decoder, Zen 4; 3e-4 for dgl), the
    eval-mode logits by at most 7e-7."""
    plain = _model(method, 1 if method == "bp" else 4)
    nhwc = copy.deepcopy(plain).set_channels_last()
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = batch()
    a, b = step(plain, x, y), step(nhwc, x, y)
    torch.testing.assert_close(a["module_losses"], b["module_losses"], rtol=0, atol=1e-3)
    for g, h in zip(_grads(plain), _grads(nhwc), strict=True):
        assert float((g - h).norm() / h.norm().clamp_min(1e-12)) < 2e-2
    plain.eval(), nhwc.eval()
    torch.testing.assert_close(plain(x), nhwc(x), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_losses_parameters_and_gradients_in_fp32():
    fp32, amp = _model(), _model()
    amp.autocast_dtype = torch.bfloat16
    x, y = batch()
    a, b = step(fp32, x, y), step(amp, x, y)
    assert all(p.dtype == torch.float32 for p in amp.parameters())
    assert all(g.dtype == torch.float32 for g in _grads(amp))
    assert a["module_losses"] != b["module_losses"]  # autocast did take effect...
    torch.testing.assert_close(a["module_losses"], b["module_losses"], rtol=0.05, atol=0.05)  # ...within bf16


@pytest.mark.parametrize("method", ["dgl+mlaan", "infopro+mlaan"])
def test_grad_checkpointing_is_exact_under_bf16_and_channels_last(method):
    plain = _model(method).set_channels_last()
    plain.autocast_dtype = torch.bfloat16
    recomputing = copy.deepcopy(plain)
    recomputing.set_grad_checkpointing(True)
    x, y = batch()
    assert step(plain, x, y)["module_losses"] == step(recomputing, x, y)["module_losses"]
    for g, h in zip(_grads(plain), _grads(recomputing)):
        assert torch.equal(g, h)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), recomputing.state_dict().values()))


def test_non_finite_loss_is_caught_under_bf16():
    model = _model()
    model.autocast_dtype = torch.bfloat16
    with torch.no_grad():
        model.cascade_heads["2"].head.classifier[-1].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at local module 2"):
        step(model, *batch())


# ---------------------------------------------------------------------------------------- the trainer with them
def test_resume_is_bit_identical_under_bf16_and_channels_last(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512_bf16"})
    fast = {"amp": True, "channels_last": True, "threads": 2}
    straight, summary = run(tmp_path, "straight", **fast)
    run(tmp_path, "resumed", max_steps=5, **fast)
    resumed, _ = run(tmp_path, "resumed", resume="auto", **fast)
    a, b = straight.local_model.state_dict(), resumed.local_model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert summary["fast_path"] == {"autocast_dtype": "bfloat16", "channels_last": True, "threads": 2,
                                    "bf16": "AVX512-BF16"}


def test_the_run_says_which_path_it_took(tmp_path, capsys):
    lines = []
    trainer = make_trainer(None, {**TINY, "output_dir": str(tmp_path / "r"), "max_steps": 1, "threads": 1,
                                  "channels_last": False}, log=lines.append)
    summary = trainer.fit()
    trainer.close()
    assert "(fp32, contiguous (NCHW), 1 thread)" in lines[0]
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["fast_path"] == summary["fast_path"] == {"autocast_dtype": None, "channels_last": False,
                                                          "threads": 1, "bf16": runtime.cpu_bf16()}
    assert torch.get_num_threads() == 1


def test_per_module_losses_are_logged_each_epoch(tmp_path):
    run(tmp_path, "m", max_steps=2)
    line = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    independent, cascaded = line["train_independent_losses"], line["train_cascaded_losses"]
    assert len(independent) == len(cascaded) == TINY["local_modules"]
    assert all(v > 0 for v in independent)
    assert cascaded[0] is None and cascaded[1] > 0  # module 0 has no cascade of its own
    assert cascaded[-1] == independent[-1]  # the last module's real head serves both paths


@pytest.mark.parametrize(("flags", "expected", "words"), [
    ({"amx_bf16", "avx512_bf16"}, ["--amp"], "bf16 autocast (AMX-BF16) + channels_last"),
    ({"avx512_bf16"}, [], "fp32 + channels_last (bf16 off: AVX512-BF16 without AMX measured slower"),
    ({"avx2"}, [], "bf16 off: no bf16 instructions"),
])
def test_make_demo_takes_the_fast_path_this_cpu_supports(monkeypatch, flags, expected, words):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    got, why = runtime.fast_path_flags(torch.device("cpu"))
    assert got == expected and words in why


# -------------------------------------------------------------------------- which modules lag: per-module predictions
@pytest.mark.parametrize("method", ["dgl", "dgl+mlaan", "dgl+lam", "infopro", "auglocal"])
def test_module_logits_are_each_aux_nets_prediction_and_the_backbones_last(method):
    model = _model(method).eval()
    x, _ = batch()
    predictions = model.module_logits(x)
    assert len(predictions) == 4 and all(p.shape == (len(x), 10) for p in predictions)
    torch.testing.assert_close(predictions[-1], model(x))
    features = model.local_modules[0](x)
    torch.testing.assert_close(predictions[0], model.independent_heads[0].logits(features))
    cascaded = model.module_logits(x, "cascaded")
    assert (cascaded[1] is not None) == (method == "dgl+mlaan")  # only MLM has cascaded aux nets
    if method == "dgl+mlaan":
        head = model.cascade_heads["1"]
        torch.testing.assert_close(cascaded[1], head.logits(model.local_modules[1](features)))


def test_a_contrastive_aux_net_predicts_no_class():
    torch.manual_seed(0)
    model = mlaan.create_local_model("resnet20", "infopro", 3, infopro_task="contrastive").eval()
    predictions = model.module_logits(batch()[0])
    assert predictions[:2] == [None, None] and predictions[2] is not None


def test_eval_modules_reports_each_aux_nets_accuracy(tmp_path, capsys):
    from mlaan.cli import main

    run(tmp_path, "m", max_steps=2)
    assert main(["eval", "--checkpoint", str(tmp_path / "m" / "last.pt"), "--modules", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    independent, cascaded = report["module_accuracies"]["independent"], report["module_accuracies"]["cascaded"]
    assert len(independent) == len(cascaded) == TINY["local_modules"] and all(0 <= a <= 1 for a in independent)
    assert cascaded[0] is None and all(0 <= a <= 1 for a in cascaded[1:])  # module 0 has no cascaded aux net
    assert independent[-1] == cascaded[-1] == pytest.approx(report["test_accuracy"])  # the last: the backbone
    assert main(["export", "--checkpoint", str(tmp_path / "m" / "last.pt"), "--out", str(tmp_path / "w.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "w.pt"), "--modules"]) == 2
    err = capsys.readouterr().err
    assert "--modules needs a training checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("flags", "bf16_timed"), [("fpu avx2", False), ("fpu avx512f avx512_bf16", True),
                                                   ("fpu avx512_bf16 amx_bf16", True)])
def test_bench_speed_times_bf16_by_default_only_where_the_cpu_has_it(monkeypatch, flags, bf16_timed):
    """On a CPU without bf16 instructions the default `bench speed` timed emulated bf16, 8-13x slower than fp32."""
    from mlaan.bench import speed

    monkeypatch.setattr(runtime, "_cpu_flags", lambda: set(flags.split()))
    formats, why = speed.default_formats()
    assert formats[:2] == ["fp32", "fp32+cl"] and ("bf16+cl" in formats) == bf16_timed
    assert ("neither AVX512-BF16 nor AMX-BF16" in why) != bf16_timed
    warning = speed.emulated_bf16_warning(["fp32", "bf16+cl"])
    assert (warning is None) == bf16_timed
    if warning:
        assert "--formats bf16+cl" in warning and "emulated" in warning
    assert speed.emulated_bf16_warning(["fp32", "fp32+cl"]) is None
