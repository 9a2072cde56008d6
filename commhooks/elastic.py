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
from .comm import PendingMean, start_distance_mean, start_replica_max, start_replica_mean
from .inplace import Scratch, add_scaled_difference_


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


class BufferAverage:
    """Average floating buffers and max-reduce integer ones (BatchNorm statistics), asynchronously.

    :meth:`start` launches both on the weight group and returns at once; :meth:`finish` waits.
    Start it once the forward pass that updates the statistics is over and finish it before the
    next forward reads them: the optimizer step runs in between, and the (small) traffic hides.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._mean: PendingMean | None = None
        self._max: list = []

    def start(self) -> None:
        self.finish()
        ctx = self.ctx
        group = ctx.topo.weight_group
        with torch.no_grad():
            self._mean = start_replica_mean(ctx.weights.buffer_segments(), ctx.topo, ctx.meter, group=group)
            self._max = start_replica_max(ctx.weights.max_segments(), ctx.topo, ctx.meter, group=group)

    def finish(self) -> None:
        if self._mean is not None:
            self._mean.wait()
            self._mean = None
        if self._max:
            self.ctx.meter.wait(self._max)
            self._max = []


def pull_into_grads(
    ctx: Context, points: list[torch.Tensor], centres: list[torch.Tensor], coef: float,
    scratch: Scratch, squares: torch.Tensor | None = None,
) -> None:
    """``p.grad += coef * (point - centre)`` for every parameter, without temporaries.

    Bit-identical to ``p.grad.add_(point - centre, alpha=coef)``. With ``squares``, also
    ``squares += ||point - centre||^2`` over all parameters, from the same chunks.

    Args:
        ctx: the shared context (its weights' groups give the parameters).
        points, centres: one parameter-prefix-shaped tensor per flat group each.
        coef: the coupling coefficient.
        scratch: the chunk buffers.
        squares: a float64 0-dim accumulator, or None.
    """
    with torch.no_grad():
        for group, point, centre in zip(ctx.weights.groups, points, centres):
            for p, a, b in zip(group.params, group.split_params(point), group.split_params(centre)):
                if p.grad is None:  # an unused parameter: its gradient is the pull alone
                    p.grad = torch.zeros_like(p)
                add_scaled_difference_(p.grad, a, b, coef, scratch.for_tensor(a), squares)


class ElasticPull(Component):
    """Elastic-SGD (Parle, arXiv 1707.00424, eq. 7): ``g_a = grad + rho_k (x_a - x~)``.

    The reference ``x~`` is refreshed every ``period`` steps. Its all-reduce starts when step
    ``k`` begins and runs during that step's forward and backward passes. The pull is added to
    the gradients chunk by chunk (no model-size temporary), and the consensus distance
    ``mean_a ||x~ - x_a||^2`` of a refresh step comes from the same chunks, averaged by a scalar
    all-reduce that no step waits for (``measure_bytes``). At a refresh, floating buffers are
    averaged while the optimizer steps and land before the next forward.

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
        self.buffer_average = BufferAverage(ctx)
        self.scratch = Scratch(ctx.weights)
        self.k = 0

    def coefficient(self, k: int) -> float:
        return scoped(self.rho, self.rho_max, self.steps_per_epoch, k // self.period, self.scoping)

    def prepare(self, k: int) -> None:
        self.k = k
        self.buffer_average.finish()  # the statistics must be in place before this forward
        if k % self.period == 0:
            # The weights as they stand at the start of step k; they stay put through its
            # forward and backward, so the all-reduce runs concurrently with them.
            self.reference.start(self.ctx.weights.param_segments())

    def before_optimizer(self, k: int) -> None:
        if k % self.period == 0:
            self.ctx.guard.before_exchange("Elastic-SGD reference average", k)
        ref = self.reference.get()
        refresh = k % self.period == 0 and self.ctx.topo.num_replicas > 1
        squares = torch.zeros((), dtype=torch.float64, device=self.ctx.weights.device) if refresh else None
        pull_into_grads(self.ctx, self.ctx.weights.param_segments(), ref, self.coefficient(k), self.scratch, squares)
        if refresh:
            self.ctx.meter.syncs += 1
            start_distance_mean(squares, k, self.ctx.topo, self.ctx.meter)
            self.buffer_average.start()

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
