"""Datasets: CIFAR100, TinyImageNet, Fashion-MNIST and any image folder, with their class names.

Every loader returns a :class:`DatasetSplits` whose datasets yield ``(PIL image, original label)``
with no transform; the scenario layer (``dmnsp.scenario``) selects, remaps and transforms.
Nothing here touches the disk at import time.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import stat
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image
from torchvision.datasets import CIFAR100, FashionMNIST, ImageFolder, VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from .bounded import BoundsError, read_regular_text
from .config import ConfigError, class_order_list, load_yaml
from .io import atomic_save

NUM_CLASSES: dict[str, int] = {"cifar100": 100, "tinyimagenet": 200, "fashion-mnist": 10}

# Where Debian's `dataset-fashion-mnist` package puts its files (the offline source of real data).
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class DataError(FileNotFoundError):
    """Dataset files are missing or unusable; the message names the folder and how to get them."""


class ImageError(DataError):
    """An image file that cannot be decoded (empty, truncated, not an image, a decompression bomb).

    Found when the image is read (dataset folders are listed, not decoded, at load time: decoding
    every image of every job's dataset would cost more than the training of a tiny task). In a
    DataLoader worker, torch re-raises the exception in the main process as
    ``ImageError("Caught ImageError in DataLoader worker ...\nOriginal Traceback ...")``: the
    original one-line message is taken back from the traceback's last line.
    """

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def load_image(path: str) -> Image.Image:
    """The RGB image at ``path`` (the loader of every image folder dataset).

    Opens only a regular file (a FIFO would block the worker forever) and refuses images larger
    than PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; PIL only warns below twice
    that); any failure to decode is one :class:`ImageError` line naming the file and the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ValueError("not a regular file")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fh)
                return img.convert("RGB")  # decodes now: a truncated file fails here
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb*...
        raise ImageError(f"image {path} cannot be read ({_image_problem(exc)}); {_IMAGE_FIX}") from None


_IMAGE_FIX = "replace the file with a valid image or delete it from the dataset folder"


def _image_problem(exc: Exception) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "empty or not an image PIL can identify"
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"larger than {Image.MAX_IMAGE_PIXELS:,} pixels: a decompression bomb"
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def list_images(folder: str | Path, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[str]:
    """The image files under ``folder``, in torchvision's ImageFolder order (folders sorted by path,
    files by name), without following symbolic links to folders.

    A linked folder is skipped, so no symlink loop (``a -> .``) can make the walk endless; linked
    image *files* are kept (a dataset built as a farm of links works). Only regular files count:
    a FIFO, socket or dangling link named ``x.png`` is not an image.
    """
    found: list[tuple[str, list[str]]] = []
    pending = [str(folder)]
    while pending:
        root = pending.pop()
        files = []
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue  # unreadable: as os.walk, skipped
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file() and has_file_allowed_extension(entry.name, extensions):
                    files.append(entry.name)
            except OSError:
                continue
        found.append((root, sorted(files)))
    return [os.path.join(root, name) for root, files in sorted(found) for name in files]


def _samples(directory: str | Path, class_to_idx: dict[str, int], extensions: tuple[str, ...]) -> list:
    """``(path, class index)`` of every image of each class folder (:func:`list_images` order)."""
    samples, empty = [], []
    for name in sorted(class_to_idx):
        found = list_images(os.path.join(directory, name), extensions)
        if not found:
            empty.append(name)
        samples += [(path, class_to_idx[name]) for path in found]
    if empty:
        raise FileNotFoundError(
            f"Found no valid file for the classes {', '.join(empty)}. Supported extensions are: "
            f"{', '.join(extensions)}"
        )
    return samples


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder, listed by :func:`list_images` and read by :func:`load_image`."""

    def __init__(self, root: str) -> None:
        super().__init__(root, loader=load_image)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return _samples(directory, class_to_idx, extensions or IMG_EXTENSIONS)


@dataclass
class DatasetSplits:
    """A dataset's train and test sets (untransformed) with labels, names and standard order."""

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    train_targets: np.ndarray
    test_targets: np.ndarray
    class_names: list[str]
    default_class_order: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (the config's ``dataset`` key)."""
    return sorted(_LOADERS)


def default_class_order(name: str) -> list[int]:
    """The standard class order shipped with the package (``data/class_orders/<name>.yaml``)."""
    if name not in NUM_CLASSES:
        hint = " (its default is the sorted folder order, known once loaded)" if name == "imagefolder" else ""
        raise ConfigError(
            f"no packaged class order for dataset {name!r}{hint}; packaged: {', '.join(sorted(NUM_CLASSES))}"
        )
    return list(_packaged_order(name))


@cache
def _packaged_order(name: str) -> tuple[int, ...]:
    text = resources.files("dmnsp").joinpath(f"data/class_orders/{name}.yaml").read_text()
    return tuple(int(c) for c in class_order_list(load_yaml(text), f"packaged class order {name}"))


@cache
def _cifar100_names() -> tuple[str, ...]:
    text = resources.files("dmnsp").joinpath("data/cifar100_classes.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@cache
def _tinyimagenet_names() -> dict[str, str]:
    """wnid -> name, in the packaged (standard wnids.txt) order."""
    text = resources.files("dmnsp").joinpath("data/tinyimagenet_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    return {wnid: name for _, wnid, name in rows}


def load_dataset(name: str, root: str | Path, download: bool = False) -> DatasetSplits:
    """Load a dataset's train and test sets from ``root``.

    Args:
        name: one of :func:`list_datasets`.
        root: the folder holding the dataset (``dataset_root`` in the run config).
        download: let torchvision fetch missing files (CIFAR100, Fashion-MNIST; needs the internet).

    Raises:
        DataError: when the files are missing, naming the folder looked in and how to get them.
    """
    if name not in _LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    return _LOADERS[name](dataset_folder(root), download)


def dataset_folder(root: str | Path) -> Path:
    """``root`` with ``~`` / ``~user`` expanded; an unknown user is a :class:`DataError` naming it."""
    try:
        return Path(root).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        user = str(root).split("/", 1)[0]
        raise DataError(
            f"dataset_root {str(root)!r}: {user} names no user's home folder here; write the folder's full path"
        ) from None


def _targets(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


# ---------------------------------------------------------------------------------------- CIFAR100


def _load_cifar100(root: Path, download: bool) -> DatasetSplits:
    folder = root / CIFAR100.base_folder
    how = (
        f"set `download: true` (needs the internet) or extract {_CIFAR100_URL} so that "
        f"{folder}/ holds train, test and meta"
    )
    if not download and not folder.is_dir():
        raise DataError(f"CIFAR100 not found: no folder {folder}; {how}")
    for name in ("train", "test", "meta"):  # torchvision's md5 check would block on a FIFO
        if (folder / name).exists() and not (folder / name).is_file():
            raise DataError(f"CIFAR100 file {folder / name} is not a regular file; {how}")
    try:
        # torchvision checks every file's md5; a mismatch means a partial or foreign copy.
        train = CIFAR100(str(root), train=True, download=download)
        test = CIFAR100(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise DataError(
            f"CIFAR100 in {folder} is missing files or failed torchvision's md5 check ({exc}); {how}"
        ) from exc
    except OSError as exc:  # network errors (URLError) while downloading
        raise DataError(f"downloading CIFAR100 into {root} failed ({exc}); {how}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError) as exc:
        # Passed the md5 check yet does not unpickle to CIFAR's arrays (only a copy whose md5 list
        # was patched can get here): the same fix.
        raise DataError(f"CIFAR100 in {folder} is damaged ({type(exc).__name__}: {exc}); {how}") from None
    names = list(_cifar100_names())
    if list(train.classes) != names:
        raise DataError(
            f"CIFAR100 in {folder}: the meta file's class names differ from the packaged list "
            "(dmnsp/data/cifar100_classes.txt); the copy is not the standard CIFAR100"
        )
    return DatasetSplits(
        name="cifar100",
        train=train,
        test=test,
        train_targets=_targets(train.targets),
        test_targets=_targets(test.targets),
        class_names=names,
        default_class_order=default_class_order("cifar100"),
    )


# ------------------------------------------------------------------------------------ TinyImageNet


class TinyImageNet(VisionDataset):
    """The ``tiny-imagenet-200`` folder: labels are line indices of ``wnids.txt``.

    ``split="train"`` reads ``train/<wnid>/images/*.JPEG``; ``split="val"`` reads ``val/images``
    labelled by ``val/val_annotations.txt`` (the labelled set used as the test set; the official
    test images have no labels).
    """

    base_folder = "tiny-imagenet-200"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        loader: Callable[[str], Any] = load_image,
    ) -> None:
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.split = split
        self.loader = loader
        self.folder = Path(root) / self.base_folder
        self.wnids = _read_wnids(self.folder)
        self.class_to_idx = {wnid: i for i, wnid in enumerate(self.wnids)}
        if split == "train":
            try:
                self.samples = _samples(str(self.folder / "train"), self.class_to_idx, (".jpeg",))
            except FileNotFoundError as exc:  # a wnid without images
                raise DataError(
                    f"TinyImageNet in {self.folder / 'train'}: {exc}; {_tiny_layout(self.folder)}"
                ) from exc
        else:
            self.samples = _read_val_samples(self.folder, self.class_to_idx)
        self.targets = [label for _, label in self.samples]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        img = self.loader(path)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __len__(self) -> int:
        return len(self.samples)


def _text(path: Path) -> str:
    """A dataset's text file (TinyImageNet's lists), bounded: a damaged one is one line naming it."""
    try:
        return read_regular_text(path, "dataset file")
    except (BoundsError, OSError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); {_tiny_layout(path.parent)}") from None


def _tiny_layout(folder: Path) -> str:
    return (
        f"expected {folder}/ with wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/ and "
        f"val/val_annotations.txt (download {_TINYIMAGENET_URL} and unzip it into {folder.parent})"
    )


def _read_wnids(folder: Path) -> list[str]:
    path = folder / "wnids.txt"
    if not path.is_file():
        raise DataError(f"TinyImageNet not found: no {path}; {_tiny_layout(folder)}")
    wnids = [line.strip() for line in _text(path).splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{path} lists a wnid more than once; {_tiny_layout(folder)}")
    return wnids


def _read_val_samples(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    ann = folder / "val" / "val_annotations.txt"
    images = folder / "val" / "images"
    if not ann.is_file() or not images.is_dir():
        raise DataError(f"TinyImageNet validation set not found in {folder / 'val'}; {_tiny_layout(folder)}")
    samples = []
    for n, line in enumerate(_text(ann).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_to_idx:
            raise DataError(f"{ann} line {n}: expected '<file>\\t<wnid from wnids.txt>\\t...', got {line!r}")
        path = images / fields[0]
        if not path.is_file():
            raise DataError(f"{ann} line {n} names {path}, which does not exist; {_tiny_layout(folder)}")
        samples.append((str(path), class_to_idx[fields[1]]))
    return samples


def _tiny_class_names(folder: Path, wnids: list[str]) -> list[str]:
    """Packaged names by wnid; words.txt (first synonym) for other wnids; else the wnid itself."""
    packaged = _tinyimagenet_names()
    words: dict[str, str] = {}
    if any(w not in packaged for w in wnids) and (folder / "words.txt").is_file():
        for line in _text(folder / "words.txt").splitlines():
            wnid, _, text = line.partition("\t")
            if text.strip():
                words[wnid.strip()] = text.split(",")[0].strip()
    return [packaged.get(w) or words.get(w) or w for w in wnids]


def _load_tinyimagenet(root: Path, download: bool) -> DatasetSplits:
    folder = root / TinyImageNet.base_folder
    if not folder.is_dir():
        extra = " (torchvision cannot download TinyImageNet: fetch it yourself)" if download else ""
        raise DataError(f"TinyImageNet not found: no folder {folder}{extra}; {_tiny_layout(folder)}")
    train = TinyImageNet(root, split="train")
    test = TinyImageNet(root, split="val")
    standard = list(_tinyimagenet_names())
    if len(train.wnids) == len(standard) and train.wnids != standard:
        # Labels follow this wnids.txt; the packaged class order assumes the standard line order.
        warnings.warn(
            f"{folder / 'wnids.txt'} lists the 200 classes in a non-standard order, so the standard "
            "TinyImageNet class order selects different classes; set class_order explicitly",
            stacklevel=2,
        )
    return DatasetSplits(
        name="tinyimagenet",
        train=train,
        test=test,
        train_targets=_targets(train.targets),
        test_targets=_targets(test.targets),
        class_names=_tiny_class_names(folder, train.wnids),
        default_class_order=default_class_order("tinyimagenet"),
    )


# ----------------------------------------------------------------------------------- Fashion-MNIST


def _gzip_size(path: Path) -> int | None:
    """Uncompressed size (mod 2**32) from the gzip trailer: lets a re-run skip without decompressing
    (None for a file too short to be gzip)."""
    with open(path, "rb") as fh:
        if fh.seek(0, 2) < 18:  # header and trailer of the smallest gzip file
            return None
        fh.seek(-4, 2)
        return struct.unpack("<I", fh.read(4))[0]


#: The idx files' magic numbers (unsigned bytes; 1 dimension for labels, 3 for images) and the
#: largest dimensions accepted (Fashion-MNIST: 60,000 / 10,000 items of 28 x 28).
_IDX_MAGIC = {"labels": 0x00000801, "images": 0x00000803}
_IDX_MAX_ITEMS, _IDX_MAX_SIDE = 10**7, 4096


def _idx_problem(path: Path) -> tuple[str, int] | str:
    """``(kind, items)`` of a valid idx file (header, dimensions and size agree), else why not."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return "it is not a regular file"
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    kind = "images" if "images" in path.name else "labels"
    ndim = 3 if kind == "images" else 1
    if len(head) < 4 + 4 * ndim:
        return f"it holds {info.st_size} bytes, fewer than an idx header"
    magic, *dims = struct.unpack(f">I{ndim}I", head[: 4 + 4 * ndim])
    if magic != _IDX_MAGIC[kind]:
        return f"its magic number is {magic:#010x}, not {_IDX_MAGIC[kind]:#010x} (idx {kind} of bytes)"
    if dims[0] > _IDX_MAX_ITEMS or any(d > _IDX_MAX_SIDE or d == 0 for d in dims[1:]):
        return f"its header gives dimensions {dims}"
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if info.st_size != expected:
        return f"it holds {info.st_size} bytes, its header promises {expected} (truncated or padded)"
    return kind, dims[0]


def prepare_fashion_mnist(root: str | Path, source: str | Path = FASHION_MNIST_DEBIAN_DIR) -> Path:
    """Decompress Debian's Fashion-MNIST ``.gz`` files into ``<root>/FashionMNIST/raw/``.

    Debian recompresses the files, so their md5 differs from torchvision's list and torchvision
    would try to download them; the decompressed idx files are what it reads. Idempotent: files
    already decompressed (same size) are kept; a truncated one is decompressed again. A damaged
    source (empty, truncated, not gzip, not idx inside) is a :class:`DataError` naming it. Returns
    the raw folder.
    """
    source = Path(source)
    raw = dataset_folder(root) / "FashionMNIST" / "raw"
    missing = [f"{n}.gz" for n in _FASHION_MNIST_FILES if not (source / f"{n}.gz").is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST source {source} lacks {', '.join(missing)}; install it with "
            "`apt-get install dataset-fashion-mnist` or pass the folder holding the four .gz files"
        )
    for name in _FASHION_MNIST_FILES:
        src, dest = source / f"{name}.gz", raw / name
        fix = (
            f"Fashion-MNIST source {src} is damaged ({{}}); reinstall it (`apt-get install --reinstall "
            "dataset-fashion-mnist`) or pass a folder holding intact .gz files"
        )
        size = _gzip_size(src)
        if size is None:
            raise DataError(fix.format("too short to be a gzip file"))
        if dest.is_file() and dest.stat().st_size % 2**32 == size:
            continue
        try:
            with gzip.open(src, "rb") as gz:
                # Written via a temporary file and a rename: a killed job never leaves half a file.
                atomic_save(dest, lambda fh, gz=gz: shutil.copyfileobj(gz, fh, 1 << 20))
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise DataError(fix.format(exc)) from None
        problem = _idx_problem(dest)
        if isinstance(problem, str):
            dest.unlink(missing_ok=True)
            raise DataError(fix.format(f"it decompresses to an idx file that is not one: {problem}"))
    return raw


def _check_fashion_mnist(raw: Path, how: str) -> None:
    """The four idx files are whole (header, dimensions, size) and each split's images and labels
    agree in number: a damaged file is one line naming it, before torchvision reads it."""
    items = {}
    for name in _FASHION_MNIST_FILES:
        problem = _idx_problem(raw / name)
        if isinstance(problem, str):
            raise DataError(
                f"Fashion-MNIST file {raw / name} is damaged: {problem}; delete it (dmnsp decompresses "
                f"it again from Debian's package) or replace it: {how}"
            )
        items[name] = problem[1]
    for split in ("train", "t10k"):
        images, labels = items[f"{split}-images-idx3-ubyte"], items[f"{split}-labels-idx1-ubyte"]
        if images != labels:
            raise DataError(
                f"Fashion-MNIST in {raw}: {split} has {images} images but {labels} labels; delete both "
                f"files (dmnsp decompresses them again from Debian's package) or {how}"
            )


def _load_fashion_mnist(root: Path, download: bool) -> DatasetSplits:
    raw = root / "FashionMNIST" / "raw"
    if FASHION_MNIST_DEBIAN_DIR.is_dir():
        # The offline path, preferred over a download; idempotent, and repairs a truncated file.
        prepare_fashion_mnist(root, FASHION_MNIST_DEBIAN_DIR)
    how = (
        f"install the Debian package (`apt-get install dataset-fashion-mnist`, found in "
        f"{FASHION_MNIST_DEBIAN_DIR}) or set `download: true` (needs the internet)"
    )
    if all((raw / n).exists() for n in _FASHION_MNIST_FILES):
        _check_fashion_mnist(raw, how)
    try:
        train = FashionMNIST(str(root), train=True, download=download)
        test = FashionMNIST(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise DataError(f"Fashion-MNIST not found in {raw} ({exc}); {how}") from exc
    except OSError as exc:
        raise DataError(f"downloading Fashion-MNIST into {raw} failed ({exc}); {how}") from exc
    return DatasetSplits(
        name="fashion-mnist",
        train=train,
        test=test,
        train_targets=train.targets.numpy().astype(np.int64),
        test_targets=test.targets.numpy().astype(np.int64),
        class_names=list(FashionMNIST.classes),
        default_class_order=default_class_order("fashion-mnist"),
    )


# ------------------------------------------------------------------------------------- imagefolder


def _imagefolder_layout(root: Path) -> str:
    return (
        f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> with the same class folders"
    )


def imagefolder_classes(root: str | Path) -> list[str]:
    """Class names of an image folder dataset: the folders under ``<root>/train``, sorted as
    torchvision's ImageFolder sorts them (the labels follow this order). Reads no image."""
    folder = dataset_folder(root) / "train"
    if not folder.is_dir():
        raise DataError(f"image folder dataset: no folder {folder}; {_imagefolder_layout(Path(root))}")
    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError as exc:  # no class folders
        raise DataError(
            f"image folder dataset in {folder}: {exc}; {_imagefolder_layout(Path(root))}"
        ) from None


def _load_imagefolder(root: Path, download: bool) -> DatasetSplits:
    layout = _imagefolder_layout(root)
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"image folder dataset: no folder {folder}; {layout}")
        try:
            splits[split] = SafeImageFolder(str(folder))
        except FileNotFoundError as exc:  # no class folders, or a class folder without images
            raise DataError(f"image folder dataset in {folder}: {exc}; {layout}") from exc
    train, test = splits["train"], splits["test"]
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(
            f"image folder dataset in {root}: train and test class folders differ "
            f"(only in train: {only_train}; only in test: {only_test}); {layout}"
        )
    return DatasetSplits(
        name="imagefolder",
        train=train,
        test=test,
        train_targets=_targets(train.targets),
        test_targets=_targets(test.targets),
        class_names=list(train.classes),
        default_class_order=list(range(len(train.classes))),
    )


_LOADERS: dict[str, Callable[[Path, bool], DatasetSplits]] = {
    "cifar100": _load_cifar100,
    "fashion-mnist": _load_fashion_mnist,
    "imagefolder": _load_imagefolder,
    "tinyimagenet": _load_tinyimagenet,
}
