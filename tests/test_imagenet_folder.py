"""The ImageNet path on a tiny generated ImageFolder (a few random JPEGs per class under train/ and val/):
mlaan.data's "imagenet" data set (RandomResizedCrop 224 + flip; Resize 256 / CenterCrop 224) feeding torchvision's
ResNet-18 cut into K local modules, in one process and under torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import mlaan
from mlaan import distributed as D

data = pytest.importorskip("mlaan.data")

CLASSES = ("ant", "bee", "cat")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a busy machine an OpenMP team waiting for a descheduled thread crawls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    g = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = 40 + 8 * i, 56 - 4 * i  # uneven sizes: the transforms must cope
                pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=85)
    return root


def test_evaluation_reads_only_val_but_checks_the_class_lists(image_folder, tmp_path):
    train, test, info = data.build_datasets("imagenet", image_folder, with_train=False)
    assert train is None and len(test) == 2 * len(CLASSES) and info.num_classes == len(CLASSES)
    (image_folder / "train" / "dog").mkdir()
    try:
        with pytest.raises(ValueError, match="train/ has 4 classes but val/ has 3"):
            data.build_datasets("imagenet", image_folder, with_train=False)
    finally:
        (image_folder / "train" / "dog").rmdir()


def test_imagefolder_trains_resnet18_local_modules(image_folder):
    train_set, test_set, info = data.build_datasets("imagenet", str(image_folder))
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 3, 224)
    assert (len(train_set), len(test_set)) == (12, 6)
    ctx = D.init_from_env("cpu")
    assert D.make_train_sampler(train_set, ctx, seed=0) is None  # one process: the loader shuffles
    model = mlaan.create_local_model("resnet18", method="dgl+mlaan", num_local_modules=4, num_classes=3)
    D.prepare_model(model, ctx, sync_bn=False)
    averager = D.GradientAverager(model, ctx)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    loader = DataLoader(train_set, batch_size=4, shuffle=True, drop_last=True)
    for step, (images, targets) in enumerate(loader):
        assert images.shape == (4, 3, 224, 224)
        model.zero_grad(set_to_none=True)
        stats = model.train_step(images, targets)
        averager.wait()
        opt.step()
        model.after_optimizer_step()
        assert len(stats["module_losses"]) == 4 and all(torch.isfinite(torch.tensor(stats["module_losses"])))
        if step == 1:  # two steps: the second runs after an optimizer step and the EMA twins' update
            break
    model.eval()
    images, _ = next(iter(DataLoader(test_set, batch_size=6)))
    with torch.no_grad():
        assert model(images).shape == (6, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_on_imagefolder(image_folder, tmp_path):
    """``torchrun --nproc-per-node 2 -m mlaan train`` on the ImageFolder: CPU/gloo, ResNet-18, K=4, SyncBN, 1 step."""
    pytest.importorskip("mlaan.cli")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "-m",
        "mlaan",
        "train",
        "--dataset",
        "imagenet",
        "--data-root",
        str(image_folder),
        "--arch",
        "resnet18",
        "--local-modules",
        "4",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--device",
        "cpu",
        "--sync-bn",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary  # rank 0 wrote the run's summary
    assert (out / "last.pt").is_file()
    ckpt = torch.load(out / "last.pt", weights_only=False)
    plain = mlaan.models.create("resnet18", num_classes=3)
    plain.load_state_dict({k[len("backbone.") :]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")})


def test_eval_on_another_data_set_says_once_before_the_progress_bar_that_it_resizes(image_folder, tmp_path,
                                                                                       capsys):
    """A 32x32 run evaluated on the 224x224 ImageFolder: one `mlaan: warning:` line of its own, before the progress
    bar, and no Python warning from the model in the middle of it."""
    from mlaan.cli import main

    run = tmp_path / "run"
    assert main(["train", "--dataset", "imagenet", "--data-root", str(image_folder), "--arch", "resnet20", "-K",
                 "2", "--image-size", "32", "--batch-size", "4", "--max-steps", "1", "--threads", "1",
                 "--output-dir", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "m.pt")]) == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["dataset"] = "other"  # as if trained elsewhere: the resize is then this evaluation's, not the run's
    (tmp_path / "m.json").write_text(json.dumps(meta))
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--dataset", "imagenet", "--data-root",
                     str(image_folder), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    line = "mlaan: warning: imagenet's 224x224 images are resized to 32x32, the size resnet20 was trained on\n"
    assert err.count(line) == 1 and err.index(line) < err.index("evaluating")
    assert not [w for w in caught if "resized" in str(w.message)]
