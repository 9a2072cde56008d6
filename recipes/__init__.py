"""Runnable trainings built from commhooks + launch.

- ``python -m recipes.mnist``: LeNet on MNIST, scikit-learn's digits (offline) or synthetic data;
- ``python -m recipes.cifar``: ResNet-18 / WRN-28-10 / WRN-16-4 / All-CNN on CIFAR-10/100.

Both are thin: a :class:`recipes.cli.Recipe` (data sets, models, defaults) handed to
:func:`recipes.train.main`; the loop, data, models and reporting live in the shared modules.
"""
