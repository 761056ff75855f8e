"""Class orders, task splits and the seeded choice of pretraining, validation, train and test samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import make_fake_splits, make_fake_tinyimagenet
from torchvision import transforms

from dmnsp.config import ConfigError, validate
from dmnsp.datasets import default_class_order, load_dataset
from dmnsp.scenario import (
    Scenario,
    ScenarioError,
    TaskDataset,
    build_scenario,
    num_tasks,
    resolve_class_order,
    split_tasks,
)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def fake():
    # 10 classes x 20 train / 5 test images, grayscale, in memory.
    return make_fake_splits(n_classes=10, n_train_per_class=20, n_test_per_class=5)


def indices_by_task(scn: Scenario) -> dict[str, list[np.ndarray]]:
    return {"train": scn.train_indices, "val": scn.val_indices, "test": scn.test_indices}


# --------------------------------------------------------------------------------------- task split


@pytest.mark.parametrize(
    ("n", "initial", "increment", "expected"),
    [
        (100, 10, 10, 10),
        (100, 5, 5, 20),
        (100, 2, 2, 50),
        (200, 100, 20, 6),
        (200, 100, 10, 11),
        (200, 100, 5, 21),
        (10, 2, 2, 5),
        (10, 10, 3, 1),
    ],
)
def test_num_tasks_matches_split(n, initial, increment, expected):
    order = list(np.random.default_rng(n).permutation(n))
    tasks = split_tasks(order, initial, increment)
    assert num_tasks(n, initial, increment) == len(tasks) == expected
    assert len(tasks[0]) == initial and all(len(t) == increment for t in tasks[1:])
    assert [c for t in tasks for c in t] == [int(c) for c in order]  # order kept, every class once


def test_standard_splits_with_packaged_orders():
    cifar = split_tasks(default_class_order("cifar100"), 10, 10)
    assert len(cifar) == 10 and cifar[0] == [87, 0, 52, 58, 44, 91, 68, 97, 51, 15]
    tiny = split_tasks(default_class_order("tinyimagenet"), 100, 5)
    assert len(tiny) == 21 and len(tiny[0]) == 100 and {len(t) for t in tiny[1:]} == {5}
    assert sorted(c for t in tiny for c in t) == list(range(200))


@pytest.mark.parametrize(
    ("n", "initial", "increment", "message"),
    [
        (100, 10, 7, "not a multiple of increment 7"),
        (100, 120, 10, "initial_increment 120 is larger than the 100 classes"),
        (200, 100, 30, r"increments that fit: 1, 2, 4, 5, 10, 20, 25, 50, 100"),
        (10, 0, 2, "must be >= 1"),
    ],
)
def test_bad_splits(n, initial, increment, message):
    with pytest.raises(ScenarioError, match=message):
        split_tasks(list(range(n)), initial, increment)
    with pytest.raises(ScenarioError, match=message):
        num_tasks(n, initial, increment)


# -------------------------------------------------------------------------------------- class order


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([0, 1, 2, 2, 3], "more than once: 2"),
        ([0, 1, 2, 3, 7], r"outside 0\.\.4 .*: 7"),
        ([0, 1, 2, 3], "leaves out 1 of the dataset's 5 classes: 4"),
        ([0, 1, 2, 3, -1], "outside"),
        ([0, 1, 2, 3, "4"], "integer"),
        ([0, 1, 2, 3, True], "integer"),
    ],
)
def test_bad_class_orders(order, message):
    with pytest.raises(ScenarioError, match=message):
        resolve_class_order(order, 5, list(range(5)), None)


def test_scenario_error_is_a_config_error():
    assert issubclass(ScenarioError, ConfigError)


def test_class_order_sources(tmp_path):
    assert resolve_class_order(None, 4, [3, 1, 0, 2], None) == [3, 1, 0, 2]
    assert resolve_class_order([2, 0, 1, 3], 4, [0, 1, 2, 3], None) == [2, 0, 1, 3]
    path = tmp_path / "order.yaml"
    path.write_text("class_order: [1, 3, 0, 2]\n")
    assert resolve_class_order(str(path), 4, [0, 1, 2, 3], None) == [1, 3, 0, 2]
    assert resolve_class_order(path, 4, [0, 1, 2, 3], None) == [1, 3, 0, 2]
    with pytest.raises(ScenarioError, match="does not exist"):
        resolve_class_order(str(tmp_path / "nope.yaml"), 4, [0, 1, 2, 3], None)
    # Both shapes are accepted (the same reader serves planning and the job).
    path.write_text("[1, 3, 0, 2]\n")
    assert resolve_class_order(str(path), 4, [0, 1, 2, 3], None) == [1, 3, 0, 2]
    path.write_text("order: [1, 3, 0, 2]\n")
    with pytest.raises(ScenarioError, match="`class_order:` list"):
        resolve_class_order(str(path), 4, [0, 1, 2, 3], None)


def test_class_order_seed_permutes():
    base = default_class_order("cifar100")
    a = resolve_class_order(None, 100, base, 1)
    assert a == resolve_class_order(None, 100, base, 1)  # deterministic
    assert a != base and sorted(a) == list(range(100))
    assert a == [int(c) for c in np.random.default_rng(1).permutation(base)]
    assert resolve_class_order(None, 100, base, 2) != a
    assert all(type(c) is int for c in a)


# -------------------------------------------------------------------------------- sample assignment


def assert_disjoint_and_covering(scn: Scenario, data) -> None:
    train_sets = [("pretrain", scn.pretrain_indices)]
    for name, per_task in indices_by_task(scn).items():
        if name != "test":
            train_sets += [(f"{name}{t}", a) for t, a in enumerate(per_task)]
    everything = np.concatenate([a for _, a in train_sets])
    assert len(np.unique(everything)) == len(everything), "pretrain/val/train share .train indices"
    test_all = np.concatenate(scn.test_indices)
    assert len(np.unique(test_all)) == len(test_all), "a test index appears in two tasks"
    for t, task in enumerate(scn.tasks):  # every sample of task t belongs to one of its classes
        for a, targets in (
            (scn.train_indices[t], data.train_targets),
            (scn.val_indices[t], data.train_targets),
            (scn.test_indices[t], data.test_targets),
        ):
            assert set(targets[a].tolist()) <= set(task)


def test_assignment_disjoint_counts_and_labels(fake):
    cfg = {
        "initial_increment": 4,
        "increment": 2,
        "class_order": [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
        "pretrain_per_class": 3,
        "val_fraction": 0.25,
        "max_train_per_class": 10,
        "max_test_per_class": 4,
    }
    scn = build_scenario(fake, cfg)
    assert scn.tasks == [[9, 8, 7, 6], [5, 4], [3, 2], [1, 0]]
    assert_disjoint_and_covering(scn, fake)
    # Per class: 20 images -> 3 pretraining, round(0.25 * 17) = 4 validation, 10 of the other 13 train.
    assert len(scn.pretrain_indices) == 10 * 3
    assert np.bincount(fake.train_targets[scn.pretrain_indices]).tolist() == [3] * 10
    assert [len(a) for a in scn.val_indices] == [16, 8, 8, 8]
    assert [len(a) for a in scn.train_indices] == [40, 20, 20, 20]
    assert [len(a) for a in scn.test_indices] == [16, 8, 8, 8]
    assert all(np.all(np.diff(a) > 0) for a in scn.train_indices + scn.val_indices + scn.test_indices)
    assert scn.label_map == {c: pos for pos, c in enumerate(range(9, -1, -1))}
    assert scn.class_names[:2] == ["class 9", "class 8"]
    assert scn.task_classes(0) == [0, 1, 2, 3] and scn.task_classes(2) == [6, 7]
    assert scn.seen_classes(1) == [0, 1, 2, 3, 4, 5] and scn.seen_classes(3) == list(range(10))
    with pytest.raises(IndexError, match="4 tasks"):
        scn.task_classes(4)


def test_without_limits_everything_is_used(fake):
    scn = build_scenario(fake, {"initial_increment": 5, "increment": 5})
    assert scn.pretrain_indices.size == 0 and all(a.size == 0 for a in scn.val_indices)
    np.testing.assert_array_equal(np.sort(np.concatenate(scn.train_indices)), np.arange(200))
    np.testing.assert_array_equal(np.sort(np.concatenate(scn.test_indices)), np.arange(50))


def test_same_seed_same_indices_other_seed_other(fake):
    cfg = {
        "initial_increment": 2,
        "increment": 2,
        "pretrain_per_class": 2,
        "val_fraction": 0.2,
        "max_train_per_class": 8,
        "max_test_per_class": 3,
    }
    a, b = build_scenario(fake, cfg), build_scenario(fake, dict(cfg))
    c = build_scenario(fake, {**cfg, "data_seed": 1})
    assert a.provenance() == b.provenance()
    assert c.provenance()["counts"] == a.provenance()["counts"]
    for name in ("train", "val", "test"):
        assert a.provenance()["sha256"][name] != c.provenance()["sha256"][name], name
    assert not np.array_equal(a.pretrain_indices, c.pretrain_indices)


def test_pretrain_slice_independent_of_order_split_and_limits(fake):
    base = {"initial_increment": 2, "increment": 2, "pretrain_per_class": 4, "data_seed": 3}
    ref = build_scenario(fake, base).pretrain_indices
    for change in (
        {"class_order_seed": 5},
        {"initial_increment": 10},
        {"val_fraction": 0.5},
        {"max_train_per_class": 2},
        {"max_test_per_class": 1},
        {"seed": 99},
    ):
        np.testing.assert_array_equal(build_scenario(fake, {**base, **change}).pretrain_indices, ref)
    # The validation split does not depend on the training cap either.
    v = {**base, "val_fraction": 0.3}
    np.testing.assert_array_equal(
        np.concatenate(build_scenario(fake, v).val_indices),
        np.concatenate(build_scenario(fake, {**v, "max_train_per_class": 1}).val_indices),
    )


def test_class_order_seed_changes_tasks_not_samples(fake):
    base = {"initial_increment": 2, "increment": 2, "max_train_per_class": 5}
    a, b = build_scenario(fake, base), build_scenario(fake, {**base, "class_order_seed": 7})
    assert a.class_order != b.class_order and sorted(b.class_order) == list(range(10))
    assert b.tasks[0] == b.class_order[:2]
    np.testing.assert_array_equal(
        np.sort(np.concatenate(a.train_indices)), np.sort(np.concatenate(b.train_indices))
    )


def test_too_few_images(fake):
    with pytest.raises(
        ScenarioError, match="class 0 .* 20 training images, fewer than pretrain_per_class=21"
    ):
        build_scenario(fake, {"pretrain_per_class": 21})
    with pytest.raises(ScenarioError, match="no training images left"):
        build_scenario(fake, {"pretrain_per_class": 19, "val_fraction": 0.9})


def test_config_errors(fake):
    with pytest.raises(ScenarioError, match="not a multiple of increment 3"):
        build_scenario(fake, {"initial_increment": 2, "increment": 3})
    with pytest.raises(ScenarioError, match="more than once"):
        build_scenario(fake, {"class_order": [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]})
    with pytest.raises(ScenarioError, match="names dataset 'cifar100'"):
        build_scenario(fake, {"dataset": "cifar100"})
    with pytest.raises(ScenarioError, match="data_seed must be >= 0"):
        build_scenario(fake, {"data_seed": -1})


def test_provenance_is_json(fake):
    prov = build_scenario(fake, {"max_test_per_class": 2, "val_fraction": 0.1}).provenance()
    again = json.loads(json.dumps(prov))
    assert again == prov
    assert again["counts"]["test"] == [4] * 5 and len(again["sha256"]["train"]) == 5
    assert again["tasks"][0] == [0, 1]


# ------------------------------------------------------------------------------------- TaskDataset


def test_task_dataset_remaps_and_transforms(fake):
    scn = build_scenario(
        fake, {"class_order": [3, 1, 4, 0, 5, 9, 2, 6, 8, 7], "initial_increment": 2, "increment": 2}
    )
    to_rgb = transforms.Compose([transforms.Lambda(lambda im: im.convert("RGB")), transforms.ToTensor()])
    ds = TaskDataset(fake.train, scn.train_indices[1], scn.label_map, to_rgb)
    assert len(ds) == 40
    labels = set()
    for i in range(len(ds)):
        x, y = ds[i]
        labels.add(y)
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert scn.class_order[y] == fake.train_targets[scn.train_indices[1][i]]
    assert labels == set(scn.task_classes(1)) == {2, 3}
    raw_img, _ = TaskDataset(fake.train, scn.train_indices[0], scn.label_map)[0]
    assert raw_img.mode == "L"  # no transform: the base image as is
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 3, 8, 8) and set(batch[1].tolist()) <= {2, 3}


# ------------------------------------------------------------------------------- with real loaders


def test_tinyimagenet_100_5_with_default_order(tmp_path):
    data = load_dataset("tinyimagenet", make_fake_tinyimagenet(tmp_path, n_classes=200, n_train=2, n_val=1))
    scn = build_scenario(
        data, validate({"dataset": "tinyimagenet", "initial_increment": 100, "increment": 5})
    )
    assert len(scn.tasks) == 21 and scn.class_order == default_class_order("tinyimagenet")
    assert [len(a) for a in scn.test_indices] == [100] + [5] * 20
    assert scn.class_names[0] == data.class_names[scn.class_order[0]]
    assert_disjoint_and_covering(scn, data)


def test_subset_copy_needs_explicit_order(tmp_path):
    data = load_dataset("tinyimagenet", make_fake_tinyimagenet(tmp_path, n_classes=4))
    with pytest.raises(ScenarioError, match="covers 200 classes but this copy has 4"):
        build_scenario(data, {"initial_increment": 2, "increment": 2})
    assert (
        len(build_scenario(data, {"class_order": [3, 2, 1, 0], "initial_increment": 2, "increment": 2}).tasks)
        == 2
    )


def test_fashion_mnist_scenario(tmp_path):
    if not DEBIAN_FMNIST.is_dir():
        pytest.fail(f"{DEBIAN_FMNIST} missing: install it with `apt-get install dataset-fashion-mnist`")
    data = load_dataset("fashion-mnist", tmp_path)
    cfg = validate(
        {
            "pretrain_per_class": 500,
            "val_fraction": 0.1,
            "max_train_per_class": 1000,
            "max_test_per_class": 300,
        }
    )
    scn = build_scenario(data, cfg)
    assert len(scn.tasks) == 5 and scn.class_names[:2] == ["T-shirt/top", "Trouser"]
    assert len(scn.pretrain_indices) == 5000
    assert [len(a) for a in scn.val_indices] == [1100] * 5  # round(0.1 * 5500) per class
    assert [len(a) for a in scn.train_indices] == [2000] * 5
    assert [len(a) for a in scn.test_indices] == [600] * 5
    assert_disjoint_and_covering(scn, data)
