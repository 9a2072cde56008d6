"""Hyper-parameters of every algorithm, named as in ALGORITHMS.md, validated at ``build``.

Each algorithm has a ``@dataclass(kw_only=True)``; a field without a default is required. A
user's bad value raises ``ValueError`` naming the argument and the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(kw_only=True)
class CommonConfig:
    """Options every algorithm takes.

    Args:
        buffers: ``"average"`` (floating buffers averaged with the weights, integer buffers
            max-reduced) or ``"local"`` (buffers never communicated).
        grad_compression: ``None``, ``"fp16"`` or ``"bf16"``: the dtype gradients travel in.
    """

    buffers: str = "average"
    grad_compression: str | None = None

    def validate(self, world_size: int, replica_size: int) -> None:
        _check(self.buffers in ("average", "local"), "buffers", '"average" or "local"', self.buffers)
        _check(
            self.grad_compression in (None, "fp16", "bf16"),
            "grad_compression",
            'None, "fp16" or "bf16"',
            self.grad_compression,
        )


@dataclass(kw_only=True)
class SSGDConfig(CommonConfig):
    """SSGD: DDP's synchronous SGD through our hook (no hyper-parameters of its own)."""


@dataclass(kw_only=True)
class SSGDNoiseConfig(CommonConfig):
    """SSGD* (seed 002, Section 2.1): ``noise_std`` sigma > 0 (required), ``seed`` of the draws."""

    noise_std: float
    seed: int = 0

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check(
            isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std) and self.noise_std > 0,
            "noise_std", "a finite number > 0", self.noise_std,
        )
        _check(_is_int(self.seed), "seed", "an integer", self.seed)


@dataclass(kw_only=True)
class CPSGDConfig(CommonConfig):
    """CPSGD (seed 004, Algorithm 1): ``period`` p >= 1 (required), ``warmup_steps`` w >= 0,
    ``log_every`` (estimate the consensus distance at the first sync after every that many
    steps, from a few kilobytes; 0 = never, reported as NaN)."""

    period: int
    warmup_steps: int = 0
    log_every: int = 0

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check(_is_int(self.period) and self.period >= 1, "period", "an integer >= 1", self.period)
        _check(
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "warmup_steps", "an integer >= 0", self.warmup_steps,
        )
        _check(_is_int(self.log_every) and self.log_every >= 0, "log_every", "an integer >= 0", self.log_every)


@dataclass(kw_only=True)
class ADPSGDConfig(CommonConfig):
    """ADPSGD (seed 004, Algorithm 2). ``sample_steps`` K_s is required (the paper: a quarter of the run)."""

    sample_steps: int
    warmup_steps: int = 0
    p_init: int = 4
    low: float = 0.7
    high: float = 1.3
    p_min: int = 1
    p_max: int | None = None

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check(
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "warmup_steps", "an integer >= 0", self.warmup_steps,
        )
        _check(
            _is_int(self.sample_steps) and self.sample_steps >= 0,
            "sample_steps", "an integer >= 0", self.sample_steps,
        )
        _check(_is_int(self.p_min) and self.p_min >= 1, "p_min", "an integer >= 1", self.p_min)
        _check(
            _is_int(self.p_init) and self.p_init >= self.p_min,
            "p_init", f"an integer >= p_min ({self.p_min})", self.p_init,
        )
        if self.p_max is not None:
            _check(
                _is_int(self.p_max) and self.p_max >= self.p_init,
                "p_max", f"None or an integer >= p_init ({self.p_init})", self.p_max,
            )
        _check(self.low >= 0, "low", ">= 0", self.low)
        _check(self.low < self.high, "low", f"< high ({self.high})", self.low)


TOPOLOGIES = ("random-pair", "ring", "all")


@dataclass(kw_only=True)
class DPSGDConfig(CommonConfig):
    """DPSGD (seed 002, eq. 2): ``topology`` in random-pair|ring|all, ``seed`` of the matching,
    ``log_every`` (estimate the consensus distance every that many steps, from a few kilobytes;
    0 = never, reported as NaN)."""

    topology: str = "random-pair"
    seed: int = 0
    log_every: int = 0

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check(self.topology in TOPOLOGIES, "topology", f"one of {TOPOLOGIES}", self.topology)
        _check(_is_int(self.seed), "seed", "an integer", self.seed)
        _check(_is_int(self.log_every) and self.log_every >= 0, "log_every", "an integer >= 0", self.log_every)


def _check_scoping(cfg: EASGDConfig | EntropySGDConfig) -> None:
    _check(isinstance(cfg.scoping, bool), "scoping", "True or False", cfg.scoping)
    if cfg.scoping:
        _check(
            _is_int(cfg.steps_per_epoch) and cfg.steps_per_epoch >= 1,
            "steps_per_epoch",
            "an integer >= 1 when scoping=True (pass scoping=False to keep the coefficients constant)",
            cfg.steps_per_epoch,
        )


def _check_coefficient(name: str, value: float, cap_name: str, cap: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name, "a finite number >= 0", value)
    _check(isinstance(cap, (int, float)) and cap >= value, cap_name, f">= {name} ({value})", cap)


@dataclass(kw_only=True)
class EASGDConfig(CommonConfig):
    """Elastic-SGD (seed 000, eq. 7 with the scoping of eq. 9)."""

    rho: float = 1.0
    rho_max: float = 10.0
    period: int = 1
    steps_per_epoch: int | None = None
    scoping: bool = True

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check_coefficient("rho", self.rho, "rho_max", self.rho_max)
        _check(_is_int(self.period) and self.period >= 1, "period", "an integer >= 1", self.period)
        _check_scoping(self)


@dataclass(kw_only=True)
class EntropySGDConfig(CommonConfig):
    """Entropy-SGD (seed 000, eq. 6): Parle with a single replica."""

    L: int = 25
    alpha: float = 0.75
    gamma: float = 0.01
    gamma_max: float = 1.0
    steps_per_epoch: int | None = None
    scoping: bool = True

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check(_is_int(self.L) and self.L >= 1, "L", "an integer >= 1", self.L)
        _check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha < 1, "alpha", "in [0, 1)", self.alpha)
        _check_coefficient("gamma", self.gamma, "gamma_max", self.gamma_max)
        _check_scoping(self)


@dataclass(kw_only=True)
class ParleConfig(EntropySGDConfig):
    """Parle (seed 000, eq. 8): Entropy-SGD inner loops, anchors coupled elastically."""

    rho: float = 1.0
    rho_max: float = 10.0

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check_coefficient("rho", self.rho, "rho_max", self.rho_max)


CONFIGS: dict[str, type[CommonConfig]] = {
    "ssgd": SSGDConfig,
    "ssgd-noise": SSGDNoiseConfig,
    "cpsgd": CPSGDConfig,
    "adpsgd": ADPSGDConfig,
    "dpsgd": DPSGDConfig,
    "easgd": EASGDConfig,
    "entropysgd": EntropySGDConfig,
    "parle": ParleConfig,
}

ALGORITHMS: tuple[str, ...] = tuple(CONFIGS)


def config_class(name: str) -> type[CommonConfig]:
    """The hyper-parameter dataclass of algorithm ``name``."""
    if name not in CONFIGS:
        raise ValueError(f"name must be one of {ALGORITHMS}, got {name!r}")
    return CONFIGS[name]


def make_config(name: str, hparams: dict[str, object]) -> CommonConfig:
    """Instantiate ``name``'s config from keyword hyper-parameters, with clear errors."""
    cls = config_class(name)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(
            f"{unknown[0]} is not a hyper-parameter of {name!r}; it takes {sorted(known)}"
        )
    try:
        return cls(**hparams)
    except TypeError as err:  # a required field is missing
        missing = [f.name for f in fields(cls) if f.name not in hparams and f.default is f.default_factory]
        raise ValueError(f"{', '.join(missing)} is required for {name!r} ({err})") from None
