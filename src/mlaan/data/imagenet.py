"""ImageNet (or any data set laid out like it) as torchvision ImageFolders: ``<root>/train/<class>/*`` and
``<root>/val/<class>/*``; random resized 224 crops + flip for training, resize 256 + centre crop 224 for testing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .registry import DatasetInfo, DatasetSpec, register
from .transforms import eval_transform, resized_crop_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _build(
    spec: DatasetSpec, root: str | os.PathLike, download: bool, augment: bool, with_train: bool
) -> tuple[Any, Any, DatasetInfo]:
    from torchvision.datasets import ImageFolder

    train_dir, test_dir = (Path(root) / split for split in spec.splits)
    missing = [s for s in spec.splits if not (Path(root) / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{spec.name}: {root} has no {' or '.join(f'{m}/' for m in missing)} folder")
    test_tf = eval_transform(spec.mean, spec.std, resize=256, crop=spec.image_size)
    train_tf = resized_crop_transform(spec.image_size, spec.mean, spec.std)
    test = ImageFolder(str(test_dir), transform=test_tf)
    # the class list is the training folder's subfolders: comparing names needs no scan of the images
    train_classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if train_classes != test.classes:
        raise ValueError(f"{spec.name}: {spec.splits[0]}/ has {len(train_classes)} classes but {spec.splits[1]}/ "
                         f"has {len(test.classes)}")
    train = ImageFolder(str(train_dir), transform=train_tf if augment else test_tf) if with_train else None
    return train, test, spec.info(train, test, str(root), num_classes=len(test.classes))


register(DatasetSpec(
    "imagenet", "ImageNet as an ImageFolder with train/ and val/ (--data-root), 224×224", _build,
    num_classes=None, in_channels=3, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    root_hint="a folder with train/ and val/ class folders", obtain="point --data-root at train/ and val/ folders",
    splits=("train", "val"),
))
