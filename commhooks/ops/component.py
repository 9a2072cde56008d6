"""The component contract: what every step wrapper works on (:class:`Context`) and its phases.

One call of ``Algorithm.step`` (``commhooks/algorithm.py``) runs the phases of every component
in order::

    backward_started(k)     # once per backward, at DDP's first gradient bucket
    before_optimizer(k)     # after backward: mix weights, add pulls to gradients
    optimizer.step()        # the user's OptStep
    after_optimizer(k)      # average, add noise, outer steps
    k += 1
    prepare(k)              # set up step k's backward (groups, prefetch)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base.comm import CommMeter, Topology
from ..base.flat import FlatWeights
from ..base.grad_hooks import GradSyncState
from ..base.guards import ExchangeGuard


@dataclass(kw_only=True)
class Context:
    """What every component works on: weights, topology, meter, gradient hook state, optimizer.

    ``guard`` checks, before each weight exchange, that every rank is at the same step (and,
    opt-in, that no weights are non-finite); components call ``guard.before_exchange``.
    ``average_formed`` is how a synchronising component announces the replicas' mean it formed
    (per flat group, the parameter tensors, and the lr of the synchronisation step) before the
    mean is applied: ``commhooks.Algorithm``, its only writer, dispatches it to every component's
    ``average_formed`` phase, where an outer optimizer replaces the mean in place.
    """

    weights: FlatWeights
    topo: Topology
    meter: CommMeter
    grad_state: GradSyncState
    optimizer: torch.optim.Optimizer
    guard: ExchangeGuard = field(default_factory=ExchangeGuard)
    average_formed: Callable[[list[torch.Tensor], float], None] = field(default=lambda means, lr: None)

    @property
    def lr(self) -> float:
        """The optimizer's current learning rate (first param group), read when used."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def momentum(self) -> float:
        return float(self.optimizer.param_groups[0].get("momentum", 0.0) or 0.0)


class Component:
    """A step wrapper. Subclasses override what they need; every method defaults to nothing."""

    def prepare(self, k: int) -> None:
        """Called before step ``k``'s forward/backward (at build, after each step, after load)."""

    def backward_started(self, k: int) -> None:
        """Called once in step ``k``'s backward, when DDP hands over the first gradient bucket.

        The weights no longer change until the optimizer step, so an exchange of weights can
        start here and overlap the rest of the backward pass (DPSGD's gossip).
        """

    def before_optimizer(self, k: int) -> None:
        """Called in step ``k`` after backward, before the user's optimizer step."""

    def average_formed(self, means: list[torch.Tensor], lr: float) -> None:
        """Called when a periodic synchronisation has formed the replicas' mean (``means``: the
        parameters of each flat group; ``lr``: the synchronisation step's), before it is applied.
        May replace ``means`` in place (an outer optimizer's step)."""

    def after_optimizer(self, k: int) -> None:
        """Called in step ``k`` right after the user's optimizer step."""

    def consensus_params(self) -> list[torch.Tensor] | None:
        """Per-group parameter values whose replica average is "the model" (default: the weights)."""
        return None

    def stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
