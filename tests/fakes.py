"""Tiny fake datasets in the real on-disk formats, so tests exercise the real loaders.

Images are seeded noise around a per-class colour (so a model can tell classes apart).
Every writer returns the root to pass to ``dmnsp.datasets.load_dataset``.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.utils.data
from PIL import Image

from dmnsp.datasets import DatasetSplits, _cifar100_names, _tinyimagenet_names

# wnids that are not among the 200 TinyImageNet classes: the first gets a words.txt entry
# (name fallback), the second none (falls back to the wnid itself).
UNKNOWN_WNIDS = ("n99999901", "n99999902")
UNKNOWN_WNID_WORDS = "fake gadget, gizmo"


def class_images(
    n: int, cls: int, n_classes: int, size: int, channels: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` uint8 images (n, size, size, channels): noise around a colour that depends on ``cls``."""
    base = (np.arange(channels) * 97 + cls * 255 // max(n_classes, 1)) % 256
    noise = rng.integers(-24, 25, size=(n, size, size, channels))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ CIFAR100


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes, as the real CIFAR files (pickled by Python 2) do.

    Loaded with ``encoding="latin1"`` (torchvision) the keys come back as ``str``; loaded with
    ``encoding="bytes"`` as ``b"data"`` etc., exactly like the real files.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj: object, path: Path) -> None:
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(obj)


def make_fake_cifar100(
    root: str | Path, n_train_per_class: int = 2, n_test_per_class: int = 1, seed: int = 0
) -> Path:
    """Write ``<root>/cifar-100-python/{train,test,meta}`` in the real pickled format (32x32 RGB).

    Class names are the real ones; coarse labels are ``fine // 5`` (not the real superclasses).
    The md5 sums differ from the real files: tests must bypass torchvision's integrity check.
    """
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(_cifar100_names())
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = np.tile(np.arange(100), per_class)
        rng.shuffle(labels)
        images = np.concatenate([class_images(1, int(c), 100, 32, 3, rng) for c in labels])
        _dump_py2(
            {
                b"filenames": [f"fake_{split}_{i}.png".encode() for i in range(len(labels))],
                b"batch_label": f"fake {split} batch".encode(),
                b"fine_labels": [int(c) for c in labels],
                b"coarse_labels": [int(c) // 5 for c in labels],
                # Rows hold the red, then green, then blue plane, as in the real files.
                b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072),
            },
            folder / split,
        )
    _dump_py2(
        {
            b"fine_label_names": [n.encode() for n in names],
            b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)],
        },
        folder / "meta",
    )
    return root


# -------------------------------------------------------------------------------------- TinyImageNet


def make_fake_tinyimagenet(
    root: str | Path,
    n_classes: int = 200,
    n_train: int = 2,
    n_val: int = 1,
    unknown_wnids: int = 0,
    size: int = 8,
    seed: int = 0,
) -> Path:
    """Write a ``<root>/tiny-imagenet-200`` tree (JPEG images, real file layout).

    The classes are the first ``n_classes - unknown_wnids`` packaged wnids, in the standard
    order, then up to two wnids outside TinyImageNet (see ``UNKNOWN_WNIDS``).
    """
    if not 0 <= unknown_wnids <= len(UNKNOWN_WNIDS) or unknown_wnids > n_classes:
        raise ValueError(f"unknown_wnids must lie in 0..{min(len(UNKNOWN_WNIDS), n_classes)}")
    root = Path(root)
    folder = root / "tiny-imagenet-200"
    packaged = _tinyimagenet_names()
    wnids = list(packaged)[: n_classes - unknown_wnids] + list(UNKNOWN_WNIDS[:unknown_wnids])
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = [f"{w}\t{name}, other name" for w, name in packaged.items()]
    words += [f"{UNKNOWN_WNIDS[0]}\t{UNKNOWN_WNID_WORDS}", "n00001740\tentity"]
    (folder / "words.txt").write_text("\n".join(words) + "\n")
    val_lines = []
    (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    for cls, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        boxes = []
        for i, img in enumerate(class_images(n_train, cls, n_classes, size, 3, rng)):
            Image.fromarray(img).save(images_dir / f"{wnid}_{i}.JPEG", format="JPEG")
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
        for img in class_images(n_val, cls, n_classes, size, 3, rng):
            name = f"val_{len(val_lines)}.JPEG"
            Image.fromarray(img).save(folder / "val" / "images" / name, format="JPEG")
            val_lines.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(val_lines) + "\n")
    (folder / "test" / "images").mkdir(parents=True, exist_ok=True)  # unlabelled in the real set
    return root


# --------------------------------------------------------------------------------------- imagefolder


def make_fake_imagefolder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog", "fox"),
    n_train: int = 3,
    n_test: int = 2,
    size: int = 8,
    ext: str = "png",
    seed: int = 0,
) -> Path:
    """Write ``<root>/{train,test}/<class>/<i>.<ext>`` RGB images."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for cls, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(class_images(count, cls, len(classes), size, 3, rng)):
                Image.fromarray(img).save(folder / f"{i}.{ext}")
    return root


# ----------------------------------------------------------------------------------------- in memory


class ArrayImageDataset(torch.utils.data.Dataset):
    """In-memory images (uint8, N x H x W or N x H x W x 3) -> (PIL image, int label)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.targets[i])


def make_fake_splits(
    n_classes: int = 10,
    n_train_per_class: int = 20,
    n_test_per_class: int = 5,
    size: int = 8,
    grayscale: bool = True,
    name: str = "fake",
    seed: int = 0,
) -> DatasetSplits:
    """A seeded in-memory :class:`DatasetSplits` (no files), labels interleaved as in real data."""
    rng = np.random.default_rng(seed)
    channels = 1 if grayscale else 3

    def split(per_class: int) -> ArrayImageDataset:
        targets = rng.permutation(np.repeat(np.arange(n_classes), per_class))
        images = np.concatenate([class_images(1, int(c), n_classes, size, channels, rng) for c in targets])
        return ArrayImageDataset(images[..., 0] if grayscale else images, targets)

    train, test = split(n_train_per_class), split(n_test_per_class)
    return DatasetSplits(
        name=name,
        train=train,
        test=test,
        train_targets=train.targets.copy(),
        test_targets=test.targets.copy(),
        class_names=[f"class {i}" for i in range(n_classes)],
        default_class_order=list(range(n_classes)),
    )


# ------------------------------------------------------------------------------- real runs, tiny
#: A run on the real offline Fashion-MNIST (Debian's files) with the tiny CLIP at random weights:
#: 2 tasks of 5 classes, a few images and optimiser steps (a second or two per task on 2 cores).
MINI_RUN = {
    "dataset": "fashion-mnist",
    "model_name": "dmnsp-tiny",
    "pretrained": None,
    "initial_increment": 5,
    "increment": 5,
    "max_train_per_class": 16,
    "max_test_per_class": 8,
    "adapter_dim": 4,
    "batch_size": 16,
    "epochs": 1,
    "max_steps": 2,
    "warmup_steps": 0,
    "device": "cpu",
    "threads": 1,
    "num_workers": 0,
}


def mini_run_config(root: Path, **changes: object) -> Path:
    """``root/run.yaml`` holding :data:`MINI_RUN` with ``changes`` (datasets decompressed under
    ``root/data`` on first use); skips the test when Fashion-MNIST is not installed."""
    import pytest
    import yaml

    from dmnsp.datasets import FASHION_MNIST_DEBIAN_DIR

    if not FASHION_MNIST_DEBIAN_DIR.is_dir():
        pytest.skip(
            f"Fashion-MNIST not installed in {FASHION_MNIST_DEBIAN_DIR} (apt-get install dataset-fashion-mnist)"
        )
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump({**MINI_RUN, "dataset_root": str(root / "data"), **changes}))
    return path
