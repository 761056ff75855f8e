"""Seeds and data loaders shared by training, the methods' own passes, evaluation and pretraining."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, task, purpose): the same on every machine and process."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0, device: torch.device
) -> DataLoader:
    """A DataLoader whose shuffling and worker seeds derive from ``seed`` alone."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
    )


def cycle(loader: DataLoader) -> Iterator:
    """Batches without end: re-iterating reshuffles, as the reference's try/except re-iter does."""
    while True:
        yield from loader
