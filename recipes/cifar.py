"""CIFAR-10/100 with the papers' networks (ResNet-18, WRN-28-10, WRN-16-4, All-CNN).

    torchrun --nproc_per_node=8 -m recipes.cifar --algo dpsgd
    python -m recipes.cifar --dataset cifar100 --model wrn-28-10 --algo parle --download
    torchrun --standalone --nproc_per_node=2 -m recipes.cifar --dataset synthetic --algo dpsgd
"""

from __future__ import annotations

import argparse

from launch.exitcodes import exit_final_codes_at_once
from recipes.cli import DatasetDefaults, Recipe
from recipes.data import Dataset, load_cifar, load_synthetic
from recipes.train import main


def _cifar_defaults() -> DatasetDefaults:
    """Parle 4.3 / WRN: lr 0.1, batch 128, weight decay 5e-4, x0.2 at 60/120/160 of 200 epochs."""
    return DatasetDefaults(model="resnet18", epochs=200, batch_size=128, lr=0.1, milestones=(0.3, 0.6, 0.8),
                           lr_decay=0.2, weight_decay=5e-4)


def load(args: argparse.Namespace) -> Dataset:
    if args.dataset in ("cifar10", "cifar100"):
        return load_cifar(args.dataset, args.data_dir, args.download, verify=args.verify)
    return load_synthetic((3, 32, 32), seed=args.seed)


RECIPE = Recipe(
    name="cifar",
    description="CIFAR-10/100 with ResNet-18, WRN-28-10, WRN-16-4 or All-CNN, any commhooks algorithm.",
    datasets={
        "cifar10": _cifar_defaults(),
        "cifar100": _cifar_defaults(),
        # smoke runs: a narrow ResNet-18, two short epochs
        "synthetic": DatasetDefaults(model="resnet18", epochs=2, batch_size=32, lr=0.05,
                                     milestones=(), lr_decay=0.2, weight_decay=5e-4, width=0.125,
                                     offline=True),
    },
    default_dataset="cifar10",
    models=("resnet18", "wrn-28-10", "wrn-16-4", "allcnn"),
    load=load,
)

if __name__ == "__main__":  # plain torchrun: the same prompt exit as under python -m launch
    exit_final_codes_at_once(lambda: main(RECIPE), success_too=True)
