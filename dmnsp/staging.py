"""What a run reads besides its own folder, staged before any training job starts.

Datasets and CLIP weights are files like any other input: the workflow's local rules
``download_data`` and ``fetch_weights`` produce them (``python -m dmnsp fetch-data`` /
``fetch-weights``, on the machine that runs Snakemake, typically a cluster's login node), and the
training jobs take them as inputs. So compute nodes never download, and with remote storage
(``--default-storage-provider``) the files travel through the storage like every other input.

This module owns where those files are, for the planner (no torch is imported: the workflow plans
with it) and for the jobs, which are told the staged locations:

- a dataset is one folder under its ``dataset_root`` (:func:`data_folder`); a job reads the
  dataset from the root that holds it (``--set dataset_root=...``);
- open_clip weights named by a pretrained *tag* (``openai``) are staged into their own open_clip
  cache folder ``weights/<model>/<tag>/`` (:func:`weights_folder`) that a job uses as its
  ``cache_dir``; ``dataset_root`` and ``cache_dir`` say where, not what, so a checkpoint resumes
  from another location;
- a ``pretrained`` *file* (a local checkpoint, or the workflow's own pretrained model) is itself
  the input, and a job reads it from where it was staged (``train-task --pretrained-file``).

The fetch functions themselves are :func:`dmnsp.datasets.fetch_dataset` and
:func:`dmnsp.model.fetch_weights`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import run_schema

#: The folder of each dataset under its ``dataset_root`` (torchvision's and the archives' own
#: names); for ``imagefolder`` the root itself is the dataset (``train/`` and ``test/`` inside).
DATA_FOLDERS: dict[str, str] = {
    "cifar100": "cifar-100-python",
    "fashion-mnist": "FashionMNIST",
    "tinyimagenet": "tiny-imagenet-200",
    "imagefolder": "",
}
#: Where the workflow stages open_clip weights of pretrained tags (relative to the working directory).
WEIGHTS_ROOT = "weights"
#: Run keys that decide what is staged for a run.
STAGING_KEYS = ("dataset", "dataset_root", "download", "model_name", "pretrained", "cache_dir")
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def is_weights_file(pretrained: str | None) -> bool:
    """Whether ``pretrained`` names a local checkpoint file (else an open_clip tag, or None)."""
    if not pretrained:
        return False
    return os.sep in pretrained or pretrained.endswith(_WEIGHT_FILE_SUFFIXES) or os.path.exists(pretrained)


def data_folder(dataset: str, root: str) -> str:
    """The folder a dataset's files live in: ``<root>/<DATA_FOLDERS[dataset]>`` (normalised)."""
    root = os.path.normpath(os.path.expanduser(root))
    sub = DATA_FOLDERS[dataset]
    return os.path.normpath(os.path.join(root, sub)) if sub else root


def data_root(dataset: str, folder: str) -> str:
    """Inverse of :func:`data_folder`: the ``dataset_root`` that holds ``folder`` (a staged copy of
    it, e.g. under Snakemake's local storage prefix)."""
    folder = os.path.normpath(folder)
    sub = DATA_FOLDERS[dataset]
    if not sub:
        return folder
    if os.path.basename(folder) != sub:
        raise ValueError(f"{folder} is not a {dataset} folder (expected .../{sub})")
    return os.path.dirname(folder) or "."


def weights_folder(model_name: str, pretrained: str) -> str:
    """``weights/<model>/<tag>``: the open_clip cache folder the workflow stages a tag's weights into."""
    return f"{WEIGHTS_ROOT}/{_UNSAFE.sub('_', model_name)}/{_UNSAFE.sub('_', pretrained)}"


@dataclass(frozen=True)
class Staging:
    """What one run (or pretraining job) reads from outside its folder."""

    dataset: str
    data_folder: str
    download: bool
    #: The open_clip cache folder of a pretrained tag's weights, or None.
    weights_folder: str | None
    #: A local checkpoint file given as ``pretrained``, or None.
    pretrained_file: str | None
    model_name: str
    pretrained: str | None
    cache_dir: str | None


def _setting(settings: Mapping[str, Any], key: str) -> Any:
    if key in settings:
        return settings[key]
    return run_schema()["properties"][key].get("default")


def staging_for(settings: Mapping[str, Any]) -> Staging:
    """The staged inputs of a run from its (flat, planned) settings; unset keys take the schema's
    defaults."""
    values = {key: _setting(settings, key) for key in STAGING_KEYS}
    pretrained = values["pretrained"] or None
    is_file = is_weights_file(pretrained)
    return Staging(
        dataset=values["dataset"],
        data_folder=data_folder(values["dataset"], str(values["dataset_root"])),
        download=bool(values["download"]),
        weights_folder=weights_folder(values["model_name"], pretrained)
        if pretrained and not is_file
        else None,
        pretrained_file=pretrained if is_file else None,
        model_name=values["model_name"],
        pretrained=pretrained,
        cache_dir=values["cache_dir"],
    )
