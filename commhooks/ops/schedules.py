"""Schedules: when periodic averaging synchronises (constant or adaptive period) and how the
elastic coefficients grow (scoping), each with the config of its fields."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..base.config import ConfigBase, check, hparam, is_int


@dataclass(frozen=True, kw_only=True)
class ConstantPeriodConfig(ConfigBase):
    """The fields of :class:`ConstantPeriod`."""

    period: int = hparam(valid="an integer >= 1 (required; 1 is SSGD at a higher cost)",
                         help="local steps between two weight averages (p)", int_at_least=1)


@dataclass(frozen=True, kw_only=True)
class AdaptivePeriodConfig(ConfigBase):
    """The fields of :class:`AdaptivePeriod`."""

    sample_steps: int = hparam(
        valid="an integer >= 0 (required)",
        help="K_s: until this step every sync adds a sample S/lr to the calibration C2; after it "
             "the period adapts (the paper: a quarter of the run)", int_at_least=0)
    p_init: int = hparam(4, valid="an integer >= p_min", help="the period right after the warm-up")
    low: float = hparam(0.7, valid=">= 0 and < high",
                        help="the period grows by 1 when the consensus distance S < low * lr * C2")
    high: float = hparam(1.3, valid="> low (inf: never shrink)",
                         help="the period shrinks by 1 when S > high * lr * C2")
    p_min: int = hparam(1, valid="an integer >= 1", help="the smallest period", int_at_least=1)
    p_max: int | None = hparam(None, valid="None (no cap) or an integer >= p_init", help="the largest period")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_int(self.p_init) and self.p_init >= self.p_min, "p_init", f"an integer >= p_min ({self.p_min})", self.p_init)
        if self.p_max is not None:
            check(is_int(self.p_max) and self.p_max >= self.p_init, "p_max", f"None or an integer >= p_init ({self.p_init})",
                  self.p_max)
        check(isinstance(self.low, (int, float)) and self.low >= 0, "low", ">= 0", self.low)
        check(isinstance(self.high, (int, float)) and self.low < self.high, "low", f"< high ({self.high})", self.low)


@dataclass(kw_only=True)
class ConstantPeriod:
    """CPSGD: synchronise every ``period`` local steps (arXiv 2007.06134, Algorithm 1)."""

    period: int
    adaptive: ClassVar[bool] = False

    def update(self, distance: float, lr: float, k: int) -> None:
        pass

    @classmethod
    def from_config(cls, cfg: ConstantPeriodConfig) -> ConstantPeriod:
        return cls(period=cfg.period)


@dataclass(kw_only=True)
class AdaptivePeriod:
    """ADPSGD's controller (arXiv 2007.06134, Algorithm 2; docs/periodic.md, ADPSGD step 4).

    Before ``sample_steps`` it only records ``S / lr`` samples whose mean is ``C2``; after, it
    raises the period when ``S < low * lr * C2`` and lowers it when ``S > high * lr * C2``.
    If no sample was recorded before ``sample_steps`` (a sampling phase shorter than the first
    period), the first synchronisation's sample is taken so that ``C2`` is defined.
    """

    period: int
    adaptive: ClassVar[bool] = True
    sample_steps: int
    low: float
    high: float
    p_min: int
    p_max: int | None
    samples_sum: float = 0.0
    samples_count: int = 0

    @classmethod
    def from_config(cls, cfg: AdaptivePeriodConfig) -> AdaptivePeriod:
        return cls(period=cfg.p_init, sample_steps=cfg.sample_steps, low=cfg.low, high=cfg.high,
                   p_min=cfg.p_min, p_max=cfg.p_max)

    @property
    def c2(self) -> float:
        return self.samples_sum / self.samples_count if self.samples_count else math.nan

    def update(self, distance: float, lr: float, k: int) -> None:
        if k < self.sample_steps or self.samples_count == 0:
            self.samples_sum += distance / lr
            self.samples_count += 1
        elif distance < self.low * lr * self.c2:
            self.period += 1
        elif distance > self.high * lr * self.c2:
            self.period = max(self.p_min, self.period - 1)
        if self.p_max is not None:
            self.period = min(self.period, self.p_max)

class Schedule(Protocol):
    """When periodic averaging synchronises: after ``period`` local steps, then ``update``.

    A dataclass (``PeriodicAveraging.state_dict`` saves its fields), e.g. :class:`ConstantPeriod`
    or :class:`AdaptivePeriod`.
    """

    period: int
    #: The schedule reads the exact consensus distance at every synchronisation (one
    #: parameter-sized buffer and one scalar all-reduce), and its period is worth logging.
    adaptive: ClassVar[bool]

    def update(self, distance: float, lr: float, k: int) -> None:
        """After the synchronisation of step ``k``, given the consensus distance it measured
        (NaN if it measured none) and the learning rate."""

_STEPS_PER_EPOCH_HELP = "B, the steps in one epoch: sets how fast scoping grows the coefficients"


@dataclass(frozen=True, kw_only=True)
class ScopingConfig(ConfigBase):
    """Scoping (Parle, arXiv 1707.00424, Section 2.4, eq. 9): coefficients that grow every clock tick."""

    steps_per_epoch: int | None = hparam(None, valid="an integer >= 1 (required when scoping=True)",
                                         help=_STEPS_PER_EPOCH_HELP)
    scoping: bool = hparam(True, valid="True or False",
                           help="grow the coefficients by 1/(1 - 1/(2B)) per clock tick up to their caps; "
                                "False keeps them constant")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.scoping, bool), "scoping", "True or False", self.scoping)
        if self.scoping:
            check(is_int(self.steps_per_epoch) and self.steps_per_epoch is not None and self.steps_per_epoch >= 1,
                  "steps_per_epoch",
                  "an integer >= 1 when scoping=True (pass scoping=False to keep the coefficients constant)",
                  self.steps_per_epoch)


def check_coefficient(name: str, value: float, cap_name: str, cap: float) -> None:
    """A coefficient is a finite number >= 0 and its cap is at least the coefficient."""
    check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name, "a finite number >= 0", value)
    check(isinstance(cap, (int, float)) and cap >= value, cap_name, f">= {name} ({value})", cap)


def scoped(coef: float, coef_max: float, steps_per_epoch: int | None, clock: int, scoping: bool) -> float:
    """``min(coef_max, coef * (1 - 1/(2B)) ** (-clock))`` (Parle, eq. 9), or ``coef`` unscoped.

    The paper anneals the inverse of our coefficient; ours therefore grows, clipped at ``coef_max``.
    """
    if not scoping:
        return coef
    assert steps_per_epoch is not None and steps_per_epoch >= 1
    q = 1.0 - 1.0 / (2.0 * steps_per_epoch)
    return min(coef_max, coef * q ** (-clock))
