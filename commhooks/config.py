"""Hyper-parameters of every algorithm, validated at ``build``; each field documents itself.

Each algorithm has a ``@dataclass(kw_only=True)``; a field without a default is required. A
user's bad value raises ``ValueError`` naming the argument and the rule. Every field carries
``metadata={"help": ..., "valid": ...}`` (and ``"choices"`` for a fixed set): the recipes'
``--help`` and the pages under ``docs/`` are generated from it (:func:`hparam_docs`). The update
rules themselves are written out in ``docs/`` (one page per algorithm family).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

# The fixed sets of the choice fields (also in each field's metadata["choices"]).
BUFFER_POLICIES: tuple[str, ...] = ("average", "local")
GRAD_COMPRESSIONS: tuple[str | None, ...] = (None, "fp16", "bf16")
TOPOLOGIES: tuple[str, ...] = ("random-pair", "ring", "all")


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hp(default: Any = MISSING, *, help: str, valid: str, choices: tuple | None = None) -> Any:
    """A config field with its one-line meaning (``help``) and valid values (``valid``)."""
    metadata: dict[str, Any] = {"help": help, "valid": valid}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class CommonConfig:
    """Options every algorithm takes.

    Args:
        buffers: ``"average"`` (floating buffers averaged with the weights, integer buffers
            max-reduced) or ``"local"`` (buffers never communicated).
        grad_compression: ``None``, ``"fp16"`` or ``"bf16"``: the dtype gradients travel in.
    """

    buffers: str = _hp(
        "average", choices=BUFFER_POLICIES, valid='"average" or "local"',
        help="buffers such as BatchNorm statistics: average = floating buffers averaged with the "
             "weights (integer ones take the max), local = never communicated")
    grad_compression: str | None = _hp(
        None, choices=GRAD_COMPRESSIONS, valid='None, "fp16" or "bf16"',
        help="dtype the gradients travel in (None: as computed, float32); halves gradient bytes, "
             "the average is taken in that precision")

    def validate(self, world_size: int, replica_size: int) -> None:
        _check(self.buffers in BUFFER_POLICIES, "buffers", '"average" or "local"', self.buffers)
        _check(
            self.grad_compression in GRAD_COMPRESSIONS,
            "grad_compression",
            'None, "fp16" or "bf16"',
            self.grad_compression,
        )


@dataclass(kw_only=True)
class SSGDConfig(CommonConfig):
    """SSGD: synchronous SGD, DDP's gradient all-reduce at every step, through our hook."""


@dataclass(kw_only=True)
class SSGDNoiseConfig(CommonConfig):
    """SSGD*: SSGD plus isotropic Gaussian weight noise (Zhang et al., OpenReview fStMpzKkjMT, Sec. 2.1)."""

    noise_std: float = _hp(
        valid="a finite number > 0 (required)",
        help="sigma of the Gaussian noise added to every parameter after each step")
    seed: int = _hp(0, valid="an integer",
                    help="seed of the noise draws (every rank draws the same noise)")

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check(
            isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std) and self.noise_std > 0,
            "noise_std", "a finite number > 0", self.noise_std,
        )
        _check(_is_int(self.seed), "seed", "an integer", self.seed)


_WARMUP_HELP = "steps of synchronous SGD before the local steps begin (w)"
_OUTER_LR_HELP = ("eta, the outer learning rate on the pseudo-gradient g - mean of the replicas (g: the previous average's result); "
                  "1 with outer_momentum 0 is the plain average")
_OUTER_MOMENTUM_HELP = "mu, the outer momentum: m <- mu * m + (g - mean of the replicas)"
_OUTER_NESTEROV_HELP = "Nesterov outer momentum (DiLoCo) instead of heavy ball"


@dataclass(kw_only=True)
class PeriodicOptions:
    """What every periodic-averaging algorithm takes besides its period: overlap and an outer optimizer.

    Args:
        delay: steps between a synchronisation's snapshot and the correction that applies its
            average (docs/periodic.md, "Overlapped averaging"); 0 = blocking.
        outer_lr, outer_momentum, outer_nesterov: the outer optimizer on the pseudo-gradient
            (docs/periodic.md, "Outer optimizers"); ``1, 0, False`` is the plain average.
    """

    delay: int = _hp(0, valid="an integer >= 0 and < every period (0: blocking)",
                     help="overlap: start the weight average at the sync step and apply it as a correction "
                          "this many steps later, local steps continuing meanwhile; 0 = blocking average")
    outer_lr: float = _hp(1.0, valid="a finite number > 0", help=_OUTER_LR_HELP)
    outer_momentum: float = _hp(0.0, valid="in [0, 1)", help=_OUTER_MOMENTUM_HELP)
    outer_nesterov: bool = _hp(False, valid="True or False", help=_OUTER_NESTEROV_HELP)

    @property
    def has_outer_optimizer(self) -> bool:
        """Whether the rule differs from the plain average (an outer optimizer must be built)."""
        return self.outer_lr != 1.0 or self.outer_momentum != 0.0

    def validate_periodic(self, shortest_period: int, period_name: str) -> None:
        """Check the overlap and outer-optimizer options; ``shortest_period`` bounds ``delay``."""
        _check(_is_int(self.delay) and self.delay >= 0, "delay", "an integer >= 0", self.delay)
        _check(self.delay < shortest_period, "delay",
               f"< {period_name} ({shortest_period}): a correction must land before the next average", self.delay)
        _check(isinstance(self.outer_lr, (int, float)) and not isinstance(self.outer_lr, bool)
               and math.isfinite(self.outer_lr) and self.outer_lr > 0, "outer_lr", "a finite number > 0", self.outer_lr)
        _check(isinstance(self.outer_momentum, (int, float)) and not isinstance(self.outer_momentum, bool)
               and 0 <= self.outer_momentum < 1, "outer_momentum", "in [0, 1)", self.outer_momentum)
        _check(isinstance(self.outer_nesterov, bool), "outer_nesterov", "True or False", self.outer_nesterov)


@dataclass(kw_only=True)
class CPSGDConfig(PeriodicOptions, CommonConfig):
    """CPSGD: local SGD, weights averaged every `period` steps (Jiang & Agrawal, arXiv 2007.06134, Alg. 1)."""

    period: int = _hp(valid="an integer >= 1 (required; 1 is SSGD at a higher cost)",
                      help="local steps between two weight averages (p)")
    warmup_steps: int = _hp(0, valid="an integer >= 0", help=_WARMUP_HELP)
    log_every: int = _hp(0, valid="an integer >= 0",
                         help="estimate the consensus distance at the first average after every this "
                              "many steps, from a few kilobytes (measure_bytes); 0 = never (NaN)")

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check(_is_int(self.period) and self.period >= 1, "period", "an integer >= 1", self.period)
        _check(
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "warmup_steps", "an integer >= 0", self.warmup_steps,
        )
        _check(_is_int(self.log_every) and self.log_every >= 0, "log_every", "an integer >= 0", self.log_every)
        self.validate_periodic(self.period, "period")


@dataclass(kw_only=True)
class DiLoCoConfig(CPSGDConfig):
    """DiLoCo: local steps, outer Nesterov SGD on the averaged update (Douillard et al., arXiv 2311.08105, Alg. 1)."""

    period: int = _hp(500, valid="an integer >= 1", help="local (inner) steps between two outer steps (H)")
    outer_lr: float = _hp(0.7, valid="a finite number > 0", help=_OUTER_LR_HELP)
    outer_momentum: float = _hp(0.9, valid="in [0, 1)", help=_OUTER_MOMENTUM_HELP)
    outer_nesterov: bool = _hp(True, valid="True or False", help=_OUTER_NESTEROV_HELP)


@dataclass(kw_only=True)
class SlowMoConfig(CPSGDConfig):
    """SlowMo: local steps, slow momentum on the averaged update (Wang et al., ICLR 2020, arXiv 1910.00643, Alg. 1)."""

    period: int = _hp(48, valid="an integer >= 1", help="local (base) steps between two slow momentum steps (tau)")
    outer_lr: float = _hp(1.0, valid="a finite number > 0",
                          help="alpha, the slow learning rate: g <- g - alpha * lr * u, lr the inner lr at the average")
    outer_momentum: float = _hp(0.5, valid="in [0, 1)",
                                help="beta, the slow momentum: u <- beta * u + (g - mean of the replicas) / lr")
    outer_nesterov: bool = _hp(False, valid="True or False",
                               help="step with beta * u_new + (g - mean) / lr (Nesterov) instead of u_new (the paper)")


@dataclass(kw_only=True)
class ADPSGDConfig(PeriodicOptions, CommonConfig):
    """ADPSGD: periodic averaging, period adapted to the drift (Jiang & Agrawal, arXiv 2007.06134, Alg. 2)."""

    sample_steps: int = _hp(
        valid="an integer >= 0 (required)",
        help="K_s: until this step every sync adds a sample S/lr to the calibration C2; after it "
             "the period adapts (the paper: a quarter of the run)")
    warmup_steps: int = _hp(0, valid="an integer >= 0", help=_WARMUP_HELP)
    p_init: int = _hp(4, valid="an integer >= p_min", help="the period right after the warm-up")
    low: float = _hp(0.7, valid=">= 0 and < high",
                     help="the period grows by 1 when the consensus distance S < low * lr * C2")
    high: float = _hp(1.3, valid="> low (inf: never shrink)",
                      help="the period shrinks by 1 when S > high * lr * C2")
    p_min: int = _hp(1, valid="an integer >= 1", help="the smallest period")
    p_max: int | None = _hp(None, valid="None (no cap) or an integer >= p_init",
                            help="the largest period")

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
        self.validate_periodic(self.p_min, "p_min")


@dataclass(kw_only=True)
class DPSGDConfig(CommonConfig):
    """DPSGD: gossip, each step mixes weights with neighbours (Zhang et al., OpenReview fStMpzKkjMT, eq. 2)."""

    topology: str = _hp(
        "random-pair", choices=TOPOLOGIES, valid='"random-pair", "ring" or "all"',
        help="neighbours: random-pair = a fresh random pairing each step, ring = both ring "
             "neighbours, all = every replica (the exact mean)")
    seed: int = _hp(0, valid="an integer",
                    help="seed of the random pairing (every rank draws the same one)")
    log_every: int = _hp(0, valid="an integer >= 0",
                         help="estimate the consensus distance every this many steps, from a few "
                              "kilobytes (measure_bytes); 0 = never (NaN)")

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


_STEPS_PER_EPOCH_HELP = "B, the steps in one epoch: sets how fast scoping grows the coefficients"
_STEPS_PER_EPOCH_VALID = "an integer >= 1 (required when scoping=True)"
_SCOPING_HELP = "grow the coefficients by 1/(1 - 1/(2B)) per clock tick up to their caps; False keeps them constant"


@dataclass(kw_only=True)
class EASGDConfig(CommonConfig):
    """Elastic-SGD: each replica pulled towards the replicas' average (Parle paper, arXiv 1707.00424, eq. 7)."""

    rho: float = _hp(1.0, valid="a finite number >= 0 (0: independent replicas)",
                     help="coupling: rho * (x_a - mean) is added to each replica's gradient")
    rho_max: float = _hp(10.0, valid=">= rho", help="cap of rho under scoping")
    period: int = _hp(1, valid="an integer >= 1",
                      help="steps between two refreshes of the replicas' average (the scoping clock)")
    steps_per_epoch: int | None = _hp(None, valid=_STEPS_PER_EPOCH_VALID, help=_STEPS_PER_EPOCH_HELP)
    scoping: bool = _hp(True, valid="True or False", help=_SCOPING_HELP)

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check_coefficient("rho", self.rho, "rho_max", self.rho_max)
        _check(_is_int(self.period) and self.period >= 1, "period", "an integer >= 1", self.period)
        _check_scoping(self)


@dataclass(kw_only=True)
class EntropySGDConfig(CommonConfig):
    """Entropy-SGD: L proximal inner steps, then an outer step of the anchor (arXiv 1611.01838; Parle eq. 6)."""

    L: int = _hp(25, valid="an integer >= 1", help="inner steps per outer step (and per weight exchange in parle)")
    alpha: float = _hp(0.75, valid="in [0, 1)",
                       help="weight of the running average of the inner iterates: z = alpha z + (1 - alpha) y")
    gamma: float = _hp(0.01, valid="a finite number >= 0",
                       help="proximal coupling: gamma * (y - x) pulls the inner iterate y to its anchor x")
    gamma_max: float = _hp(1.0, valid=">= gamma", help="cap of gamma under scoping")
    steps_per_epoch: int | None = _hp(None, valid=_STEPS_PER_EPOCH_VALID, help=_STEPS_PER_EPOCH_HELP)
    scoping: bool = _hp(True, valid="True or False", help=_SCOPING_HELP)

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check(_is_int(self.L) and self.L >= 1, "L", "an integer >= 1", self.L)
        _check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha < 1, "alpha", "in [0, 1)", self.alpha)
        _check_coefficient("gamma", self.gamma, "gamma_max", self.gamma_max)
        _check_scoping(self)


@dataclass(kw_only=True)
class ParleConfig(EntropySGDConfig):
    """Parle: Entropy-SGD on every replica, anchors coupled elastically (arXiv 1707.00424, eq. 8)."""

    rho: float = _hp(1.0, valid="a finite number >= 0 (0: independent replicas)",
                     help="coupling: rho * (x_a - mean of the anchors) joins each anchor's outer step")
    rho_max: float = _hp(10.0, valid=">= rho", help="cap of rho under scoping")

    def validate(self, world_size: int, replica_size: int) -> None:
        super().validate(world_size, replica_size)
        _check_coefficient("rho", self.rho, "rho_max", self.rho_max)


CONFIGS: dict[str, type[CommonConfig]] = {
    "ssgd": SSGDConfig,
    "ssgd-noise": SSGDNoiseConfig,
    "cpsgd": CPSGDConfig,
    "adpsgd": ADPSGDConfig,
    "diloco": DiLoCoConfig,
    "slowmo": SlowMoConfig,
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


@dataclass(frozen=True)
class HParamDoc:
    """One hyper-parameter as documented by its field: what ``--help`` and ``docs/`` show.

    Args:
        name: the keyword ``build`` takes.
        help: its meaning, one line.
        valid: the values ``validate`` accepts, in words.
        default: the library default, or ``dataclasses.MISSING`` when required.
        choices: the fixed set of values, or None.
    """

    name: str
    help: str
    valid: str
    default: Any
    choices: tuple | None

    @property
    def required(self) -> bool:
        return self.default is MISSING


def describe(name: str) -> str:
    """Algorithm ``name`` in one line (its config class's docstring summary)."""
    return (config_class(name).__doc__ or name).strip().splitlines()[0]


def hparam_docs(name: str) -> list[HParamDoc]:
    """Every hyper-parameter of algorithm ``name`` with its meaning, default, valid values, choices."""
    return [
        HParamDoc(name=f.name, help=f.metadata["help"], valid=f.metadata["valid"], default=f.default,
                  choices=f.metadata.get("choices"))
        for f in fields(config_class(name))
    ]


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
