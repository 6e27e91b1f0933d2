"""Issue 15.7: losses reported apart, an export that says which epoch its weights are and where the data came
from, eval progress, bench help without doubled defaults, README's inference in eval mode."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import mlaan
from mlaan import data
from mlaan.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"  # where loading an export is shown


def test_mlm_reports_independent_and_cascaded_losses_apart():
    torch.manual_seed(0)
    model = mlaan.create_local_model("resnet20", method="dgl+mlm", num_local_modules=4)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    stats = model.train_step(x, y)
    ind, casc, combined = stats["independent_losses"], stats["cascaded_losses"], stats["module_losses"]
    assert len(ind) == len(casc) == len(combined) == 4
    assert casc[0] is None and all(c is not None for c in casc[1:])  # module 0 has no cascade
    w_ind, w_casc = model.options.w_ind, model.options.w_casc
    assert combined[1] == pytest.approx(w_ind * ind[1] + w_casc * casc[1], rel=1e-5)
    assert combined[0] == ind[0] and ind[0] > 10 * w_ind * ind[0]  # module 0's entry is its own loss, unweighted
    plain = mlaan.create_local_model("resnet20", method="dgl", num_local_modules=4).train_step(x, y)
    assert plain["cascaded_losses"] == [None] * 4 and plain["independent_losses"] == plain["module_losses"]


@pytest.fixture
def fashion_elsewhere(tmp_path, monkeypatch):
    """Fashion-MNIST only in a "system" folder, not under the default data root."""
    folder = tmp_path / "system-fashion"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        data.write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", folder)
    monkeypatch.chdir(tmp_path)  # no ./data here
    return folder


def test_export_says_which_epoch_and_where_the_data_were(fashion_elsewhere, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--arch", "resnet20", "-K", "2", "--batch-size", "16", "--epochs", "2",
                 "--device", "cpu", "--output-dir", str(run)]) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "m.pt")]) == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["data_root"] == str(fashion_elsewhere)
    assert (meta["epoch"], meta["best_epoch"]) == (2, ckpt["best_epoch"])
    assert meta["is_best"] == (ckpt["best_epoch"] == 2)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--batch-size", "8"]) == 0
    assert "evaluating on 32 fashion-mnist test images" in capsys.readouterr().err


@pytest.fixture
def gray_sets(monkeypatch):
    """Two registered 1-channel data sets besides Fashion-MNIST, recording the data root each is read from:
    ``gray-ten`` of 10 classes, and ``gray-folder`` whose classes are known once read (3, as an ImageFolder's)."""
    from mlaan.data import registry

    roots = []

    class Gray(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.zeros(1, 32, 32), i % 3

    def build(spec, root, download, augment, with_train):
        roots.append(root)
        return Gray(), Gray(), spec.info(Gray(), Gray(), str(root), num_classes=spec.num_classes or 3)

    for name, classes in (("gray-ten", 10), ("gray-folder", None)):
        spec = registry.DatasetSpec(name, "stand-in", build, num_classes=classes, in_channels=1, image_size=32,
                                    mean=(0.5,), std=(0.25,))
        monkeypatch.setitem(registry._REGISTRY, name, spec)
    return roots


def test_eval_on_another_data_set_reads_the_runs_data_root(fashion_elsewhere, gray_sets, tmp_path, capsys):
    """`mlaan eval --dataset OTHER` of a Fashion-MNIST run looked for OTHER in (and with --download fetched it into)
    the folder Fashion-MNIST was found in, Debian's, not the run's --data-root; a network that cannot take OTHER
    was refused only after reading it."""
    run, export = tmp_path / "run", tmp_path / "m.pt"
    assert main(["train", "--arch", "resnet20", "-K", "2", "--batch-size", "16", "--max-steps", "1", "--device", "cpu",
                 "--output-dir", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--out", str(export)]) == 0
    meta = json.loads(export.with_suffix(".json").read_text())
    assert (meta["data_root"], meta["configured_data_root"]) == (str(fashion_elsewhere), "data")
    assert meta["data_options"] == {}  # the synthetic data set's sizes are not Fashion-MNIST's
    for checkpoint, flags in ((run / "last.pt", []), (export, []), (run / "last.pt", ["--data-root", "mine"])):
        assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "gray-ten", "--device", "cpu", *flags]) == 0
    del meta["configured_data_root"]  # an export written before it: Fashion-MNIST's data_root is its own folder
    export.with_suffix(".json").write_text(json.dumps(meta))
    assert main(["eval", "--checkpoint", str(export), "--dataset", "gray-ten", "--device", "cpu"]) == 0
    assert gray_sets == ["data", "data", "mine", "data"]
    capsys.readouterr()

    for dataset, has, fits in (("imagenet", "3-channel images", "fashion-mnist, gray-ten, gray-folder"),
                               ("gray-folder", "3 classes of 1-channel images", "fashion-mnist, gray-ten")):
        assert main(["eval", "--checkpoint", str(export), "--dataset", dataset, "--data-root", "nowhere"]) == 2
        assert capsys.readouterr().err == (f"mlaan: error: checkpoint {export} was trained for 10 classes of 1-channel "
                                           f"images, but {dataset} has {has}; data sets it can take: {fits}\n")
    assert gray_sets[4:] == ["nowhere"]  # an ImageFolder's classes are known once read; imagenet's channels before


@pytest.mark.parametrize("command", ["memory", "speed", "accuracy"])
def test_bench_help_says_each_default_once_and_helps_every_option(command, capsys):
    with pytest.raises(SystemExit):
        main(["bench", command, "--help"])
    text = capsys.readouterr().out
    options = text.split("options:")[1].split("data sets:")[0]
    entries = re.split(r"\n  (?=-)", options)
    assert entries and all(entry.count("default") <= 1 for entry in entries), options
    assert "(default: None)" not in options
    for entry in entries[1:]:
        assert len(entry.split()) > 2 or "{" in entry, f"no help: {entry!r}"


def test_readme_infers_in_eval_mode():
    text = README.read_text()
    for call in ("logits = model(test_images)",):
        before = text[: text.index(call)]
        assert any(line.strip().startswith("model.eval()") for line in before.rstrip().splitlines()[-2:])
    text = CLI_DOC.read_text()
    load = text.index("net.load_state_dict(torch.load(")
    assert "net.eval()" in text[load: load + 200]


def test_an_export_knows_its_weights_are_the_best_also_inside_an_epoch(tmp_path, capsys):
    """An evaluation at a --max-steps stop inside an epoch can set best.pt: its export says is_best, and the
    end-of-epoch last.pt of the same epoch number says so only if its own evaluation was the best (best_step)."""
    from mlaan.training.export import holds_best

    run = tmp_path / "run"
    synth = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32",
             "--arch", "resnet20", "-K", "2", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
             "--output-dir", str(run)]
    assert main(["train", *synth, "--max-steps", "2"]) == 0  # 2 of the epoch's 4 steps, then an evaluation
    best = torch.load(run / "best.pt", weights_only=True)
    assert (best["epoch"], best["epoch_step"], best["step"], best["best_step"]) == (0, 2, 2, 2)
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "b.pt")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["is_best"] is True  # the epoch rule said False
    assert main(["train", *synth, "--resume"]) == 0  # the rest of the epoch, evaluated again
    last = torch.load(run / "last.pt", weights_only=True)
    improved = last["best_step"] == 4
    assert holds_best(last) == improved and last["best_epoch"] == 1
    assert holds_best(torch.load(run / "best.pt", weights_only=True))
    capsys.readouterr()


def test_checkpoints_without_best_step_fall_back_to_the_epoch_rule():
    from mlaan.training.export import holds_best

    assert holds_best({"epoch": 2, "epoch_step": 0, "best_epoch": 2, "step": 8})
    assert not holds_best({"epoch": 2, "epoch_step": 3, "best_epoch": 2, "step": 11})
    assert not holds_best({"epoch": 2, "epoch_step": 0, "best_epoch": 2, "step": 8, "best_step": 6})
    assert holds_best({"epoch": 1, "epoch_step": 2, "best_epoch": 2, "step": 6, "best_step": 6})
