"""Data sets written to disk for the tests (no download)."""

from __future__ import annotations

import os
import pickle

import numpy as np


def write_cifar10_folder(root: str, images_per_batch: int = 10, seed: int = 0) -> str:
    """Write a tiny CIFAR-10 folder in torchvision's on-disk format (pickled batches).

    torchvision reads it with its md5 check off: pass ``--data-dir root --no-verify``.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def batch(fname: str) -> None:
        data = rng.integers(0, 256, size=(images_per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(i % 10) for i in range(images_per_batch)]
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": fname}, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}")
    batch("test_batch")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": images_per_batch}, f)
    return folder
