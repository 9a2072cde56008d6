"""Decentralized parallel SGD by gossip with random neighbours (DPSGD; Zhang et al., OpenReview fStMpzKkjMT, eq. 2).

Step ``k`` of replica ``a``: the gradient ``g_a`` is taken at the replica's own weights ``x_a``,
the weights are mixed with a doubly stochastic ``M(k)``, and the step is applied to the mixed
weights: ``x_a = OptStep(sum_b M_ab(k) x_b, g_a)``. The weights do not change during backward, so
the exchange starts from the DDP comm hook at the first gradient bucket and finishes in
``step()``, overlapping the rest of the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from ..base.comm import PendingMean, start_replica_mean
from ..base.config import check, hparam, is_int, literal_values
from ..base.rng import step_generator
from ..ops.averages import count_sync
from ..ops.component import Component, Context
from ..ops.probe import ConsensusLogConfig, ConsensusProbe

GossipTopology = Literal["random-pair", "ring", "all"]
TOPOLOGIES: tuple[str, ...] = literal_values(GossipTopology)


@dataclass(frozen=True, kw_only=True)
class GossipConfig(ConsensusLogConfig):
    """The fields of :class:`GossipMixing`."""

    topology: GossipTopology = hparam(
        "random-pair", choices=TOPOLOGIES, valid='"random-pair", "ring" or "all"',
        help="neighbours: random-pair = a fresh random pairing each step, ring = both ring "
             "neighbours, all = every replica (the exact mean)")
    seed: int = hparam(0, valid="an integer", help="seed of the random pairing (every rank draws the same one)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.topology in TOPOLOGIES, "topology", f"one of {TOPOLOGIES}", self.topology)
        check(is_int(self.seed), "seed", "an integer", self.seed)


def random_matching(num_replicas: int, seed: int, k: int) -> list[int | None]:
    """A uniformly random perfect matching of replicas, a pure function of ``(seed, k)``.

    Returns the partner of each replica; with an odd count one replica gets ``None`` (sits out).
    """
    perm = torch.randperm(num_replicas, generator=step_generator(seed, k)).tolist()
    partner: list[int | None] = [None] * num_replicas
    for i in range(0, num_replicas - 1, 2):
        a, b = perm[i], perm[i + 1]
        partner[a], partner[b] = b, a
    return partner


def gossip_peers(topology: str, num_replicas: int, replica: int, seed: int, k: int) -> list[int]:
    """The replicas whose weights ``replica`` averages with at step ``k`` (``all`` excluded)."""
    if num_replicas == 1:
        return []
    if topology == "random-pair":
        partner = random_matching(num_replicas, seed, k)[replica]
        return [] if partner is None else [partner]
    if topology == "ring":
        if num_replicas == 2:  # left and right neighbour coincide: the pair average
            return [1 - replica]
        return [(replica - 1) % num_replicas, (replica + 1) % num_replicas]
    raise ValueError(f"topology must be 'random-pair' or 'ring' here, got {topology!r}")


def inbox_count(topology: str, num_replicas: int) -> int:
    """Receive buffers the exchange needs: one per distinct peer (``all``: one for the mean)."""
    if num_replicas == 1:
        return 0
    if topology == "ring" and num_replicas >= 3:
        return 2
    return 1


class GossipMixing(Component):
    """Mix the weights with neighbours before the optimizer step; exchange overlaps backward.

    The consensus distance is measured only every ``log_every`` steps, by a
    :class:`~commhooks.ops.probe.ConsensusProbe`: an estimate from a few thousand sampled
    coordinates (exact for a model no larger than the sample), kilobytes of traffic counted in
    ``measure_bytes``, never in ``comm_bytes``. In between, ``stats()`` reports the last measured
    value with its ``consensus_step``; with ``log_every=0`` it is NaN (not measured), never a 0.0
    that would read as perfect agreement.

    Args:
        ctx: the shared context.
        topology: ``random-pair``, ``ring`` or ``all``.
        seed: the matching's seed (``random-pair``).
        log_every: estimate the consensus distance every that many steps; 0 never.
        overlap_backward: start the exchange when backward starts (``backward_started``), so it
            overlaps the rest of the backward pass; False starts it in ``step()`` and waits at
            once (the blocking exchange, for comparison).
    """

    def __init__(self, ctx: Context, topology: str, seed: int, log_every: int, *, overlap_backward: bool = True) -> None:
        self.ctx, self.topology, self.seed, self.log_every = ctx, topology, seed, log_every
        self.overlap_backward = overlap_backward
        self.k = 0
        topo = ctx.topo
        segments = ctx.weights.comm_segments()
        # Persistent receive buffers: allocated once, reused every step, exactly as many as
        # the topology receives into.
        self._inbox = [[torch.empty_like(s) for s in segments] for _ in range(inbox_count(topology, topo.num_replicas))]
        self._works: list | None = None
        self._peers: list[int] = []
        self._mean: PendingMean | None = None
        self._probe = ConsensusProbe(ctx.weights) if log_every and topo.num_replicas > 1 else None
        if topo.num_replicas > 1 and topology != "all" and "nccl" in str(dist.get_backend(topo.weight_group)):
            # NCCL wants every rank of a group in its first call; a random-pair exchange with an
            # odd replica count leaves one out. One tiny collective at build settles that.
            dist.all_reduce(torch.zeros(1, device=ctx.weights.device), group=topo.weight_group)

    @classmethod
    def from_config(cls, ctx: Context, cfg: GossipConfig) -> GossipMixing:
        return cls(ctx, cfg.topology, cfg.seed, cfg.log_every)

    @property
    def peers(self) -> tuple[int, ...]:
        """The replicas this one exchanged weights with in the latest step (``all``: none listed)."""
        return tuple(self._peers)

    def prepare(self, k: int) -> None:
        self.k = k

    def backward_started(self, k: int) -> None:
        if self.overlap_backward:
            self.start_exchange()

    def start_exchange(self) -> None:
        """Post the receives from step ``k``'s peers, then send this replica's weights to them.

        Receives first: on gloo a send posted before the peer's matching receive serialises the
        two directions of a pairwise exchange (measured on a shaped link: 47-53% of the bandwidth
        bound, 88-95% with the receives first). On NCCL ``batch_isend_irecv`` groups them, and
        the order does not matter.
        """
        if self._works is not None:
            return
        self.ctx.guard.before_exchange("gossip exchange", self.k)
        topo, meter = self.ctx.topo, self.ctx.meter
        segments = self.ctx.weights.comm_segments()
        self._works = []
        if self.topology == "all":
            for box, seg in zip(self._inbox[0], segments, strict=True):
                box.copy_(seg)  # the weights must not change while backward still reads them
            self._mean = start_replica_mean(self._inbox[0], topo, meter, group=topo.weight_group)
            return
        self._peers = gossip_peers(self.topology, topo.num_replicas, topo.replica_index, self.seed, self.k)
        group = topo.weight_group
        ops = [
            dist.P2POp(dist.irecv, box, topo.rank_of(peer), group)
            # zip stops at the peers: an odd random pairing leaves a replica without one this step.
            for peer, boxes in zip(self._peers, self._inbox, strict=False) for box in boxes
        ]
        for peer in self._peers:
            ops += [dist.P2POp(dist.isend, seg, topo.rank_of(peer), group) for seg in segments]
            meter.count(segments)
        if ops:
            self._works = dist.batch_isend_irecv(ops)

    def before_optimizer(self, k: int) -> None:
        self.start_exchange()  # no-op if the hook already started it during backward
        meter = self.ctx.meter
        with torch.no_grad():
            if self.topology == "all":
                assert self._mean is not None
                for seg, mean in zip(self.ctx.weights.comm_segments(), self._mean.wait(), strict=True):
                    seg.copy_(mean)
            else:
                meter.wait(self._works or [])
                if self._peers:
                    for i, seg in enumerate(self.ctx.weights.comm_segments()):
                        for boxes in self._inbox[: len(self._peers)]:
                            seg.add_(boxes[i])
                        seg.div_(1 + len(self._peers))
        if self.ctx.topo.num_replicas > 1:
            count_sync(self.ctx)
        self._works, self._mean = None, None

    def after_optimizer(self, k: int) -> None:
        # (A single replica has no probe: build() recorded its true 0.0 once.)
        if self._probe is not None and (k + 1) % self.log_every == 0:
            self._probe.measure(self.ctx, k + 1)

    def state_dict(self) -> dict[str, Any]:
        # The matching is a function of (seed, step): the step counter is the RNG position.
        return {"topology": self.topology, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["topology"] != self.topology or state["seed"] != self.seed:
            raise ValueError(
                f"state_dict: saved with topology={state['topology']!r}, seed={state['seed']}; "
                f"this run has topology={self.topology!r}, seed={self.seed}"
            )
