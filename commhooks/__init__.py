"""commhooks: communication-efficient data-parallel training as DDP communication hooks.

    algo = commhooks.build("parle", ddp_model, optimizer, replica_size=1, **hparams)
    loss.backward(); algo.step()      # or: opt = algo.as_optimizer(); ...; opt.step()

The algorithms and their exact update rules are written out in docs/README.md; the building blocks
(flat buffers, gradient hooks, step wrappers) are importable for your own compositions.
"""

from .algorithm import Algorithm, Component, Context
from .averaging import AdaptivePeriod, ConstantPeriod, GradientScope, PeriodicAveraging, synchronize_weights
from .build import SYNCHRONOUS, build, ddp_buffer_sync_kwargs, resolve_replica_size
from .comm import CommMeter, Topology, make_topology, replica_max_, replica_mean_, start_replica_mean
from .config import ALGORITHMS, config_class
from .consistency import check_same_across_ranks
from .elastic import ElasticPull, ReferenceAverage, scoped
from .entropy import ProximalInnerLoop
from .flat import FlatWeights
from .gossip import GossipMixing, gossip_peers, random_matching
from .grad_hooks import GradSyncState, allreduce_hook, compress_wrapper
from .guards import ExchangeGuard, NonFiniteError, StepMismatchError, min_steps, pull_stability_bound
from .noise import IsotropicNoise, step_seed
from .outer import OuterOptimizer
from .optimizer import AlgorithmOptimizer, guard_bare_steps

__all__ = [
    "ALGORITHMS", "SYNCHRONOUS", "Algorithm", "AlgorithmOptimizer", "AdaptivePeriod", "CommMeter", "Component", "ConstantPeriod", "Context",
    "ElasticPull", "ExchangeGuard", "FlatWeights", "GossipMixing", "GradSyncState", "GradientScope", "IsotropicNoise",
    "NonFiniteError", "OuterOptimizer", "PeriodicAveraging", "ProximalInnerLoop", "ReferenceAverage", "StepMismatchError", "Topology", "allreduce_hook", "build",
    "check_same_across_ranks", "compress_wrapper", "config_class", "ddp_buffer_sync_kwargs", "gossip_peers", "make_topology",
    "guard_bare_steps", "min_steps", "pull_stability_bound", "random_matching", "replica_max_", "replica_mean_", "resolve_replica_size", "scoped", "start_replica_mean", "step_seed",
    "synchronize_weights",
]
