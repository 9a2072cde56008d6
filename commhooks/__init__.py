"""commhooks: communication-efficient data-parallel training as DDP communication hooks.

    algo = commhooks.build("parle", ddp_model, optimizer, replica_size=1, **hparams)
    loss.backward(); algo.step()      # or: opt = algo.as_optimizer(); ...; opt.step()

The algorithms and their exact update rules are written out in docs/README.md; the building blocks
(flat buffers, gradient hooks, step wrappers) are importable for your own compositions, and
``register`` adds an algorithm of your own (docs/usage.md). The package is layered:
``base`` (primitives) <- ``ops`` (shared operations, schedules) <- ``components`` (step wrappers)
<- ``algorithm``, ``registry``, ``algorithms``, ``build``.
"""

from . import config
from .algorithm import Algorithm
from .algorithms import ALGORITHMS
from .base.comm import CommMeter, Topology, make_topology, replica_max_, replica_mean_, start_replica_mean
from .base.config import CommonConfig, ConfigBase, hparam
from .base.consistency import check_same_across_ranks, rank_min
from .base.flat import FlatWeights
from .base.grad_hooks import GradSyncState, allreduce_hook, compress_wrapper
from .base.guards import ExchangeGuard, NonFiniteError, StepMismatchError, min_steps, pull_stability_bound
from .base.rng import step_seed
from .build import SYNCHRONOUS, build, ddp_buffer_sync_kwargs, resolve_replica_size
from .components.elastic import ElasticConfig, ElasticPull
from .components.gossip import GossipConfig, GossipMixing, gossip_peers, random_matching
from .components.noise import IsotropicNoise, NoiseConfig
from .components.outer import OuterConfig, OuterOptimizer
from .components.periodic import OverlapConfig, PeriodicAveraging, PeriodicConfig
from .components.proximal import ProximalConfig, ProximalInnerLoop
from .components.scope import GradientScope
from .ops.averages import ReferenceAverage, synchronize_weights
from .ops.component import Component, Context
from .ops.probe import ConsensusLogConfig
from .ops.pulls import CouplingConfig
from .ops.schedules import AdaptivePeriod, AdaptivePeriodConfig, ConstantPeriod, ConstantPeriodConfig, Schedule, ScopingConfig, scoped
from .optimizer import AlgorithmOptimizer, guard_bare_steps
from .registry import AlgorithmSpec, algorithm_names, algorithm_spec, config_class, register, unregister

__all__ = [
    "ALGORITHMS", "SYNCHRONOUS", "config", "AdaptivePeriod", "Algorithm", "AlgorithmOptimizer", "AlgorithmSpec", "CommMeter",
    "CommonConfig", "Component", "ConfigBase", "ConstantPeriod", "Context", "ElasticPull", "ExchangeGuard", "FlatWeights",
    "GossipMixing", "GradSyncState", "GradientScope", "IsotropicNoise", "NonFiniteError", "OuterOptimizer", "PeriodicAveraging",
    "ProximalInnerLoop", "ReferenceAverage", "StepMismatchError", "Topology", "algorithm_names", "algorithm_spec",
    "allreduce_hook", "build", "check_same_across_ranks", "compress_wrapper", "config_class", "ddp_buffer_sync_kwargs",
    "gossip_peers", "guard_bare_steps", "hparam", "make_topology", "min_steps", "pull_stability_bound", "random_matching",
    "rank_min", "register", "replica_max_", "replica_mean_", "resolve_replica_size", "scoped", "start_replica_mean",
    "step_seed", "synchronize_weights", "unregister",
    # the components' and schedules' configs, to compose an algorithm's config from
    "AdaptivePeriodConfig", "ConsensusLogConfig", "ConstantPeriodConfig", "CouplingConfig", "ElasticConfig", "GossipConfig",
    "NoiseConfig", "OuterConfig", "OverlapConfig", "PeriodicConfig", "ProximalConfig", "Schedule", "ScopingConfig",
]
