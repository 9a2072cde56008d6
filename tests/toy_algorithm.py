"""A toy algorithm registered from outside ``commhooks`` (the registry's test fixture, and a
``--plugin`` for the recipes): CPSGD whose period ramps up, 1, 2, ..., ``period``, one step
per average — a different warm-up rule than CPSGD's steps of SSGD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import commhooks

NAME = "cpsgd-ramp"


@dataclass(kw_only=True)
class RampPeriod:
    """The period after the ``n``-th average is ``min(n + 1, p_max)``."""

    p_max: int
    period: int = 1
    adaptive: ClassVar[bool] = False

    def update(self, distance: float, lr: float, k: int) -> None:
        self.period = min(self.p_max, self.period + 1)


@dataclass(frozen=True, kw_only=True)
class RampConfig(commhooks.PeriodicConfig, commhooks.ConstantPeriodConfig, commhooks.CommonConfig):
    """CPSGD-ramp: local SGD whose period grows 1, 2, ... up to `period` (a registry test's toy)."""


def compose(cfg: RampConfig, ctx: commhooks.Context) -> list[commhooks.Component]:
    return [commhooks.GradientScope(ctx, global_until=cfg.warmup_steps),
            commhooks.PeriodicAveraging.from_config(ctx, cfg, RampPeriod(p_max=cfg.period))]


def syncs_after(steps: int, p_max: int) -> int:
    """Averages in ``steps`` local steps: the n-th comes after ``sum_{i<=n} min(i, p_max)`` steps."""
    done, n = 0, 0
    while done + min(n + 1, p_max) <= steps:
        n += 1
        done += min(n, p_max)
    return n


if NAME not in commhooks.algorithm_names():
    commhooks.register(commhooks.AlgorithmSpec(name=NAME, config=RampConfig, compose=compose))
