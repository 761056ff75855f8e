"""Data and weights staged before training (dmnsp.staging, `dmnsp fetch-data` / `fetch-weights`,
the workflow's download_data / fetch_weights rules), offline: fake CIFAR100 and TinyImageNet copies
in their real formats, Debian's Fashion-MNIST, open_clip weights faked in a Hugging Face cache
folder; and `train-task --pretrained-file`, the staged copy of a checkpoint that keeps the run's
identity."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import open_clip
import pytest
import torch
import torchvision
import yaml
from fakes import make_fake_cifar100, make_fake_tinyimagenet, mini_run_config

import dmnsp.model as dm
from dmnsp import staging
from dmnsp.checkpoint import load_checkpoint
from dmnsp.cli import main
from dmnsp.config import config_hash, load_config
from dmnsp.datasets import DataError, TinyImageNet, fetch_dataset
from dmnsp.model import ModelError, WeightsError, create_clip, fetch_weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture
def bypass_cifar_md5(monkeypatch):
    """Fake CIFAR files have other md5 sums: accept any existing file, in this test only."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


@pytest.fixture
def offline(monkeypatch):
    """No download of any kind succeeds (whatever the machine's network)."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", refuse)
    monkeypatch.setattr(dm, "_network_available", lambda *a, **k: False)


def fake_hf_cache(cache: Path, model: str = "ViT-B-16", tag: str = "openai", payload: bytes = b"w") -> Path:
    """Weights of ``model``/``tag`` in Hugging Face's cache layout, as open_clip downloads them:
    ``models--<org>--<name>/{blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/main}``."""
    repo, filename = os.path.split(open_clip.get_pretrained_cfg(model, tag)["hf_hub"])
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    blob = folder / "blobs" / "5f1c0ffee"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(payload)
    snapshot = folder / "snapshots" / commit / (filename or "open_clip_pytorch_model.bin")
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return folder


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------- layout


def test_data_folders_are_the_loaders_folders():
    fmnist = torchvision.datasets.FashionMNIST.__new__(torchvision.datasets.FashionMNIST)
    fmnist.root = "r"
    assert Path(fmnist.raw_folder).parent == Path("r") / staging.DATA_FOLDERS["fashion-mnist"]
    assert staging.DATA_FOLDERS["cifar100"] == torchvision.datasets.CIFAR100.base_folder
    assert staging.DATA_FOLDERS["tinyimagenet"] == TinyImageNet.base_folder
    assert staging.DATA_FOLDERS["imagefolder"] == ""
    from dmnsp.datasets import list_datasets

    assert sorted(staging.DATA_FOLDERS) == list_datasets()


@pytest.mark.parametrize(
    ("dataset", "root", "folder"),
    [
        ("cifar100", "data", "data/cifar-100-python"),
        ("cifar100", "data/", "data/cifar-100-python"),
        ("fashion-mnist", "/abs/data", "/abs/data/FashionMNIST"),
        ("tinyimagenet", ".", "tiny-imagenet-200"),
        ("imagefolder", "my/images", "my/images"),
    ],
)
def test_data_folder_and_root(dataset, root, folder):
    assert staging.data_folder(dataset, root) == folder
    # A job reads a staged copy, e.g. under Snakemake's local storage prefix: the root holding it.
    copy = f".snakemake/storage/s3/bucket/study/{folder}".replace("//", "/")
    expected = os.path.normpath(f".snakemake/storage/s3/bucket/study/{root}")
    assert staging.data_root(dataset, copy) == expected
    with pytest.raises(ValueError, match="is not a"):
        if dataset != "imagefolder":
            staging.data_root(dataset, "data/other-folder")
        else:
            raise ValueError("imagefolder: is not a dataset folder")


def test_staging_for_a_run():
    default = staging.staging_for({})
    assert (default.dataset, default.data_folder, default.download) == (
        "fashion-mnist",
        "data/FashionMNIST",
        False,
    )
    assert default.weights_folder == "weights/ViT-B-16/openai" and default.pretrained_file is None
    tiny = staging.staging_for(
        {"model_name": "dmnsp-tiny", "pretrained": "results/pretrained/x/model.pt", "dataset": "cifar100"}
    )
    assert tiny.pretrained_file == "results/pretrained/x/model.pt" and tiny.weights_folder is None
    assert tiny.data_folder == "data/cifar-100-python"
    random = staging.staging_for({"pretrained": None, "download": True, "dataset_root": "~/d"})
    assert random.weights_folder is None and random.pretrained_file is None and random.download
    assert random.data_folder == os.path.expanduser("~/d/FashionMNIST")


# ------------------------------------------------------------------------------------ datasets


def test_fetch_present_cifar100_checks_and_keeps_it(tmp_path, bypass_cifar_md5, offline):
    make_fake_cifar100(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cifar-100-python").iterdir()}
    assert fetch_dataset("cifar100", tmp_path) == tmp_path / "cifar-100-python"
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cifar-100-python").iterdir()} == before


def test_fetch_runs_torchvisions_md5_check(tmp_path, offline):
    make_fake_cifar100(tmp_path)  # fake files: their md5 sums are not the real ones
    with pytest.raises(DataError, match="md5"):
        fetch_dataset("cifar100", tmp_path)


def test_fetch_missing_cifar100_offline_names_the_folder(tmp_path, offline):
    with pytest.raises(DataError) as err:
        fetch_dataset("cifar100", tmp_path)
    line = one_line(str(err.value))
    assert f"no folder {tmp_path / 'cifar-100-python'}" in line and "cifar-100-python.tar.gz" in line
    with pytest.raises(DataError, match=r"downloading CIFAR100 into .* failed \(<urlopen error offline"):
        fetch_dataset("cifar100", tmp_path, download=True)


def test_fetch_tinyimagenet(tmp_path, offline):
    make_fake_tinyimagenet(tmp_path, n_classes=3, n_train=1, n_val=1)
    assert fetch_dataset("tinyimagenet", tmp_path) == tmp_path / "tiny-imagenet-200"
    empty = tmp_path / "empty"
    for download in (False, True):
        with pytest.raises(DataError) as err:
            fetch_dataset("tinyimagenet", empty, download=download)
        line = one_line(str(err.value))
        assert str(empty / "tiny-imagenet-200") in line and "tiny-imagenet-200.zip" in line
    assert "downloading TinyImageNet" in str(err.value)


def test_fetch_fashion_mnist_from_debian(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    assert fetch_dataset("fashion-mnist", tmp_path) == tmp_path / "FashionMNIST"
    assert len(list(raw.iterdir())) == 4
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    fetch_dataset("fashion-mnist", tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before


def test_fetch_data_cli_one_line_error(tmp_path, capsys, offline):
    assert main(["fetch-data", "--dataset", "tinyimagenet", "--root", str(tmp_path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("dmnsp fetch-data: error: TinyImageNet not found: no folder")
    config = mini_run_config(tmp_path, dataset="imagefolder", dataset_root=str(tmp_path / "imgs"))
    assert main(["fetch-data", "--config", str(config)]) == 2
    assert str(tmp_path / "imgs" / "train") in one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------- weights


def test_fetch_weights_from_a_cache_folder(tmp_path, monkeypatch, offline):
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    entry = fake_hf_cache(cache, payload=b"fake ViT-B-16 weights")
    out = tmp_path / "weights" / "ViT-B-16" / "openai"
    assert fetch_weights("ViT-B-16", "openai", out, cache_dir=str(cache)) == out
    staged = out / entry.name
    blob = next((entry / "blobs").iterdir())
    assert (staged / "blobs" / blob.name).stat().st_ino == blob.stat().st_ino  # hard link, not a copy
    # open_clip's own lookup (what a training job does with cache_dir=out) finds them there, offline.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    found = open_clip.pretrained.download_pretrained(cfg, cache_dir=str(out))
    assert Path(found).read_bytes() == b"fake ViT-B-16 weights" and str(out) in found
    assert dm.resolve_weights("ViT-B-16", "openai", str(out)) == "openai"
    # Staged already: nothing happens (even with the source gone).
    shutil.rmtree(cache)
    assert fetch_weights("ViT-B-16", "openai", out) == out


def test_fetch_weights_offline_names_what_to_place(tmp_path, capsys, offline):
    out = tmp_path / "weights" / "ViT-B-16" / "openai"
    with pytest.raises(WeightsError) as err:
        fetch_weights("ViT-B-16", "openai", out, cache_dir=str(tmp_path / "cache"))
    line = one_line(str(err.value))
    assert "models--timm--vit_base_patch16_clip_224.openai" in line and str(tmp_path / "cache") in line
    assert str(out) in line and "internet is not reachable" in line
    assert not out.exists()
    args = ["fetch-weights", "--model", "ViT-B-16", "--pretrained", "openai", "--out-dir", str(out)]
    assert main(args) == 2
    assert one_line(capsys.readouterr().err).startswith("dmnsp fetch-weights: error: weights ViT-B-16/openai")


def test_fetch_weights_refuses_files_and_unknown_tags(tmp_path):
    with pytest.raises(ModelError, match="is a file, not an open_clip tag"):
        fetch_weights("dmnsp-tiny", str(tmp_path / "model.pt"), tmp_path / "w")
    with pytest.raises(ModelError, match="unknown pretrained tag 'nope'"):
        fetch_weights("ViT-B-16", "nope", tmp_path / "w")


# ---------------------------------------------------------------------- train-task --pretrained-file


def test_pretrained_file_is_read_from_the_staged_copy_and_keeps_the_identity(tmp_path):
    """The workflow gives a training job the staged copy of the config's `pretrained` checkpoint
    (remote storage puts it under another prefix every time): the job loads the copy, and its
    checkpoint's identity is the config's, so task 1 resumes from it with another copy elsewhere."""
    weights = tmp_path / "a" / "model.pt"
    weights.parent.mkdir()
    torch.save(create_clip("dmnsp-tiny", None, seed=7, adapter_dim=None).model.state_dict(), weights)
    (tmp_path / "direct").mkdir()
    (tmp_path / "named").mkdir()
    direct = mini_run_config(tmp_path / "direct", pretrained=str(weights))
    named = mini_run_config(tmp_path / "named", pretrained="results/pretrained/x/model.pt")  # not here
    train = ["train-task", "--quiet", "--task", "0"]
    assert main([*train, "--config", str(direct), "--out-dir", str(tmp_path / "direct" / "task0")]) == 0
    staged = ["--pretrained-file", str(weights)]
    assert (
        main([*train, "--config", str(named), *staged, "--out-dir", str(tmp_path / "named" / "task0")]) == 0
    )
    rows = [json.loads((tmp_path / d / "task0" / "eval.json").read_text()) for d in ("direct", "named")]
    same = ("accuracy_per_task", "predictions_per_class")
    assert [{k: r[k] for k in same} for r in rows[:1]] == [{k: r[k] for k in same} for r in rows[1:]]
    cfg = load_config(str(named))
    checkpoint = tmp_path / "named" / "task0" / "checkpoint.pt"
    assert load_checkpoint(checkpoint, cfg, expect_task=0).task == 0  # identity: the config's own
    assert config_hash(cfg) != config_hash(load_config(str(direct)))
    elsewhere = tmp_path / "b" / "model.pt"
    elsewhere.parent.mkdir()
    shutil.copy(weights, elsewhere)
    resume = ["--task", "1", "--resume", str(checkpoint), "--pretrained-file", str(elsewhere)]
    args = [
        "train-task",
        "--quiet",
        "--config",
        str(named),
        *resume,
        "--out-dir",
        str(tmp_path / "named" / "task1"),
    ]
    assert main(args) == 0


def test_pretrained_file_only_for_a_checkpoint_config(tmp_path, capsys):
    config = mini_run_config(tmp_path, pretrained=None)
    args = ["train-task", "--config", str(config), "--task", "0", "--out-dir", str(tmp_path / "t0")]
    assert main([*args, "--pretrained-file", str(tmp_path / "x.pt")]) == 2
    assert "not a checkpoint file" in one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------- the workflow


def snakemake(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(cwd)]
    env = {**ENV, "HF_HUB_OFFLINE": "1"}  # offline, whatever the machine's network
    proc = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def staging_config(path: Path, data: Path, cache: Path) -> Path:
    """CIFAR100 and TinyImageNet with ViT-B-16 `openai` weights (zero-shot only: planning needs
    nothing else), data under ``data``, weights cached in ``cache``."""
    run = {
        "dataset_root": str(data),
        "cache_dir": str(cache),
        "model_name": "ViT-B-16",
        "pretrained": "openai",
    }
    cfg = {
        "run": run,
        "experiments": {
            "cifar": {"datasets": ["cifar100"], "splits": ["50-50"], "methods": ["zeroshot"]},
            "tiny": {"datasets": ["tinyimagenet"], "splits": ["100-100"], "methods": ["zeroshot"]},
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def job_stats(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a run: {rule: count}."""
    found = re.search(r"Job stats:\n.*?\n-+ +-+\n(.*?)\ntotal", proc.stdout + proc.stderr, re.DOTALL)
    assert found, proc.stdout + proc.stderr
    return {rule: int(n) for rule, n in (line.split() for line in found.group(1).splitlines())}


def planned(proc: subprocess.CompletedProcess) -> set[str]:
    """Rules of the jobs a dry-run plans."""
    return set(re.findall(r"^(?:local)?rule (\w+):$", proc.stdout + proc.stderr, re.MULTILINE))


@pytest.mark.slow
def test_workflow_stages_data_and_weights_offline(tmp_path):
    """Data already in place: download_data does not run; weights in a cache folder: fetch_weights
    stages them (offline) and then does not run again; nothing in place: one line each, naming
    what to place where."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_fake_cifar100(data)
    make_fake_tinyimagenet(data, n_classes=200, n_train=1, n_val=1, size=4)
    fake_hf_cache(cache)
    config = staging_config(tmp_path / "config.yaml", data, cache)
    until = ("--until", "download_data", "fetch_weights", "--cores", "2")
    first = snakemake(*until, "--configfile", str(config), cwd=tmp_path)
    assert job_stats(first) == {"fetch_weights": 1}, first.stdout + first.stderr  # the data is there
    assert list((tmp_path / "weights" / "ViT-B-16" / "openai").glob("models--*/snapshots/*/*"))
    again = snakemake("-n", "--configfile", str(config), cwd=tmp_path)
    assert not planned(again) & {"fetch_weights", "download_data"}, again.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = staging_config(empty / "config.yaml", empty / "data", empty / "cache")
    failed = snakemake(*until, "--keep-going", "--configfile", str(missing), cwd=empty, check=False)
    assert failed.returncode != 0
    errors = sorted(line for line in failed.stderr.splitlines() if line.startswith("dmnsp fetch-"))
    for line in errors:
        print(line)
    assert len(errors) == 3, failed.stderr
    cifar, tiny, weights = errors
    assert cifar.startswith(
        f"dmnsp fetch-data: error: CIFAR100 not found: no folder {empty / 'data' / 'cifar-100-python'};"
    )
    assert tiny.startswith(
        f"dmnsp fetch-data: error: TinyImageNet not found: no folder {empty / 'data' / 'tiny-imagenet-200'};"
    )
    assert weights.startswith(
        "dmnsp fetch-weights: error: weights ViT-B-16/openai are not in weights/ViT-B-16/openai"
    )
    assert "models--timm--vit_base_patch16_clip_224.openai" in weights and str(empty / "cache") in weights
