"""Elastic coupling to a reference: the scoping schedule, the reference average, Elastic-SGD.

Chaudhari et al., "Parle: parallelizing stochastic gradient descent" (arXiv 1707.00424): Elastic-SGD is
eq. 7, scoping Section 2.4 / eq. 9. We use the *fresh* average of the replicas as the reference
(docs/elastic.md explains why: same communication, exact reductions — with one replica the pull is
exactly zero).
"""

from __future__ import annotations

from typing import Any

import torch

from .algorithm import Component, Context
from .averaging import record_distance, squared_norm
from .comm import PendingMean, replica_max_, replica_mean_, start_replica_mean


def scoped(coef: float, coef_max: float, steps_per_epoch: int | None, clock: int, scoping: bool) -> float:
    """``min(coef_max, coef * (1 - 1/(2B)) ** (-clock))`` (Parle, eq. 9), or ``coef`` unscoped.

    The paper anneals the inverse of our coefficient; ours therefore grows, clipped at ``coef_max``.
    """
    if not scoping:
        return coef
    assert steps_per_epoch is not None and steps_per_epoch >= 1
    q = 1.0 - 1.0 / (2.0 * steps_per_epoch)
    return min(coef_max, coef * q ** (-clock))


class ReferenceAverage:
    """``x~ = mean_a(source_a)`` computed asynchronously into persistent buffers.

    The all-reduce runs on the topology's dedicated weight group so it overlaps computation and
    never queues behind the gradient all-reduce.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.buffers = [torch.empty_like(s) for s in ctx.weights.param_segments()]
        self._pending: PendingMean | None = None
        self.started = False

    def start(self, sources: list[torch.Tensor]) -> None:
        self.discard()
        with torch.no_grad():
            for buf, src in zip(self.buffers, sources):
                buf.copy_(src)
        topo = self.ctx.topo
        self._pending = start_replica_mean(self.buffers, topo, self.ctx.meter, group=topo.weight_group)
        self.started = True

    def get(self) -> list[torch.Tensor]:
        """Wait for the average (if still in flight) and return it."""
        assert self.started, "reference used before it was started"
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        return self.buffers

    def discard(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        self.started = False


def average_buffers(ctx: Context) -> None:
    """Average floating buffers and max-reduce integer ones (blocking; small: BatchNorm stats)."""
    with torch.no_grad():
        replica_mean_(ctx.weights.buffer_segments(), ctx.topo, ctx.meter)
        replica_max_(ctx.weights.max_segments(), ctx.topo, ctx.meter)


def add_to_grads(ctx: Context, deltas: list[torch.Tensor], alpha: float) -> None:
    """``p.grad += alpha * delta`` for every parameter, ``delta`` given per flat group."""
    for group, delta in zip(ctx.weights.groups, deltas):
        for p, d in zip(group.params, group.split_params(delta)):
            if p.grad is None:
                p.grad = d.mul(alpha)
            else:
                p.grad.add_(d, alpha=alpha)


class ElasticPull(Component):
    """Elastic-SGD (Parle, arXiv 1707.00424, eq. 7): ``g_a = grad + rho_k (x_a - x~)``, ``x~`` refreshed every ``period``.

    Args:
        ctx: the shared context.
        rho, rho_max: the coupling coefficient and its cap.
        period: refresh the reference at steps ``k % period == 0``.
        steps_per_epoch: ``B`` of the scoping schedule; ``rho_k`` uses ``clock = k // period``.
        scoping: anneal ``rho`` (True) or keep it constant.
    """

    def __init__(
        self, ctx: Context, *, rho: float, rho_max: float, period: int,
        steps_per_epoch: int | None, scoping: bool,
    ) -> None:
        self.ctx, self.rho, self.rho_max, self.period = ctx, rho, rho_max, period
        self.steps_per_epoch, self.scoping = steps_per_epoch, scoping
        self.reference = ReferenceAverage(ctx)
        self.k = 0

    def coefficient(self, k: int) -> float:
        return scoped(self.rho, self.rho_max, self.steps_per_epoch, k // self.period, self.scoping)

    def prepare(self, k: int) -> None:
        self.k = k
        if k % self.period == 0:
            # The weights as they stand at the start of step k; they stay put through its
            # forward and backward, so the all-reduce runs concurrently with them.
            self.reference.start(self.ctx.weights.param_segments())

    def before_optimizer(self, k: int) -> None:
        if k % self.period == 0:
            self.ctx.guard.before_exchange("Elastic-SGD reference average", k)
        ref = self.reference.get()
        with torch.no_grad():
            deltas = [x - r for x, r in zip(self.ctx.weights.param_segments(), ref)]
        if k % self.period == 0 and self.ctx.topo.num_replicas > 1:
            self.ctx.meter.syncs += 1
            record_distance(self.ctx, squared_norm(deltas))
            average_buffers(self.ctx)
        with torch.no_grad():
            add_to_grads(self.ctx, deltas, self.coefficient(k))

    def stats(self) -> dict[str, float]:
        return {"rho": self.coefficient(self.k)}

    def state_dict(self) -> dict[str, Any]:
        # Mid-period the reference cannot be recomputed from the current weights: save it.
        return {"reference": [b.clone() for b in self.reference.get()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.discard()
        with torch.no_grad():
            for buf, saved in zip(self.reference.buffers, state["reference"]):
                buf.copy_(saved)
        self.reference.started = True  # prepare() restarts it if a refresh is due
