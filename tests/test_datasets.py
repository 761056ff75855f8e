"""Dataset loaders, through torchvision and the real on-disk formats (fakes where data is not here)."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar
import yaml
from fakes import (
    UNKNOWN_WNID_WORDS,
    UNKNOWN_WNIDS,
    make_fake_cifar100,
    make_fake_imagefolder,
    make_fake_tinyimagenet,
)

from dmnsp import datasets
from dmnsp.config import ConfigError
from dmnsp.datasets import DataError, default_class_order, list_datasets, load_dataset, prepare_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
SHARED_ORDERS = Path("/work/shared/data/class_orders")
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def bypass_cifar_md5(monkeypatch):
    """Fake CIFAR files have other md5 sums: accept any existing file, in this test only."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    if not DEBIAN_FMNIST.is_dir():
        pytest.fail(f"{DEBIAN_FMNIST} missing: install it with `apt-get install dataset-fashion-mnist`")
    return tmp_path_factory.mktemp("fmnist")


# ------------------------------------------------------------------------------ registry and orders


def test_registry_needs_no_data():
    assert list_datasets() == ["cifar100", "fashion-mnist", "imagefolder", "tinyimagenet"]
    assert datasets.NUM_CLASSES == {"cifar100": 100, "tinyimagenet": 200, "fashion-mnist": 10}
    for name, n in datasets.NUM_CLASSES.items():
        order = default_class_order(name)
        assert sorted(order) == list(range(n)), name
    assert default_class_order("fashion-mnist") == list(range(10))
    assert default_class_order("cifar100")[:3] == [87, 0, 52]


def test_default_class_order_unknown_names():
    with pytest.raises(ConfigError, match="imagefolder"):
        default_class_order("imagefolder")
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", "data")


def test_class_order_files_equal_packaged_copies():
    top = {p.name: p.read_bytes() for p in (REPO / "class_orders").glob("*.yaml")}
    packaged = {p.name: p.read_bytes() for p in (REPO / "dmnsp" / "data" / "class_orders").glob("*.yaml")}
    assert set(top) == {"cifar100.yaml", "tinyimagenet.yaml", "fashion-mnist.yaml"}
    assert top == packaged
    for name, text in top.items():
        assert sorted(yaml.safe_load(text)["class_order"]) == list(range(datasets.NUM_CLASSES[name[:-5]]))


@pytest.mark.skipif(
    not SHARED_ORDERS.is_dir(), reason="/work/shared (the reference copies) is not on this machine"
)
def test_class_order_files_equal_shared_reference():
    shared = sorted(SHARED_ORDERS.glob("*.yaml"))
    assert shared, f"no class orders in {SHARED_ORDERS}"
    for path in shared:
        assert (REPO / "class_orders" / path.name).read_bytes() == path.read_bytes(), path.name


# ----------------------------------------------------------------------------------------- CIFAR100


def test_cifar100_fake_through_torchvision(tmp_path, bypass_cifar_md5):
    root = make_fake_cifar100(tmp_path, n_train_per_class=2, n_test_per_class=1)
    data = load_dataset("cifar100", root)
    assert (len(data.train), len(data.test)) == (200, 100)
    assert len(data.train_targets) == 200 and data.train_targets.dtype == np.int64
    assert np.bincount(data.train_targets).tolist() == [2] * 100
    assert data.class_names[:2] == ["apple", "aquarium_fish"] and len(data.class_names) == 100
    assert data.default_class_order == default_class_order("cifar100")
    # Same bytes as written: planes -> HWC image, label from fine_labels.
    with open(root / "cifar-100-python" / "train", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")  # real files are Python 2 pickles: bytes keys
    img, label = data.train[3]
    assert label == raw[b"fine_labels"][3] == data.train_targets[3]
    assert img.mode == "RGB" and img.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(img), raw[b"data"][3].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar100_fake_rejected_by_integrity_check(tmp_path):
    root = make_fake_cifar100(tmp_path)
    with pytest.raises(DataError, match="md5") as err:
        load_dataset("cifar100", root)
    assert str(root / "cifar-100-python") in str(err.value)


def test_cifar100_foreign_class_names(tmp_path, bypass_cifar_md5):
    root = make_fake_cifar100(tmp_path)
    meta = root / "cifar-100-python" / "meta"
    with open(meta, "rb") as fh:
        content = pickle.load(fh, encoding="latin1")
    content["fine_label_names"][0] = "not_an_apple"
    with open(meta, "wb") as fh:
        pickle.dump(content, fh)
    with pytest.raises(DataError, match="class names differ"):
        load_dataset("cifar100", root)


def test_cifar100_missing(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in msg and "download: true" in msg
    assert isinstance(err.value, FileNotFoundError)


# ------------------------------------------------------------------------------------- TinyImageNet


def test_tinyimagenet_fake(tmp_path):
    root = make_fake_tinyimagenet(tmp_path, n_classes=6, n_train=3, n_val=2, unknown_wnids=2)
    data = load_dataset("tinyimagenet", root)
    folder = root / "tiny-imagenet-200"
    wnids = (folder / "wnids.txt").read_text().split()
    assert (len(data.train), len(data.test)) == (18, 12)
    assert np.bincount(data.train_targets).tolist() == [3] * 6
    assert np.bincount(data.test_targets).tolist() == [2] * 6
    # Packaged names by wnid, then words.txt (first synonym), then the wnid itself.
    assert data.class_names[:2] == ["Egyptian Mau", "fishing casting reel"]
    assert data.class_names[4:] == [UNKNOWN_WNID_WORDS.split(",")[0], UNKNOWN_WNIDS[1]]
    # Train labels: line index of the wnid folder; test labels: from val_annotations.txt.
    for i in range(len(data.train)):
        path, label = data.train.samples[i]
        assert Path(path).parts[-3] == wnids[label] and data.train_targets[i] == label
    annotations = dict(
        line.split("\t")[:2] for line in (folder / "val" / "val_annotations.txt").read_text().splitlines()
    )
    for (path, label), target in zip(data.test.samples, data.test_targets, strict=True):
        assert annotations[Path(path).name] == wnids[label] and target == label
    img, label = data.test[0]
    assert img.size == (8, 8) and label == data.test_targets[0]


def test_tinyimagenet_full_fake_default_order(tmp_path):
    data = load_dataset("tinyimagenet", make_fake_tinyimagenet(tmp_path, n_classes=200, n_train=1, n_val=1))
    assert len(data.class_names) == 200 and data.class_names[0] == "Egyptian Mau"
    assert data.default_class_order == default_class_order("tinyimagenet")


def test_tinyimagenet_missing(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("tinyimagenet", tmp_path)
    assert str(tmp_path / "tiny-imagenet-200") in str(err.value) and "wnids.txt" in str(err.value)


def test_tinyimagenet_broken_val(tmp_path):
    root = make_fake_tinyimagenet(tmp_path, n_classes=3)
    (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match=re.escape(str(root / "tiny-imagenet-200" / "val"))):
        load_dataset("tinyimagenet", root)


# -------------------------------------------------------------------------------------- imagefolder


def test_imagefolder(tmp_path):
    root = make_fake_imagefolder(tmp_path, classes=("zebra", "ant", "moth"), n_train=3, n_test=2)
    data = load_dataset("imagefolder", root)
    assert data.class_names == ["ant", "moth", "zebra"]  # torchvision sorts the folders
    assert data.default_class_order == [0, 1, 2]
    assert data.train_targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.test_targets.tolist() == [0, 0, 1, 1, 2, 2]
    img, label = data.train[4]
    assert img.mode == "RGB" and label == 1


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train"))):
        load_dataset("imagefolder", tmp_path)
    make_fake_imagefolder(tmp_path, classes=("a", "b"))
    (tmp_path / "test" / "b").rename(tmp_path / "test" / "c")
    with pytest.raises(DataError, match=r"only in train: \['b'\]; only in test: \['c'\]"):
        load_dataset("imagefolder", tmp_path)


# ------------------------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_from_debian_files(fmnist_root):
    data = load_dataset("fashion-mnist", fmnist_root)  # prepares the raw files itself
    raw = fmnist_root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(datasets._FASHION_MNIST_FILES)
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert len(data.class_names) == 10 and data.default_class_order == list(range(10))
    assert np.bincount(data.train_targets).tolist() == [6000] * 10
    assert np.bincount(data.test_targets).tolist() == [1000] * 10
    img, label = data.train[0]
    assert img.mode == "L" and img.size == (28, 28) and label == data.train_targets[0]


def test_prepare_fashion_mnist_is_idempotent(fmnist_root):
    raw = prepare_fashion_mnist(fmnist_root)
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    assert prepare_fashion_mnist(fmnist_root, DEBIAN_FMNIST) == raw
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before
    assert (raw / "train-labels-idx1-ubyte").stat().st_size == 60008  # 8-byte idx header + labels


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path / "data")
    msg = str(err.value)
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download: true" in msg
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "no-debian"))):
        prepare_fashion_mnist(tmp_path / "data", tmp_path / "no-debian")
