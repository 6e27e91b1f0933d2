"""`--data-on-device`: batched crops/flips equal to torchvision's per-image ones, batches fixed by (seed, batch),
exact resume, and a clear refusal of data sets it cannot hold."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import run
from torchvision.transforms.v2 import functional as TF

from mlaan.data import TensorImageDataset, build_datasets
from mlaan.data.device import DeviceBatches, DeviceImages
from mlaan.data.transforms import ImageTransform

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def _per_image(image, t: ImageTransform, top=0, left=0, flip=False):
    """The transform spelled out with torchvision's functional ops, for given draws."""
    x = TF.pad(image, [t.pre_pad]) if t.pre_pad else image
    if t.crop is not None:
        x = TF.pad(x, [t.crop_pad], padding_mode=t.padding_mode)
        x = TF.crop(x, top, left, t.crop, t.crop)
    if flip:
        x = TF.horizontal_flip(x)
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(t.mean), list(t.std))


@pytest.mark.parametrize("transform", [
    ImageTransform(MEAN, STD, crop=12, crop_pad=4, padding_mode="reflect", flip=True),  # synthetic's, CIFAR's
    ImageTransform(MEAN, STD, pre_pad=2, crop=16, crop_pad=4, padding_mode="constant", flip=True),  # F-MNIST's
])
def test_a_batch_is_the_per_image_transform_at_its_draws(transform):
    images = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = transform.batch(images, torch.Generator().manual_seed(5))
    # the draws, in the order batch() takes them: every top, every left, every flip
    g = torch.Generator().manual_seed(5)
    side = 12 + 2 * transform.pre_pad + 2 * transform.crop_pad
    top = torch.randint(0, side - transform.crop + 1, (64,), generator=g)
    left = torch.randint(0, side - transform.crop + 1, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    assert out.shape == (64, 3, transform.crop, transform.crop) and out.dtype == torch.float32
    assert 0 < flip.sum() < 64 and len(set(top.tolist())) > 3  # the test covers both flips and many offsets
    for i in range(64):
        expected = _per_image(images[i], transform, int(top[i]), int(left[i]), bool(flip[i]))
        torch.testing.assert_close(out[i], expected, rtol=0, atol=0)


def test_without_a_crop_the_batch_is_the_per_image_call():
    t = ImageTransform(MEAN[:1], STD[:1], pre_pad=2)
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    assert not t.random
    torch.testing.assert_close(t.batch(images), torch.stack([t(img) for img in images]), rtol=0, atol=0)


def _data(n=50):
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    t = ImageTransform(MEAN, STD, crop=8, crop_pad=2, flip=True)
    return DeviceImages(TensorImageDataset(images, torch.arange(n), t), "cpu")


def test_batches_follow_the_order_and_a_resumed_pass_sees_the_same_batches():
    data = _data()
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
    whole = list(DeviceBatches(data, order, 16, drop_last=True, seed=7))
    assert len(whole) == 3 and len(DeviceBatches(data, order, 16, seed=7)) == 4
    assert torch.equal(torch.cat([t for _, t in whole]), torch.tensor(order[:48]))
    again = list(DeviceBatches(data, order, 16, drop_last=True, seed=7))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again))
    resumed = list(DeviceBatches(data, order[16:], 16, drop_last=True, first_batch=1, seed=7))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[1:], resumed, strict=True))
    other = next(iter(DeviceBatches(data, order, 16, seed=8)))[0]
    assert not torch.equal(other, whole[0][0])  # another epoch or rank: other crops
    with pytest.raises(ValueError, match="needs a seed"):
        DeviceBatches(data, order, 16)


def test_a_subset_keeps_its_images():
    train, _, _ = build_datasets("synthetic", synthetic_train_size=40, synthetic_test_size=8, train_samples=10)
    data = DeviceImages(train, "cpu")
    assert len(data) == 10 and torch.equal(data.images, train.dataset.images[:10])


def test_a_data_set_it_cannot_hold_is_refused_in_one_line():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"--data-on-device needs a data set held in memory .*fashion-mnist"):
        DeviceImages(TensorImageDataset(images, torch.zeros(4), transform=lambda x: x.float()), "cpu")
    with pytest.raises(ValueError, match=r"got list"):
        DeviceImages([(images[0], 0)], "cpu")


def test_training_on_device_data_learns_and_resumes_exactly(tmp_path):
    """Same checks as the DataLoader path's: 2 epochs straight == 5 steps, stop, resume."""
    straight, summary = run(tmp_path, "straight", data_on_device=True)
    run(tmp_path, "resumed", data_on_device=True, max_steps=5)
    resumed, _ = run(tmp_path, "resumed", resume="auto")
    a, b = straight.local_model.state_dict(), resumed.local_model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    loader, _ = run(tmp_path, "loader")  # the DataLoader's random stream: another run, as documented
    assert not torch.equal(loader.local_model.state_dict()["backbone.blocks.0.0.weight"],
                           straight.local_model.state_dict()["backbone.blocks.0.0.weight"])
    config = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["config"]
    assert config["data_on_device"] is True and summary["steps"] == 8


def test_the_cli_refuses_a_data_set_read_one_image_at_a_time(tmp_path, capsys):
    """One line, exit 2, nothing written: a stand-in for torchvision's file-backed sets (CIFAR, SVHN, …)."""
    from mlaan.cli import main
    from mlaan.data import registry

    class FromFiles(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), i % 2

    def build(spec, root, download, augment, with_train, **own):
        return FromFiles(), FromFiles(), spec.info(FromFiles(), FromFiles(), "files")

    registry.register(registry.DatasetSpec("files-standin", "stand-in", build, num_classes=2, in_channels=3,
                                           image_size=32, mean=MEAN, std=STD, root="unused"))
    try:
        code = main(["train", "--dataset", "files-standin", "--arch", "resnet20", "-K", "2", "--epochs", "1",
                     "--data-on-device", "--output-dir", str(tmp_path / "run")])
    finally:
        registry._REGISTRY.pop("files-standin")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--data-on-device needs a data set held in memory" in err and "got FromFiles" in err
    assert not (tmp_path / "run").exists()


def test_a_run_from_before_the_flag_counts_as_without_it():
    """A checkpoint written before `data_on_device` existed ran with the DataLoader: turning the flag on at
    resume would switch its random stream mid-run, so it is refused like any other change."""
    from mlaan.training.resume import check_resume_config

    older = {"dataset": "synthetic", "batch_size": 32}  # no data_on_device key
    with pytest.raises(ValueError, match=r"data_on_device: false in the run, true given"):
        check_resume_config(older, {"data_on_device": True}, "runs/x/last.pt")
    check_resume_config(older, {"data_on_device": False, "max_steps": 3}, "runs/x/last.pt")  # no change: fine
