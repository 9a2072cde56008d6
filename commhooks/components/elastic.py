"""Elastic-SGD: each replica's gradient pulled towards the replicas' average.

Chaudhari et al., "Parle: parallelizing stochastic gradient descent" (arXiv 1707.00424): Elastic-SGD is
eq. 7, scoping Section 2.4 / eq. 9. We use the *fresh* average of the replicas as the reference
(docs/elastic.md explains why: same communication, exact reductions — with one replica the pull is
exactly zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..base.config import hparam
from ..base.inplace import Scratch
from ..ops.averages import BufferAverage, ReferenceAverage, count_sync
from ..ops.component import Component, Context
from ..ops.pulls import CouplingConfig, pull_into_grads
from ..ops.schedules import ScopingConfig, scoped


@dataclass(frozen=True, kw_only=True)
class ElasticConfig(ScopingConfig, CouplingConfig):
    """The fields of :class:`ElasticPull`."""

    period: int = hparam(1, valid="an integer >= 1",
                         help="steps between two refreshes of the replicas' average (the scoping clock)", int_at_least=1)


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

    @classmethod
    def from_config(cls, ctx: Context, cfg: ElasticConfig) -> ElasticPull:
        return cls(ctx, rho=cfg.rho, rho_max=cfg.rho_max, period=cfg.period,
                   steps_per_epoch=cfg.steps_per_epoch, scoping=cfg.scoping)

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
            count_sync(self.ctx, local_squared=squares, step=k)
            self.buffer_average.start()

    def stats(self) -> dict[str, float]:
        return {"rho": self.coefficient(self.k)}

    def state_dict(self) -> dict[str, Any]:
        # Mid-period the reference cannot be recomputed from the current weights: save it.
        return {"reference": [b.clone() for b in self.reference.get()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.discard()
        with torch.no_grad():
            for buf, saved in zip(self.reference.buffers, state["reference"], strict=True):
                buf.copy_(saved)
        self.reference.started = True  # prepare() restarts it if a refresh is due
