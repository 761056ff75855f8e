"""Zero-shot accuracy of the tiny CLIP's pretraining recipe on the embedded default and on small
image folders (issue 12: a small data set used to leave the model on the ln C plateau).

    .venv/bin/python benchmarks/pretrain.py                      # the package's recipe, seed 0
    .venv/bin/python benchmarks/pretrain.py --lr 1e-3 --seeds 0 1 2   # e.g. the former lr

Data sets (all 10 classes, grayscale, 28 px):

- ``fashion-mnist``: the embedded default's pretraining (500 images per class, 100 steps; zero-shot
  on 500 test images per class), from Debian's ``dataset-fashion-mnist``.
- ``fm-small``: an ImageFolder of Fashion-MNIST images, 135 train / 45 test per class, shrunk to
  12 px and upscaled to 28 px; ``pretrain_per_class: 60``.
- ``digits``: scikit-learn's 8×8 ``digits`` upscaled to 28 px, 135 train / up to 45 test per class;
  ``pretrain_per_class: 60`` (needs scikit-learn: ``pip install -e .[bench]``; skipped otherwise).

Every run accepts a weak result (``pretrain.accept_weak``) so that failures are printed, with the
health verdict of the pretraining gate, instead of stopping the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fashion_root, machine_line, table  # noqa: E402

from dmnsp.config import validate  # noqa: E402
from dmnsp.pretrain import pretrain  # noqa: E402

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _save(root: Path, split: str, name: str, i: int, image) -> None:
    folder = root / split / name
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{i:04d}.png")


def fm_small(fashion: Path, out: Path, n_train: int = 135, n_test: int = 45) -> Path:
    """Fashion-MNIST subsampled per class, shrunk to 12 px and upscaled to 28 px."""
    from PIL import Image
    from torchvision.datasets import FashionMNIST

    rng = np.random.default_rng(123)
    for split, train, n in (("train", True, n_train), ("test", False, n_test)):
        ds = FashionMNIST(str(fashion), train=train)
        targets = ds.targets.numpy()
        for c, name in enumerate(NAMES):
            for i, j in enumerate(rng.choice(np.flatnonzero(targets == c), n, replace=False)):
                small = Image.fromarray(ds.data[j].numpy()).resize((12, 12), Image.BILINEAR)
                _save(out, split, name, i, small.resize((28, 28), Image.BILINEAR))
    return out


def digits(out: Path, n_train: int = 135, n_test: int = 45) -> Path | None:
    """scikit-learn's 8×8 digits (0..16) upscaled to 28 px; None without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    from PIL import Image

    d = load_digits()
    rng = np.random.default_rng(123)
    for c, name in enumerate(DIGITS):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        for split, part in (("train", idx[:n_train]), ("test", idx[n_train : n_train + n_test])):
            for i, j in enumerate(part):
                pixels = (d.images[j] * 255 / 16).clip(0, 255).astype(np.uint8)
                _save(out, split, name, i, Image.fromarray(pixels).resize((28, 28), Image.BILINEAR))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretrain.seed values")
    ap.add_argument("--lr", type=float, help="pretrain.lr (default: the package's recipe)")
    ap.add_argument("--steps", type=int, default=100, help="pretrain.steps (the embedded default's 100)")
    ap.add_argument("--only", nargs="+", choices=["fashion-mnist", "fm-small", "digits"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="dmnsp-bench-pretrain-"))
    fashion = fashion_root(work / "fashion")
    sets = {
        "fashion-mnist": {
            "dataset": "fashion-mnist",
            "dataset_root": str(fashion),
            "pretrain_per_class": 500,
            "max_test_per_class": 500,
        },
        "fm-small": {"dataset": "imagefolder", "pretrain_per_class": 60},
        "digits": {"dataset": "imagefolder", "pretrain_per_class": 60},
    }
    wanted = args.only or list(sets)
    if "fm-small" in wanted:
        sets["fm-small"]["dataset_root"] = str(fm_small(fashion, work / "fm-small"))
    if "digits" in wanted:
        root = digits(work / "digits")
        if root is None:
            print("digits: skipped (scikit-learn is not installed: pip install -e .[bench])")
            wanted.remove("digits")
        else:
            sets["digits"]["dataset_root"] = str(root)
    rows = []
    for name in wanted:
        for seed in args.seeds:
            block = {"steps": args.steps, "seed": seed, "accept_weak": True}
            if args.lr is not None:
                block["lr"] = args.lr
            cfg = validate(
                {
                    **sets[name],
                    "model_name": "dmnsp-tiny",
                    "pretrained": None,
                    "pretrain": block,
                    "device": "cpu",
                    "num_workers": 0,
                    "threads": args.threads,
                }
            )
            start = time.perf_counter()
            s = pretrain(cfg, work / f"{name}-{seed}.pt", progress=False)
            rows.append(
                [
                    name,
                    seed,
                    f"{cfg['pretrain']['lr']:g}",
                    s["pretrain_images"],
                    f"{s['zero_shot_accuracy']:.3f}",
                    f"{s['chance']:.2f}",
                    f"{s['first_loss']:.3f} → {s['final_loss']:.3f}",
                    f"{s['top_class_share']:.2f}",
                    "yes" if s["healthy"] else "NO",
                    f"{time.perf_counter() - start:.0f}",
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    headers = ["data set", "seed", "lr", "images", "zero-shot", "chance", "loss", "top class", "healthy", "s"]
    print(table(rows, headers))


if __name__ == "__main__":
    main()
