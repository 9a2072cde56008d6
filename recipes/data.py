"""Data sets as device-resident tensors, and a resumable, policy-aware batch loader.

The whole training set is held as one tensor on the training device (on a GPU: in device
memory), each epoch's order comes from a generator seeded with ``(seed, epoch, stream)``, and
augmentation (pad-4 random crop, horizontal flip) is batched tensor work. The same code runs on
CPU. Idea from airbench's ``CifarLoader``; the code is ours.

Data policies (docs/recipes.md, "Data policies"; Parle paper, Section 5):

- ``shard``: every rank sees a disjoint ``1/W`` of each epoch (plain data-parallel training);
- ``replica``: every replica sees the whole set in its own order, sharded among its ``m`` ranks;
- ``split``: the set is split once into ``n`` disjoint parts, one per replica.

Every rank runs the same number of steps per epoch (``drop_last``), otherwise a rank that runs
out of data would miss a collective and the others would hang.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

Policy = Literal["shard", "replica", "split"]
POLICIES: tuple[str, ...] = ("shard", "replica", "split")


class DatasetUnavailable(Exception):
    """A data set is missing on disk and could not be downloaded; the CLI turns it into one message."""


@dataclass(kw_only=True)
class Dataset:
    """A classification data set as tensors (on CPU until :meth:`to`).

    Images are ``(N, C, H, W)``, either ``uint8`` pixels or floats; ``mean``/``std`` are per
    channel in the same units and are applied per batch (keeps uint8 sets 4x smaller on device).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    augment: bool = False  # pad-4 random crop + horizontal flip (the CIFAR papers' pipeline)
    note: str = ""  # printed at start: where the data came from, what was done to it

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    def to(self, device: torch.device) -> Dataset:
        for k in ("train_x", "train_y", "val_x", "val_y", "mean", "std"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6)


def make_dataset(name: str, tx, ty, vx, vy, num_classes: int, augment: bool, note: str) -> Dataset:
    """A :class:`Dataset` from train and validation images and labels (arrays or tensors);
    the normalization is the training images' per-channel mean and std."""
    tx, vx = torch.as_tensor(tx), torch.as_tensor(vx)
    mean, std = _channel_stats(tx)
    return Dataset(name=name, train_x=tx, train_y=torch.as_tensor(ty, dtype=torch.long), val_x=vx,
                   val_y=torch.as_tensor(vy, dtype=torch.long), num_classes=num_classes, mean=mean,
                   std=std, augment=augment, note=note)


# ---------------------------------------------------------------------------------------------
# Loaders of the individual data sets


def _torchvision_call(what: str, data_dir: str, download: bool, offline: str, fn):
    """Run a torchvision constructor; a missing set or a failed download -> DatasetUnavailable."""
    try:
        return fn()
    except (RuntimeError, OSError, urllib.error.URLError) as e:
        how = ("the download failed (no network?)" if download
               else "it is not there and --download was not given")
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(":")
        raise DatasetUnavailable(
            f"{what} is not available under --data-dir {data_dir!r}: {how} ({detail}).\n"
            f"  - put the data set in torchvision's on-disk format under --data-dir, or\n"
            f"  - pass --download on a machine with network access, or\n"
            f"  - run offline with {offline}."
        ) from None


def load_cifar(name: Literal["cifar10", "cifar100"], data_dir: str, download: bool,
               verify: bool = True) -> Dataset:
    """CIFAR-10/100 through ``torchvision.datasets`` (test set = validation set, as the papers).

    ``verify=False`` accepts a folder in torchvision's on-disk format whose files do not match
    torchvision's published md5 sums (a subset, or files written by a test): torchvision's own
    reader then checks only that the files exist. The default keeps torchvision's md5 check.
    """
    import torchvision

    base = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    cls = base if verify else _without_md5(base)
    offline = "--dataset synthetic (smoke runs), or recipes.mnist --dataset digits"

    def build(train: bool):
        return _torchvision_call(name.upper(), data_dir, download, offline,
                                 lambda: cls(root=data_dir, train=train, download=download))

    tr, te = build(True), build(False)
    # torchvision keeps CIFAR as uint8 NHWC numpy arrays
    tx = torch.from_numpy(tr.data).permute(0, 3, 1, 2).contiguous()
    vx = torch.from_numpy(te.data).permute(0, 3, 1, 2).contiguous()
    note = f"{name}: {len(tx)} train / {len(vx)} val images from {data_dir}"
    if not verify:
        note += " (md5 check skipped: --no-verify)"
    return make_dataset(name, tx, tr.targets, vx, te.targets, 10 if name == "cifar10" else 100,
                 augment=True, note=note)


def _without_md5(base: type[Any]) -> type[Any]:
    """A subclass of a torchvision CIFAR class whose integrity check asks only that files exist.

    torchvision's ``check_integrity(path, md5=None)`` is exactly "the file exists"; we keep its
    reader (and so its on-disk format) and drop only the published checksums.
    """
    attrs = {
        "train_list": [[f, None] for f, _ in base.train_list],
        "test_list": [[f, None] for f, _ in base.test_list],
        "meta": {**base.meta, "md5": None},
    }
    return type(base.__name__ + "Unverified", (base,), attrs)


def load_mnist(data_dir: str, download: bool) -> Dataset:
    """MNIST through ``torchvision.datasets.MNIST`` (no pre-processing, as the Parle paper)."""
    import torchvision

    offline = "--dataset digits (scikit-learn's 8x8 digits, shipped with the package) or --dataset synthetic"

    def build(train: bool):
        return _torchvision_call("MNIST", data_dir, download, offline,
                                 lambda: torchvision.datasets.MNIST(root=data_dir, train=train,
                                                                    download=download))

    tr, te = build(True), build(False)
    return make_dataset("mnist", tr.data.unsqueeze(1), tr.targets, te.data.unsqueeze(1), te.targets, 10,
                 augment=False, note=f"mnist: {len(tr.data)} train / {len(te.data)} val images")


def load_digits(val_fraction: float = 0.2, size: int = 28, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, ships with the package): the offline MNIST.

    The images are upsampled once, bilinearly, to ``size x size`` so that the MNIST LeNet runs
    unchanged; a fixed-seed ``val_fraction`` is held out for validation.
    """
    images, target = _read_digits()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)  # values 0..16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(x)))
    val, tr = perm[:n_val], perm[n_val:]
    return make_dataset("digits", x[tr], y[tr], x[val], y[val], 10, augment=False,
                 note=f"digits: {len(tr)} train / {len(val)} val images, 8x8 upsampled to {size}x{size}")


def _read_digits():
    """(images (1797, 64), labels) of scikit-learn's digits.

    Read straight from the CSV that scikit-learn ships, found without importing scikit-learn:
    its import costs every rank about a second of CPU, which dominates a small multi-rank run.
    Falls back on ``sklearn.datasets.load_digits`` if the file is not where it used to be.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DatasetUnavailable("--dataset digits needs scikit-learn (pip install scikit-learn); "
                                 "or use --dataset synthetic")
    for root in spec.submodule_search_locations or []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return d.data, d.target


def load_synthetic(shape: tuple[int, int, int], num_classes: int = 10, n_train: int = 2048,
                   n_val: int = 512, seed: int = 0) -> Dataset:
    """Noisy copies of one random template per class: learnable in a few steps (smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, *shape, generator=g)
    y = torch.randint(0, num_classes, (n_train + n_val,), generator=g)
    x = templates[y] + 2.0 * torch.randn(n_train + n_val, *shape, generator=g)
    return make_dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes,
                 augment=False, note=f"synthetic: {n_train} train / {n_val} val random {shape} images")


# ---------------------------------------------------------------------------------------------
# The loader


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Pad-``pad`` random crop and random horizontal flip of a batch, one gather for all images."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (b, h)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (b, w)
    # a flip is a crop read right-to-left: fold it into the column index
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    out = xp[idx_b, :, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c): advanced dims first
    return out.permute(0, 3, 1, 2).contiguous()


class TensorLoader:
    """Batches of a device-resident data set for one rank, under a data policy; resumable.

    Iterating yields the rest of the current epoch (``len(self)`` batches from its start) and
    then advances to the next epoch. ``state_dict()`` is ``(epoch, position, augmentation
    generator state)``; the epoch's order is a pure function of ``(seed, epoch, stream)``, so
    resuming mid-epoch replays exactly the batches that were left.

    Args:
        data: the data set (already on the device).
        batch_size: per rank.
        rank, world_size, replica_size: this rank's place; replicas are ``m`` consecutive ranks.
        policy: ``shard`` | ``replica`` | ``split`` (see the module docstring).
        seed: base seed of orders, split and augmentation.
    """

    def __init__(self, data: Dataset, *, batch_size: int, rank: int, world_size: int,
                 replica_size: int = 1, policy: Policy = "shard", seed: int = 0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"data policy must be one of {POLICIES}, got {policy!r}")
        if world_size % replica_size:
            raise ValueError(f"replica_size {replica_size} does not divide world size {world_size}")
        self.data, self.batch_size, self.policy, self.seed = data, batch_size, policy, seed
        self.device = data.train_x.device
        m, n = replica_size, world_size // replica_size
        self.replica, self.in_replica = rank // m, rank % m
        n_total = len(data.train_x)
        if policy == "shard":
            # one shared order, cut into W disjoint chunks
            self._stream, self._parts, self._index = 0, world_size, rank
            pool = n_total
        elif policy == "replica":
            # each replica its own order of the whole set, cut among its m ranks
            self._stream, self._parts, self._index = 1 + self.replica, m, self.in_replica
            pool = n_total
        else:
            # a fixed split into n parts; each replica's part reordered each epoch, cut among m
            part = n_total // n
            split = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
            self._subset = split[self.replica * part:(self.replica + 1) * part].to(self.device)
            self._stream, self._parts, self._index = 1 + self.replica, m, self.in_replica
            pool = part
        self._pool = pool
        self.per_rank = pool // self._parts
        self.steps_per_epoch = self.per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch size {batch_size} is larger than this rank's {self.per_rank} examples per "
                f"epoch (policy {policy!r}, world size {world_size}); lower --batch-size")
        self.epoch, self.position = 0, 0
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed * 1_000_003 + 17 + rank)  # augmentation differs per rank

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1009 + self._stream)
        perm = torch.randperm(self._pool, generator=g).to(self.device)
        mine = perm[self._index * self.per_rank:(self._index + 1) * self.per_rank]
        return self._subset[mine] if self.policy == "split" else mine

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(self.epoch)
        while self.position < self.steps_per_epoch:
            i = order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
            x = self.data.normalize(self.data.train_x[i])
            if self.data.augment:
                x = augment_batch(x, self._gen)
            self.position += 1
            yield x, self.data.train_y[i]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position,
                "generator": self._gen.get_state(), "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            raise ValueError(f"loader state is for {sd['steps_per_epoch']} steps per epoch, this "
                             f"loader has {self.steps_per_epoch} (world size or batch size changed)")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
        self._gen.set_state(sd["generator"].cpu())  # get_state is a CPU ByteTensor on any device


def val_batches(data: Dataset, rank: int, world_size: int, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided share of the validation set (every example exactly once over ranks)."""
    idx = torch.arange(rank, len(data.val_x), world_size, device=data.val_x.device)
    for s in range(0, len(idx), batch_size):
        i = idx[s:s + batch_size]
        yield data.normalize(data.val_x[i]), data.val_y[i]
