"""The built-in algorithms: each is a config composed of its components' configs and one
registry entry (``commhooks.registry``). The update rules are written out under ``docs/``."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .base.config import CommonConfig, hparam
from .components.elastic import ElasticConfig, ElasticPull
from .components.gossip import GossipConfig, GossipMixing
from .components.noise import IsotropicNoise, NoiseConfig
from .components.outer import OUTER_LR_HELP, OUTER_MOMENTUM_HELP, OUTER_NESTEROV_HELP, OuterConfig, OuterOptimizer
from .components.periodic import OverlapConfig, PeriodicAveraging, PeriodicConfig
from .components.proximal import ProximalConfig, ProximalInnerLoop
from .components.scope import GradientScope
from .ops.component import Component, Context
from .ops.probe import ConsensusLogConfig
from .ops.pulls import CouplingConfig, warn_unstable_pull
from .ops.schedules import AdaptivePeriod, AdaptivePeriodConfig, ConstantPeriod, ConstantPeriodConfig
from .registry import AlgorithmSpec, register

# Field order (what --help and the docs tables show) follows the reversed method resolution
# order: CommonConfig's fields first, then the bases from right to left.


@dataclass(frozen=True, kw_only=True)
class SSGDConfig(CommonConfig):
    """SSGD: synchronous SGD, DDP's gradient all-reduce at every step, through our hook."""


@dataclass(frozen=True, kw_only=True)
class SSGDNoiseConfig(NoiseConfig, CommonConfig):
    """SSGD*: SSGD plus isotropic Gaussian weight noise (Zhang et al., OpenReview fStMpzKkjMT, Sec. 2.1)."""


@dataclass(frozen=True, kw_only=True)
class CPSGDConfig(OuterConfig, ConsensusLogConfig, OverlapConfig, PeriodicConfig, ConstantPeriodConfig, CommonConfig):
    """CPSGD: local SGD, weights averaged every `period` steps (Jiang & Agrawal, arXiv 2007.06134, Alg. 1)."""

    # 8: the constant period the ADPSGD paper compares against
    period: int = hparam(8, valid="an integer >= 1 (1 is SSGD at a higher cost)", help="local steps between two weight averages (p)",
                         int_at_least=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_delay(self.period, "period")

    def warn_foot_guns(self, name: str, optimizer: Any, num_replicas: int) -> None:
        super().warn_foot_guns(name, optimizer, num_replicas)
        if self.period == 1 and not self.has_outer_optimizer:
            warnings.warn(f"{name} with period=1 is SSGD computed at higher cost: use 'ssgd'", stacklevel=3)


@dataclass(frozen=True, kw_only=True)
class ADPSGDConfig(OuterConfig, AdaptivePeriodConfig, OverlapConfig, PeriodicConfig, CommonConfig):
    """ADPSGD: periodic averaging, period adapted to the drift (Jiang & Agrawal, arXiv 2007.06134, Alg. 2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_delay(self.p_min, "p_min")


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig(CPSGDConfig):
    """DiLoCo: local steps, outer Nesterov SGD on the averaged update (Douillard et al., arXiv 2311.08105, Alg. 1)."""

    period: int = hparam(500, valid="an integer >= 1", help="local (inner) steps between two outer steps (H)", int_at_least=1)
    outer_lr: float = hparam(0.7, valid="a finite number > 0", help=OUTER_LR_HELP)
    outer_momentum: float = hparam(0.9, valid="in [0, 1)", help=OUTER_MOMENTUM_HELP)
    outer_nesterov: bool = hparam(True, valid="True or False", help=OUTER_NESTEROV_HELP)


@dataclass(frozen=True, kw_only=True)
class SlowMoConfig(CPSGDConfig):
    """SlowMo: local steps, slow momentum on the averaged update (Wang et al., ICLR 2020, arXiv 1910.00643, Alg. 1)."""

    period: int = hparam(48, valid="an integer >= 1", help="local (base) steps between two slow momentum steps (tau)",
                         int_at_least=1)
    outer_lr: float = hparam(1.0, valid="a finite number > 0",
                             help="alpha, the slow learning rate: g <- g - alpha * lr * u, lr the inner lr at the average")
    outer_momentum: float = hparam(0.5, valid="in [0, 1)",
                                   help="beta, the slow momentum: u <- beta * u + (g - mean of the replicas) / lr")
    outer_nesterov: bool = hparam(False, valid="True or False",
                                  help="step with beta * u_new + (g - mean) / lr (Nesterov) instead of u_new (the paper)")


@dataclass(frozen=True, kw_only=True)
class DPSGDConfig(GossipConfig, CommonConfig):
    """DPSGD: gossip, each step mixes weights with neighbours (Zhang et al., OpenReview fStMpzKkjMT, eq. 2)."""


@dataclass(frozen=True, kw_only=True)
class EASGDConfig(ElasticConfig, CommonConfig):
    """Elastic-SGD: each replica pulled towards the replicas' average (Parle paper, arXiv 1707.00424, eq. 7)."""

    def warn_foot_guns(self, name: str, optimizer: Any, num_replicas: int) -> None:
        super().warn_foot_guns(name, optimizer, num_replicas)
        # The bound is SGD's; other optimizers rescale the pull. One replica: the pull is zero.
        if num_replicas > 1 and isinstance(optimizer, torch.optim.SGD):
            nesterov = bool(optimizer.param_groups[0].get("nesterov", False))
            key = "rho_max" if self.scoping else "rho"
            warn_unstable_pull(name, key, getattr(self, key), optimizer, nesterov)


@dataclass(frozen=True, kw_only=True)
class EntropySGDConfig(ProximalConfig, CommonConfig):
    """Entropy-SGD: L proximal inner steps, then an outer step of the anchor (arXiv 1611.01838; Parle eq. 6)."""


@dataclass(frozen=True, kw_only=True)
class ParleConfig(CouplingConfig, ProximalConfig, CommonConfig):
    """Parle: Entropy-SGD on every replica, anchors coupled elastically (arXiv 1707.00424, eq. 8)."""

    def warn_foot_guns(self, name: str, optimizer: Any, num_replicas: int) -> None:
        super().warn_foot_guns(name, optimizer, num_replicas)
        if num_replicas > 1:  # the anchor step is Nesterov with the optimizer's lr and momentum (Remark 2)
            key = "rho_max" if self.scoping else "rho"
            warn_unstable_pull(name, key, getattr(self, key), optimizer, nesterov=True)


def _synchronous(cfg: CommonConfig, ctx: Context) -> list[Component]:
    return [GradientScope(ctx, global_until=math.inf)]


def _ssgd_noise(cfg: SSGDNoiseConfig, ctx: Context) -> list[Component]:
    return [GradientScope(ctx, global_until=math.inf), IsotropicNoise.from_config(ctx, cfg)]


def _outer(cfg: OuterConfig, ctx: Context, warmup_steps: int, *, named: bool = False, normalize: bool = False) -> list[Component]:
    """The outer optimizer after the averaging component, when the rule has one."""
    if not (named or cfg.has_outer_optimizer):
        return []
    return [OuterOptimizer.from_config(ctx, cfg, normalize=normalize, warmup_steps=warmup_steps)]


def _local_sgd(cfg: CPSGDConfig, ctx: Context) -> list[Component]:
    return [GradientScope(ctx, global_until=cfg.warmup_steps),
            PeriodicAveraging.from_config(ctx, cfg, ConstantPeriod.from_config(cfg), measure_every=cfg.log_every,
                                          delay=cfg.delay)]


def _cpsgd(cfg: CPSGDConfig, ctx: Context) -> list[Component]:
    return [*_local_sgd(cfg, ctx), *_outer(cfg, ctx, cfg.warmup_steps)]


def _adpsgd(cfg: ADPSGDConfig, ctx: Context) -> list[Component]:
    return [GradientScope(ctx, global_until=cfg.warmup_steps),
            PeriodicAveraging.from_config(ctx, cfg, AdaptivePeriod.from_config(cfg), delay=cfg.delay),
            *_outer(cfg, ctx, cfg.warmup_steps)]


def _diloco(cfg: DiLoCoConfig, ctx: Context) -> list[Component]:
    return [*_local_sgd(cfg, ctx), *_outer(cfg, ctx, cfg.warmup_steps, named=True)]


def _slowmo(cfg: SlowMoConfig, ctx: Context) -> list[Component]:
    return [*_local_sgd(cfg, ctx), *_outer(cfg, ctx, cfg.warmup_steps, named=True, normalize=True)]


def _dpsgd(cfg: DPSGDConfig, ctx: Context) -> list[Component]:
    return [GradientScope(ctx, global_until=0), GossipMixing.from_config(ctx, cfg)]


def _easgd(cfg: EASGDConfig, ctx: Context) -> list[Component]:
    return [GradientScope(ctx, global_until=0), ElasticPull.from_config(ctx, cfg)]


def _entropysgd(cfg: EntropySGDConfig, ctx: Context) -> list[Component]:
    return [GradientScope(ctx, global_until=0), ProximalInnerLoop.from_config(ctx, cfg)]


def _parle(cfg: ParleConfig, ctx: Context) -> list[Component]:
    return [GradientScope(ctx, global_until=0), ProximalInnerLoop.from_config(ctx, cfg, coupling=cfg)]


BUILTIN: tuple[AlgorithmSpec, ...] = (
    AlgorithmSpec(name="ssgd", config=SSGDConfig, compose=_synchronous, replicas_identical=True),
    AlgorithmSpec(name="ssgd-noise", config=SSGDNoiseConfig, compose=_ssgd_noise, replicas_identical=True),
    AlgorithmSpec(name="cpsgd", config=CPSGDConfig, compose=_cpsgd),
    AlgorithmSpec(name="adpsgd", config=ADPSGDConfig, compose=_adpsgd),
    AlgorithmSpec(name="diloco", config=DiLoCoConfig, compose=_diloco),
    AlgorithmSpec(name="slowmo", config=SlowMoConfig, compose=_slowmo),
    AlgorithmSpec(name="dpsgd", config=DPSGDConfig, compose=_dpsgd),
    AlgorithmSpec(name="easgd", config=EASGDConfig, compose=_easgd, full_data_per_replica=True),
    AlgorithmSpec(name="entropysgd", config=EntropySGDConfig, compose=_entropysgd, single_replica=True),
    AlgorithmSpec(name="parle", config=ParleConfig, compose=_parle, full_data_per_replica=True),
)

for _spec in BUILTIN:
    register(_spec)

#: The built-in algorithms' names (``commhooks.algorithm_names()`` adds the registered ones).
ALGORITHMS: tuple[str, ...] = tuple(spec.name for spec in BUILTIN)
