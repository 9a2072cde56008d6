"""Replica topology, process groups and the flat-buffer collectives every algorithm shares.

Ranks are grouped into ``n = W / m`` replicas of ``m`` consecutive ranks (docs/README.md,
"Notation"). Ranks of one replica hold identical weights, so the mean over *all* ``W`` ranks of a
weight tensor equals the mean over replicas: weight averaging always uses the global group and
needs no cross-replica groups.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp


@dataclass
class _PendingDistance:
    """A consensus-distance scalar all-reduce in flight (finished when the figure is read)."""

    total: torch.Tensor
    work: Any
    divisor: int
    step: int


@dataclass(kw_only=True)
class CommMeter:
    """The communication figures every algorithm reports through ``stats()``.

    Args:
        comm_bytes: bytes this rank handed to the algorithm's collectives or sends, cumulative.
            Measurement traffic (a consensus distance nobody's rule needs) is not in it.
        syncs: weight synchronisation rounds, cumulative.
        comm_seconds: wall seconds this rank spent blocked on the algorithm's communication.
        measure_bytes: bytes of measurement traffic (consensus-distance estimates), cumulative.

    ``consensus_distance`` is ``mean_a ||x̄ - x_a||^2`` at ``consensus_step`` (the step counter
    when it was measured): the last measured value, or NaN before the first measurement. A
    measurement may still be in flight; reading the figure waits for it (a local wait on a
    collective every rank has already started, so any single rank may read it).
    """

    comm_bytes: int = 0
    syncs: int = 0
    comm_seconds: float = 0.0
    measure_bytes: int = 0
    _distance: float = field(default=math.nan, repr=False)
    _distance_step: float = field(default=math.nan, repr=False)
    _pending: _PendingDistance | None = field(default=None, repr=False)

    def count(self, tensors: list[torch.Tensor], *, measurement: bool = False) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if measurement:
            self.measure_bytes += nbytes
        else:
            self.comm_bytes += nbytes

    def wait(self, works: list) -> None:
        """Wait for async works, charging the blocked time to ``comm_seconds``."""
        start = time.perf_counter()
        for work in works:
            work.wait()
        self.comm_seconds += time.perf_counter() - start

    def record_distance(self, value: float, step: float) -> None:
        self._finish_distance()
        self._distance, self._distance_step = float(value), float(step)

    def expect_distance(self, pending: _PendingDistance) -> None:
        self._finish_distance()
        self._pending = pending

    def _finish_distance(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.work.wait()
            self._distance = float(pending.total.item()) / pending.divisor
            self._distance_step = float(pending.step)

    @property
    def consensus_distance(self) -> float:
        self._finish_distance()
        return self._distance

    @property
    def consensus_step(self) -> float:
        self._finish_distance()
        return self._distance_step

    def as_dict(self) -> dict[str, float]:
        return {
            "comm_bytes": float(self.comm_bytes),
            "syncs": float(self.syncs),
            "comm_seconds": self.comm_seconds,
            "measure_bytes": float(self.measure_bytes),
            "consensus_distance": self.consensus_distance,
            "consensus_step": self.consensus_step,
        }

    def load_dict(self, saved: dict[str, float]) -> None:
        """Restore :meth:`as_dict` (figures saved before ``measure_bytes`` existed load as 0/NaN)."""
        self._pending = None
        self.comm_bytes = int(saved["comm_bytes"])
        self.syncs = int(saved["syncs"])
        self.comm_seconds = float(saved["comm_seconds"])
        self.measure_bytes = int(saved.get("measure_bytes", 0))
        self._distance = float(saved.get("consensus_distance", math.nan))
        self._distance_step = float(saved.get("consensus_step", math.nan))


@dataclass(kw_only=True)
class Topology:
    """Where this rank sits among replicas, and the process groups it communicates over.

    Args:
        world_size: ``W``.
        rank: this rank's global rank.
        replica_size: ``m``, ranks per replica.
        replica_group: the ranks of this replica, or ``None`` when ``m == 1`` (no exchange).
        weight_group: a dedicated group over all ranks for asynchronous weight traffic
            (gossip, reference averages), so it never queues behind the gradient all-reduce.
        guard_group: a gloo group over all ranks for the step tag that goes with every weight
            exchange (``commhooks.guards``): CPU only, so the check never waits for a device.
    """

    world_size: int
    rank: int
    replica_size: int
    replica_group: ProcessGroup | None
    weight_group: ProcessGroup | None
    guard_group: ProcessGroup | None = None

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.replica_size

    @property
    def replica_index(self) -> int:
        return self.rank // self.replica_size

    @property
    def local_index(self) -> int:
        return self.rank % self.replica_size

    def rank_of(self, replica: int) -> int:
        """The rank of replica ``replica`` that holds the same position as this rank."""
        return replica * self.replica_size + self.local_index


def make_topology(replica_size: int, timeout: timedelta | None = None) -> Topology:
    """Create the replica groups collectively (every rank must call this, in the same order).

    Args:
        replica_size: ranks per replica; must divide the world size.
        timeout: collective timeout of the groups created here (default: the default group's).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "commhooks needs an initialized default process group "
            "(torch.distributed.init_process_group, or launch.runtime.init_distributed)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(replica_size, int) or replica_size < 1:
        raise ValueError(f"replica_size must be a positive integer, got {replica_size!r}")
    if world % replica_size != 0:
        raise ValueError(
            f"replica_size={replica_size} must divide the world size {world} "
            "(replicas are groups of replica_size consecutive ranks)"
        )
    replica_group: ProcessGroup | None
    if replica_size == 1:
        replica_group = None
    elif replica_size == world:
        replica_group = dist.group.WORLD
    else:
        replica_group, _ = dist.new_subgroups(group_size=replica_size, timeout=timeout)
    weight_group = _whole_world_group(world, timeout) if world > 1 else None
    guard_group = _whole_world_group(world, timeout, backend="gloo") if world > 1 else None
    return Topology(world_size=world, rank=rank, replica_size=replica_size, replica_group=replica_group,
                    weight_group=weight_group, guard_group=guard_group)


def _whole_world_group(world: int, timeout: timedelta | None, backend: str | None = None) -> ProcessGroup:
    """A new group of every rank (collective: every rank creates it, in the same order)."""
    group = dist.new_group(ranks=list(range(world)), timeout=timeout, backend=backend)
    assert isinstance(group, ProcessGroup), "every rank is a member of a whole-world group"
    return group


class PendingMean:
    """A mean over replicas that was started asynchronously; :meth:`wait` finishes it in place."""

    def __init__(self, tensors: list[torch.Tensor], works: list | None, divisor: int, meter: CommMeter):
        self.tensors, self._works, self._divisor, self._meter = tensors, works, divisor, meter

    def wait(self) -> list[torch.Tensor]:
        if self._works is not None:
            self._meter.wait(self._works)
            if self._divisor != 1:
                for t in self.tensors:
                    t.div_(self._divisor)
            self._works = None
        return self.tensors


def start_replica_mean(
    tensors: list[torch.Tensor], topo: Topology, meter: CommMeter, group: ProcessGroup | None = None,
    *, measurement: bool = False,
) -> PendingMean:
    """Start ``t = mean over replicas of t`` in place for each tensor (async, one collective each).

    With a single replica this is the identity and communicates nothing, so the mean is exact.
    ``measurement=True`` charges the bytes to ``measure_bytes`` instead of ``comm_bytes``.
    """
    if topo.num_replicas == 1 or not tensors:
        return PendingMean(tensors, None, 1, meter)
    meter.count(tensors, measurement=measurement)
    # NCCL averages inside the collective; gloo has no AVG, so we divide after the sum. A mixed
    # "cpu:gloo,cuda:nccl" group sends CUDA tensors to NCCL.
    native_avg = all(t.is_cuda for t in tensors) and "nccl" in str(dist.get_backend(group))
    op = ReduceOp.AVG if native_avg else ReduceOp.SUM
    works = [dist.all_reduce(t, op=op, group=group, async_op=True) for t in tensors]
    return PendingMean(tensors, works, 1 if native_avg else topo.world_size, meter)


def replica_mean_(
    tensors: list[torch.Tensor], topo: Topology, meter: CommMeter, *, measurement: bool = False
) -> None:
    """``t = mean over replicas of t`` in place, blocking."""
    start_replica_mean(tensors, topo, meter, measurement=measurement).wait()


def start_replica_max(
    tensors: list[torch.Tensor], topo: Topology, meter: CommMeter, group: ProcessGroup | None = None
) -> list:
    """Start ``t = max over replicas of t`` in place (integer buffers); returns the works."""
    if topo.num_replicas == 1 or not tensors:
        return []
    meter.count(tensors)
    return [dist.all_reduce(t, op=ReduceOp.MAX, group=group, async_op=True) for t in tensors]


def replica_max_(tensors: list[torch.Tensor], topo: Topology, meter: CommMeter) -> None:
    """``t = max over replicas of t`` in place, blocking (integer buffers)."""
    meter.wait(start_replica_max(tensors, topo, meter))


def replica_mean_scalar(value: float, topo: Topology, meter: CommMeter, device: torch.device) -> float:
    """The mean over replicas of a per-rank float (one scalar all-reduce)."""
    if topo.num_replicas == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    replica_mean_([t], topo, meter)
    return float(t.item())


def start_distance_mean(local_squared: torch.Tensor | float, step: int, topo: Topology, meter: CommMeter) -> None:
    """Start ``consensus_distance = mean over replicas of local_squared`` as a measurement.

    One float64 scalar all-reduce on the weight group, asynchronous: the meter finishes it when
    the figure is read or the next one is recorded, so no step waits for it. Its bytes go to
    ``measure_bytes``.

    Args:
        local_squared: this rank's ``||x̄ - x_a||^2`` (or an estimate of it).
        step: the step counter the figure belongs to (reported as ``consensus_step``).
    """
    if topo.num_replicas == 1:
        meter.record_distance(float(local_squared), step)
        return
    total = torch.as_tensor(local_squared, dtype=torch.float64).reshape(1).clone()
    meter.count([total], measurement=True)
    work = dist.all_reduce(total, group=topo.weight_group, async_op=True)
    meter.expect_distance(_PendingDistance(total=total, work=work, divisor=topo.world_size, step=step))
