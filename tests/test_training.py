"""The training loop: config layering, schedule, checkpoints (atomic, weights-only, RNG), resume equality."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from mlaan import atomic, runtime
from mlaan.training import checkpoint as ckpt_io
from mlaan.training import make_trainer
from mlaan.training.config import TrainConfig, coerce, load_yaml, merge
from mlaan.training.loop import warmup_cosine
from mlaan.training.sampling import EpochSampler
from mlaan.training.sampling import SkipFirst as _Skip

TINY = {
    "dataset": "synthetic",
    "synthetic_train_size": 128,
    "synthetic_test_size": 64,
    "arch": "resnet20",
    "method": "dgl+mlaan",
    "local_modules": 3,
    "batch_size": 32,
    "epochs": 2,
    "lr": 0.05,
    "warmup_epochs": 1,
}


def run(tmp_path, name="run", resume=None, **overrides):
    values = {**TINY, "output_dir": str(tmp_path / name), **overrides}
    trainer = make_trainer(None, values, resume, log=lambda m: None)
    summary = trainer.fit()
    trainer.close()
    return trainer, summary


# ------------------------------------------------------------------------------------------------ config
def test_layers_later_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nbatch-size: 32\nlr: 1e-3\ninfopro_lambda_recon: [4, 1]\namp: yes\n")
    file_values = load_yaml(path)
    assert file_values == {
        "epochs": 7, "batch_size": 32, "lr": 1e-3, "infopro_lambda_recon": (4.0, 1.0), "amp": True,
    }  # '1e-3' (a string to YAML 1.1) is read as a float
    cfg = merge(file_values, {"batch_size": 64})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.arch) == (7, 64, 1e-3, TrainConfig.arch)


def test_bad_config_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'epoch' \(did you mean 'epochs'\?\); known keys: "):
        load_yaml(path)
    for key in ("resume", "print-config", "config", "Resume"):  # flags of one invocation, not settings of the run
        path.write_text(f"{key}: true\n")
        flag = key.lower()
        with pytest.raises(ValueError, match=rf"'{key}' cannot be set in a config file; give --{flag} on the command"):
            load_yaml(path)
    path.write_text("? [a, b]\n: 1\n")  # YAML's complex key: a TypeError and a traceback before
    with pytest.raises(ValueError, match="not valid YAML: a key must be a name, got a list"):
        load_yaml(path)
    path.write_text("epochs: many\n")
    with pytest.raises(ValueError, match=r"'epochs': 'many' is not a valid int"):
        load_yaml(path)
    path.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="not a valid int"):
        coerce("epochs", 2.5)


def test_resolve_fills_and_checks():
    cfg = TrainConfig().resolve()
    assert (cfg.local_modules, cfg.output_dir) == (16, os.path.join("runs", "fashion-mnist-resnet32-dgl+mlaan-K16"))
    assert TrainConfig(method="BP").resolve().local_modules == 1
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg99'; available: resnet20"):
        TrainConfig(arch="vgg99").resolve()
    with pytest.raises(ValueError, match=r"unknown method 'dgl\+foo' \(did you mean 'dgl'\?\); available: bp, dgl"):
        TrainConfig(method="dgl+foo").resolve()
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        TrainConfig(epochs=0).resolve()


def test_every_config_file_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 59
    for path in configs:
        cfg = merge(load_yaml(path)).resolve()
        if cfg.method == "bp":
            assert cfg.local_modules == 1, path


def test_warmup_then_cosine():
    f = warmup_cosine(4, 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)
    no_warmup = warmup_cosine(0, 10)
    assert no_warmup(0) == 1.0 and no_warmup(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(s) == first
    s.set_epoch(3)
    assert list(s) != first
    s.set_epoch(2)
    assert list(_Skip(s, 4)) == first[4:] and len(_Skip(s, 4)) == 6


# -------------------------------------------------------------------------------------------- checkpoints
def test_atomic_save_and_load(tmp_path):
    atomic.atomic_save({"a": torch.arange(3), "b": [1, "x"]}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    assert oct((tmp_path / "c.pt").stat().st_mode & 0o777) != oct(0o600) or os.umask(0o022) == 0o077
    obj = ckpt_io.load(tmp_path / "c.pt")
    assert obj["b"] == [1, "x"] and torch.equal(obj["a"], torch.arange(3))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable checkpoint"):
        ckpt_io.load(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_io.load(tmp_path / "none.pt")
    with pytest.raises(ValueError, match="not an mlaan training checkpoint"):
        ckpt_io.load_training_checkpoint(tmp_path / "c.pt")


def test_rng_state_round_trip(tmp_path):
    state = ckpt_io.rng_state()
    atomic.atomic_save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(), random.gauss(0, 1))
    ckpt_io.set_rng_state(ckpt_io.load(tmp_path / "rng.pt"))
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand(), random.gauss(0, 1)) == expected[1:]


# ------------------------------------------------------------------------------------------------- trainer
def test_fit_writes_sane_outputs(tmp_path):
    trainer, summary = run(tmp_path, max_steps=5)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == [".mlaan.lock", "best.pt", "last.pt", "metrics.json",
                                                     "metrics.jsonl"]  # the lock file stays, released
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["steps"] == 5 and saved["steps_per_epoch"] == 4 and saved["epochs_completed"] == 1
    assert 0 <= saved["test_accuracy"] <= 1 and saved["test_error"] == pytest.approx(1 - saved["test_accuracy"])
    assert saved["peak_memory_bytes"] > 0 and saved["peak_memory_kind"] == "cpu_peak_rss"
    assert saved["config"]["local_modules"] == 3 and saved["config"]["method"] == "dgl+mlaan"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["complete"]) for r in lines] == [(1, 4, True), (2, 5, False)]
    ckpt = ckpt_io.load_training_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (1, 1, 5)
    assert any(k.startswith("cascade_heads.") for k in ckpt["model"])  # aux nets and EMA twins are saved


def test_resume_continues_exactly(tmp_path):
    """2 epochs in one go == 5 steps, stop, resume to the end (mid-epoch stop included)."""
    straight, _ = run(tmp_path, "straight")
    stopped, _ = run(tmp_path, "resumed", max_steps=5)
    resumed, summary = run(tmp_path, "resumed", resume="auto")
    assert summary["steps"] == 8 and summary["resumed_from"].endswith("last.pt")
    a, b = straight.local_model.state_dict(), resumed.local_model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in opt_a:
        torch.testing.assert_close(opt_a[key]["momentum_buffer"], opt_b[key]["momentum_buffer"], rtol=0, atol=0)
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in lines] == [(1, 4), (2, 8)]  # the epoch cut at step 5 is one line
    whole = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train_loss"], r["train_accuracy"]) for r in lines] == [
        (r["train_loss"], r["train_accuracy"]) for r in whole]


def test_peak_memory_is_the_largest_of_the_runs_invocations(tmp_path, monkeypatch):
    """metrics.json held the last process's peak only: a resume that used less hid the run's real peak."""
    def peak(count, kind="cpu_peak_rss"):
        monkeypatch.setattr(runtime, "peak_memory", lambda device: (count, kind))

    peak(5000)
    run(tmp_path, max_steps=1)
    assert ckpt_io.load_training_checkpoint(tmp_path / "run" / "last.pt")["peak_memory_bytes"] == 5000
    shutil.copytree(tmp_path / "run", tmp_path / "older")
    peak(3000)
    _, summary = run(tmp_path, resume="auto", max_steps=2)
    assert (summary["peak_memory_bytes"], summary["peak_memory_kind"]) == (5000, "cpu_peak_rss")
    last_line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last_line["peak_memory_bytes"] == 5000
    assert ckpt_io.load_training_checkpoint(tmp_path / "run" / "last.pt")["peak_memory_bytes"] == 5000

    # a checkpoint written before the run's peak was saved still resumes: the peak is then this process's
    older = tmp_path / "older" / "last.pt"
    ckpt = torch.load(older, weights_only=True)
    del ckpt["peak_memory_bytes"], ckpt["peak_memory_kind"]
    torch.save(ckpt, older)
    _, summary = run(tmp_path, "older", resume="auto", max_steps=2)
    assert summary["peak_memory_bytes"] == 3000
    for value, shown in ((1.5, "1.5"), (-5, "-5"), ({"a": 1}, "a dict")):  # a value is shown, not "a int"
        with pytest.raises(ValueError, match=f"field 'peak_memory_bytes' should be an integer >= 0, got {shown}$"):
            ckpt_io.check_checkpoint_fields({**ckpt, "peak_memory_bytes": value}, older)


def test_a_peak_measured_another_way_is_not_compared():
    progress = ckpt_io.Progress(peak_memory_bytes=5000, peak_memory_kind="cuda_max_memory_allocated")
    assert progress.run_peak_memory((3000, "cpu_peak_rss")) == (3000, "cpu_peak_rss")
    assert progress.run_peak_memory((7000, "cuda_max_memory_allocated")) == (7000, "cuda_max_memory_allocated")


def test_resume_refuses_another_model(tmp_path):
    run(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"is for local_modules=3 but this run has --local-modules 2"):
        make_trainer(None, {**TINY, "output_dir": str(tmp_path / "run"), "local_modules": 2}, "auto")
    with pytest.raises(ValueError, match=r"is for method='dgl\+mlaan' but this run has --method 'dgl'"):
        make_trainer(None, {"output_dir": str(tmp_path / "run"), "method": "dgl"}, str(tmp_path / "run" / "last.pt"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        make_trainer(None, {**TINY, "output_dir": str(tmp_path / "empty")}, "auto")


def test_existing_run_is_not_overwritten(tmp_path):
    run(tmp_path, max_steps=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValueError, match=r"already holds a run .*--resume.*--overwrite"):
        make_trainer(None, {**TINY, "output_dir": str(tmp_path / "run")})
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    _, summary = run(tmp_path, overwrite=True, max_steps=2)
    assert summary["steps"] == 2


def test_bp_and_non_finite_loss(tmp_path):
    _, summary = run(tmp_path, "bp", method="bp", local_modules=None, max_steps=2)
    assert summary["config"]["local_modules"] == 1 and summary["split"] == [list(range(10))]
    with pytest.raises(FloatingPointError, match="non-finite"):
        run(tmp_path, "nan", method="dgl", lr=1e30, warmup_epochs=0, max_steps=4)


def test_tensorboard_logs_or_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
            make_trainer(None, {**TINY, "output_dir": str(tmp_path / "tb"), "tensorboard": True})
        return
    run(tmp_path, "tb", method="bp", local_modules=1, max_steps=1, tensorboard=True)
    assert any(p.name.startswith("events.") for p in (tmp_path / "tb" / "tensorboard").iterdir())


# ------------------------------------------------------------------------------------------- precise BN
def test_precise_batchnorm_is_the_average_of_the_batch_statistics():
    """PreciseBN's running mean is the mean of the batch means (``update_bn``'s cumulative average) of the first
    BatchNorm's input, the batches are drawn by the seed alone, and the global random state is left as it was."""
    from torch import nn

    from mlaan.data.tensors import TensorImageDataset
    from mlaan.training import precise_batchnorm

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 2, 4, 4), dtype=torch.uint8)
    flip = lambda x: x.float().flip(-1) if torch.rand(()) < 0.5 else x.float()  # noqa: E731  draws from the global RNG
    dataset = TensorImageDataset(images, torch.zeros(40), transform=flip)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    net.eval()
    before = torch.random.get_rng_state()
    used = precise_batchnorm(net, dataset, batches=3, batch_size=8, device=torch.device("cpu"), seed=7, step=2)
    assert used == 24 and not net.training  # the mode is restored
    assert torch.equal(torch.random.get_rng_state(), before)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(7 * 1000003 + 2))[:24]
    with torch.no_grad():  # the flips do not change a 1x1 conv's per-channel mean
        means = [net[0](images[order[i:i + 8]].float()).mean((0, 2, 3)) for i in (0, 8, 16)]
    torch.testing.assert_close(net[1].running_mean, torch.stack(means).mean(0))
    assert net[1].momentum == 0.1  # update_bn puts the layer's own momentum back
    assert precise_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 1)), dataset, 1, 8, torch.device("cpu")) == 0
    with pytest.raises(ValueError, match="batches >= 1"):
        precise_batchnorm(net, dataset, 0, 8, torch.device("cpu"))


def test_precise_bn_changes_the_evaluation_not_the_training(tmp_path, monkeypatch):
    """--precise-bn evaluates a re-estimated copy: the trained state is bit-identical to a run without it, the
    logged accuracy differs, and `mlaan eval` of the checkpoint reproduces the logged accuracy by default."""
    from mlaan.cli import main

    plain, plain_summary = run(tmp_path, "plain", epochs=1)
    precise, precise_summary = run(tmp_path, "precise", epochs=1, precise_bn=2)
    a, b = plain.local_model.state_dict(), precise.local_model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert precise_summary["config"]["precise_bn"] == 2
    # the statistics matter (a few %), more than the float rounding of another memory format and thread count
    assert abs(precise_summary["test_loss"] / plain_summary["test_loss"] - 1) > 0.01
    for name, summary in (("plain", plain_summary), ("precise", precise_summary)):
        out = tmp_path / f"{name}.json"
        with open(out, "w") as f, contextlib.redirect_stdout(f):
            assert main(["eval", "--checkpoint", str(tmp_path / name / "last.pt"), "--json"]) == 0
        report = json.loads(out.read_text())
        assert report["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
        assert report["precise_bn"] == (2 if name == "precise" else 0)
    # the export holds the re-estimated statistics: evaluating it (nothing more to re-estimate) gives the same
    with contextlib.redirect_stdout(None):
        assert main(["export", "--checkpoint", str(tmp_path / "precise" / "last.pt"),
                     "--out", str(tmp_path / "net.pt")]) == 0
    out = tmp_path / "export.json"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main(["eval", "--checkpoint", str(tmp_path / "net.pt"), "--json"]) == 0
    report = json.loads(out.read_text())
    assert report["precise_bn"] == 0
    assert report["test_loss"] == pytest.approx(precise_summary["test_loss"], rel=1e-4)
    # --modules evaluates the local model with the same re-estimated backbone
    import mlaan.training.loop

    seen = []
    monkeypatch.setattr(mlaan.training.loop, "evaluate_modules", lambda model, *a: seen.append(model) or {})
    with contextlib.redirect_stdout(None):
        assert main(["eval", "--checkpoint", str(tmp_path / "precise" / "last.pt"), "--modules"]) == 0
    exported = torch.load(tmp_path / "net.pt", weights_only=True)
    stats = {k: v for k, v in seen[0].backbone.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert stats and all(torch.allclose(v, exported[k], rtol=1e-4, atol=1e-6) for k, v in stats.items())
