"""The consensus probe: ``mean_a ||x̄ - x_a||^2`` estimated from a few thousand coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.comm import replica_mean_, start_distance_mean
from ..base.config import ConfigBase, hparam
from ..base.flat import FlatWeights
from ..base.rng import step_generator
from .component import Context


@dataclass(frozen=True, kw_only=True)
class ConsensusLogConfig(ConfigBase):
    """How often a component without an exact distance estimates it (:class:`ConsensusProbe`)."""

    log_every: int = hparam(0, valid="an integer >= 0",
                            help="estimate the consensus distance every this many steps, from a few "
                                 "kilobytes (measure_bytes); 0 = never (NaN)", int_at_least=0)


#: The random stream the consensus probe draws its coordinates from (any fixed value: the
#: sample must only be the same on every rank, and differ between steps).
_PROBE_STREAM = 0x636F6E73


class ConsensusProbe:
    """An estimate of ``mean_a ||x̄ - x_a||^2`` from a random sample of coordinates.

    Every rank draws the same ``m = sample_size`` coordinates of each flat parameter group from
    ``(stream, step)``, so only kilobytes travel instead of a model. The draw is stratified: the
    group's ``N`` coordinates are cut into ``m`` equal stretches and one coordinate is drawn
    uniformly in each, so every layer is sampled in proportion to its size and every coordinate
    has the same chance ``m / N``. ``(N / m) * sum over the sample of (x̄_i - x_a,i)^2`` is then an
    unbiased estimate of the group's ``||x̄ - x_a||^2``; its relative error is at most about
    ``sqrt(2 / m)`` when the differences are spread evenly (2% at ``m = 4096``), more when a few
    coordinates dominate (measured on LeNet's gossiping replicas: 7% rms). A group of at most ``m`` parameters is taken whole, so the figure is
    exact for small models. Every buffer is allocated here, once: at most 44 bytes per sampled
    coordinate (180 KB per group at ``m = 4096``).

    Args:
        weights: the flat weights to sample.
        sample_size: coordinates per flat group.
    """

    def __init__(self, weights: FlatWeights, sample_size: int = 4096) -> None:
        self.weights = weights
        self.sizes = [g.param_numel for g in weights.groups]
        self.counts = [min(n, sample_size) for n in self.sizes]
        self._index = [
            torch.empty(m, dtype=torch.int64) if m < n else None for n, m in zip(self.sizes, self.counts, strict=True)
        ]
        self._index_on_device = [
            None if idx is None or g.flat.device.type == "cpu" else torch.empty(m, dtype=torch.int64, device=g.flat.device)
            for idx, m, g in zip(self._index, self.counts, weights.groups, strict=True)
        ]
        self._picked = [
            None if idx is None else torch.empty(m, dtype=g.flat.dtype, device=g.flat.device)
            for idx, m, g in zip(self._index, self.counts, weights.groups, strict=True)
        ]
        self.local = [torch.empty(m, dtype=torch.float64, device=g.flat.device) for m, g in zip(self.counts, weights.groups, strict=True)]
        self.mean = [torch.empty_like(t) for t in self.local]
        self._strata = [None if idx is None else torch.arange(m, dtype=torch.float64) for idx, m in zip(self._index, self.counts, strict=True)]
        self._position = [None if idx is None else torch.empty(m, dtype=torch.float64) for idx, m in zip(self._index, self.counts, strict=True)]

    def draw(self, step: int) -> None:
        """Draw step ``step``'s coordinates (the same on every rank): one in each of ``m`` stretches."""
        gen = step_generator(_PROBE_STREAM, step)
        for n, m, idx, on_device, strata, position in zip(
            self.sizes, self.counts, self._index, self._index_on_device, self._strata, self._position, strict=True
        ):
            if idx is None:
                continue
            torch.rand(m, generator=gen, dtype=torch.float64, out=position)
            position.add_(strata).mul_(n / m).floor_()  # floor((j + u_j) * N / m), stretch j
            idx.copy_(position).clamp_(max=n - 1)  # (rounding at the top end)
            if on_device is not None:
                on_device.copy_(idx)

    def gather(self, into: list[torch.Tensor]) -> None:
        """Copy the sampled parameters, as they stand now, into ``into`` (``local`` or ``mean``)."""
        with torch.no_grad():
            for seg, idx, on_device, picked, out in zip(
                self.weights.param_segments(), self._index, self._index_on_device, self._picked, into, strict=True
            ):
                if idx is None:
                    out.copy_(seg)
                else:
                    assert picked is not None  # allocated with every sampled group's index
                    torch.index_select(seg, 0, idx if on_device is None else on_device, out=picked)
                    out.copy_(picked)

    def local_squared(self) -> torch.Tensor:
        """This rank's estimate of ``||x̄ - x_a||^2`` from ``mean`` and ``local`` (float64, 0-dim).

        Consumes ``mean`` (it becomes the difference).
        """
        total = torch.zeros((), dtype=torch.float64, device=self.local[0].device)
        for n, m, local, mean in zip(self.sizes, self.counts, self.local, self.mean, strict=True):
            if m:
                diff = mean.sub_(local)
                total.add_(torch.dot(diff, diff), alpha=n / m)
        return total

    def measure(self, ctx: Context, step: int) -> None:
        """Measure now: draw, gather, average the sample over replicas, record the estimate.

        Collective. Two small collectives, both counted in ``measure_bytes``: the sample's mean
        (blocking) and the scalar mean of the per-rank estimates (finished when read).
        """
        if ctx.topo.num_replicas == 1:
            ctx.meter.record_distance(0.0, step)
            return
        self.draw(step)
        self.gather(self.local)
        for mean, local in zip(self.mean, self.local, strict=True):
            mean.copy_(local)
        replica_mean_(self.mean, ctx.topo, ctx.meter, measurement=True)
        start_distance_mean(self.local_squared(), step, ctx.topo, ctx.meter)
