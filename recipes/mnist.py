"""LeNet on MNIST (Parle, Section 4.2), on scikit-learn's 8x8 digits offline, or on synthetic data.

    python -m launch --nproc-per-node 4 -m recipes.mnist --dataset digits --algo parle
    python -m recipes.mnist --dataset mnist --data-dir ./data --download --algo ssgd
"""

from __future__ import annotations

import argparse

from launch.exitcodes import exit_final_codes_at_once
from recipes.cli import DatasetDefaults, Recipe
from recipes.data import Dataset, load_digits, load_mnist, load_synthetic
from recipes.train import main


def load(args: argparse.Namespace) -> Dataset:
    if args.dataset == "mnist":
        return load_mnist(args.data_dir, args.download)
    if args.dataset == "digits":
        return load_digits()
    return load_synthetic((1, 28, 28), seed=args.seed)


RECIPE = Recipe(
    name="mnist",
    description="LeNet (Parle paper) on MNIST / scikit-learn digits / synthetic data, any commhooks algorithm.",
    datasets={
        # Parle 4.2: lr 0.1, batch 128, SGD drops x0.1 at 30/60/90 of 100 epochs
        "mnist": DatasetDefaults(model="lenet", epochs=100, batch_size=128, lr=0.1,
                                 milestones=(0.3, 0.6, 0.9), lr_decay=0.1, weight_decay=0.0),
        # 1437 training images: small batches so an epoch is more than a handful of steps
        "digits": DatasetDefaults(model="lenet", epochs=5, batch_size=32, lr=0.1,
                                  milestones=(0.6,), lr_decay=0.1, weight_decay=5e-4, offline=True),
        "synthetic": DatasetDefaults(model="lenet", epochs=2, batch_size=64, lr=0.05,
                                     milestones=(), lr_decay=0.1, weight_decay=0.0, offline=True),
    },
    default_dataset="mnist",
    models=("lenet",),
    load=load,
)

if __name__ == "__main__":  # plain torchrun: the same prompt exit as under python -m launch
    exit_final_codes_at_once(lambda: main(RECIPE), success_too=True)
