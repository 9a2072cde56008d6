"""The algorithm registry: one :class:`AlgorithmSpec` per algorithm name.

An entry is everything ``commhooks.build``, the recipes' CLI, their reports and the docs need to
know about an algorithm: its config class (whose fields document themselves), how its
components compose, and the properties of its rule. Adding an algorithm is one
:func:`register` call plus its components; nothing else dispatches on algorithm names::

    @dataclass(frozen=True, kw_only=True)
    class MyConfig(CommonConfig, PeriodicConfig, ConstantPeriodConfig):
        \"\"\"My local SGD: one line that --help and the docs show.\"\"\"

    commhooks.register(commhooks.AlgorithmSpec(
        name="mine", config=MyConfig,
        compose=lambda cfg, ctx: [GradientScope(ctx, cfg.warmup_steps),
                                  PeriodicAveraging.from_config(ctx, cfg, ConstantPeriod.from_config(cfg))],
    ))

The built-in algorithms register themselves in ``commhooks/algorithms.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .base.config import CommonConfig, HParamDoc, field_docs, required_fields
from .ops.component import Component, Context


@dataclass(frozen=True, kw_only=True)
class AlgorithmSpec:
    """One algorithm as the registry knows it.

    Args:
        name: the name ``build`` and the recipes' ``--algo`` take (lower case, digits, ``-``).
        config: its hyper-parameters: a frozen keyword-only dataclass deriving from
            ``CommonConfig`` whose first docstring line describes the algorithm.
        compose: ``(config, context) -> components``, the step wrappers in order; the first is
            the algorithm's ``GradientScope`` (the one owner of the gradient hook's group).
        replicas_identical: the rule keeps every replica equal (SSGD): DDP may broadcast
            buffers, and ``consensus()`` needs no communication.
        single_replica: the rule has exactly one replica (Entropy-SGD): ``replica_size``
            defaults to, and must be, the world size.
        full_data_per_replica: the algorithm's paper gives every replica the whole data set
            (Elastic-SGD, Parle); the recipes follow it unless told otherwise.
    """

    name: str
    config: type[CommonConfig]
    compose: Callable[[Any, Context], list[Component]]
    replicas_identical: bool = False
    single_replica: bool = False
    full_data_per_replica: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", self.name):
            raise ValueError(f"name must be lower-case letters, digits and '-', got {self.name!r}")
        if not (isinstance(self.config, type) and issubclass(self.config, CommonConfig)):
            raise ValueError(f"config must be a subclass of commhooks.CommonConfig, got {self.config!r}")
        params = getattr(self.config, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise ValueError(f"config {self.config.__name__} must be a frozen dataclass")
        missing = [f.name for f in fields(self.config) if "help" not in f.metadata]
        if missing:
            raise ValueError(f"config {self.config.__name__}: fields {missing} lack help (use commhooks.hparam)")
        if not callable(self.compose):
            raise ValueError(f"compose must be callable, got {self.compose!r}")

    @property
    def summary(self) -> str:
        """The algorithm in one line: the first line of its config's docstring."""
        return (self.config.__doc__ or self.name).strip().splitlines()[0]

    def default_replica_size(self, world_size: int) -> int:
        return world_size if self.single_replica else 1


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec, *, replace: bool = False) -> AlgorithmSpec:
    """Add ``spec`` to the registry; ``build``, the recipes' ``--algo`` and the docs then know it.

    Raises ``ValueError`` if the name is taken (pass ``replace=True`` to override an entry).
    """
    if not isinstance(spec, AlgorithmSpec):
        raise ValueError(f"spec must be a commhooks.AlgorithmSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"an algorithm named {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove algorithm ``name`` from the registry."""
    algorithm_spec(name)
    del _REGISTRY[name]


def algorithm_names() -> tuple[str, ...]:
    """Every registered algorithm, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The registry entry of ``name``; ``ValueError`` naming the registered ones otherwise."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"name must be one of {algorithm_names()}, got {name!r}")
    return spec


def config_class(name: str) -> type[CommonConfig]:
    """The hyper-parameter dataclass of algorithm ``name``."""
    return algorithm_spec(name).config


def describe(name: str) -> str:
    """Algorithm ``name`` in one line (its config class's docstring summary)."""
    return algorithm_spec(name).summary


def hparam_docs(name: str) -> list[HParamDoc]:
    """Every hyper-parameter of algorithm ``name`` with its meaning, default, valid values, choices."""
    return field_docs(config_class(name))


def make_config(name: str, hparams: dict[str, Any]) -> CommonConfig:
    """Instantiate ``name``'s config from keyword hyper-parameters; ``ValueError`` naming the argument."""
    cls = config_class(name)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(f"{unknown[0]} is not a hyper-parameter of {name!r}; it takes {sorted(known)}")
    missing = [f for f in required_fields(cls) if f not in hparams]
    if missing:
        raise ValueError(f"{', '.join(missing)} is required for {name!r}")
    return cls(**hparams)
