"""Never silently wrong, never stuck: step agreement, non-finite weights, uneven data, foot-guns.

Gloo and NCCL pair collectives by their order in a group, not by what they carry. A rank that
called ``algo.step()`` once more or once less than the others therefore mixes the wrong
tensors of the same size without any error (a periodic average paired with another rank's
``consensus()`` average), or waits for a peer that never comes until the collective timeout
(a gossip partner chosen for a different step).

:class:`ExchangeGuard` prevents both. Before every weight exchange (a periodic average, an
Elastic-SGD or Parle reference average, a gossip step), before ``consensus()``, in
``check_finite()``, and before the collectives DDP itself runs inside a backward pass (the
gradient all-reduce of a replica or of a warm-up step, the used-parameter map of
``find_unused_parameters=True``), each rank contributes ``[step, -step, kind, -kind,
non_finite]`` (five int64, 40 bytes) to one MAX all-reduce on a gloo group of its own, on CPU,
so it never waits for the device and never queues behind weight traffic. At most one such check
runs per step (plus ``consensus()`` and ``check_finite()``). Equal minimum and maximum mean
that every rank is at the same place of the same step; anything else raises
:class:`StepMismatchError` on every rank, before any weight is mixed, naming where each rank is.
Because the checks share one group, they pair with each other whatever each rank was doing.
Not covered: DDP's buffer broadcast in the forward pass (``broadcast_buffers=True``, which
``build`` already warns about for these algorithms) and collectives of your own.

The same probe optionally carries a non-finite flag (``build(..., check_finite=True)``): each
rank reads its own weights before the exchange, so a diverged rank stops every rank, before the
exchange spreads its NaN/inf, with :class:`NonFiniteError` naming the step, the rank and the
flat group. ``algo.check_finite()`` does the same on demand (at log, evaluation or checkpoint
points).

Uneven data: every rank must run the same number of steps. Use ``drop_last=True`` (in the
``DistributedSampler`` and the ``DataLoader``), or :func:`min_steps` to stop every rank after
the number of batches the shortest rank has.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp

from .consistency import rank_min
from .flat import FlatWeights

# Where a rank can be when it checks; the index (+1) is what travels in the probe.
KINDS: tuple[str, ...] = (
    "periodic average",
    "Elastic-SGD reference average",
    "Parle anchor average",
    "gossip exchange",
    "backward pass",
    "consensus()",
    "check_finite()",
)

REMEDY = (
    "Every rank must call algo.step() the same number of times and enter consensus() and "
    "check_finite() together (they are collective). With uneven data give every rank the same "
    "number of batches per epoch: drop_last=True (DistributedSampler and DataLoader), or run "
    "commhooks.min_steps(len(loader)) steps per epoch on every rank."
)

PROBE_BYTES = 5 * 8  # [step, -step, kind, -kind, non_finite] as int64


class StepMismatchError(RuntimeError):
    """Ranks are at different exchanges or steps (or a rank never reached a collective check)."""


class NonFiniteError(RuntimeError):
    """The loss, the weights or other training state hold NaN or inf: the run has diverged.

    Deterministic: restarting from the last checkpoint with the same settings diverges again.
    Raised on every rank together (the decision is collective). The launcher's checkpoints and
    the recipes raise this same class.
    """


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


class ExchangeGuard:
    """The checks that run before every weight exchange (see the module docstring).

    Args:
        group: a group over all ranks used by nothing but these checks (gloo, CPU tensors);
            ``None`` in a single process.
        weights: the flat weights whose finiteness is checked.
        exchanges: whether the algorithm exchanges weights (more than one replica); without,
            :meth:`before_exchange` does nothing.
        steps: check that every rank is at the same exchange of the same step.
        finite: also check the weights for NaN/inf at every exchange (one pass over the
            weights and one host-device sync per exchange).
    """

    def __init__(
        self,
        group: ProcessGroup | None = None,
        weights: FlatWeights | None = None,
        *,
        exchanges: bool = False,
        steps: bool = True,
        finite: bool = False,
    ) -> None:
        self.group, self.weights = group, weights
        self.exchanges, self.steps, self.finite = exchanges, steps, finite
        self._agreed_step = -1  # the last step at which every rank was seen at the same place
        self.checks = 0  # probes this rank took part in
        self.bytes_sent = 0  # bytes this rank handed to them (not in the algorithm's comm_bytes)

    def before_exchange(self, kind: str, step: int) -> None:
        """Call right before a weight exchange's first collective; ``step`` = completed steps."""
        if not self.exchanges or not (self.steps or self.finite):
            return
        if step == self._agreed_step and not self.finite:
            return  # every rank already met in this step: the rest of it pairs up by construction
        self._probe(kind, step, finite=self.finite)
        self._agreed_step = step

    def before_backward(self, step: int) -> None:
        """Call before the collectives DDP runs inside step ``step``'s backward (weights unchecked)."""
        if self.exchanges and self.steps and step != self._agreed_step:
            self._probe("backward pass", step, finite=False)
            self._agreed_step = step

    def enter_consensus(self, step: int, timeout: timedelta | None = None) -> None:
        """Check that every rank entered ``consensus()`` after the same step (waits ``timeout``)."""
        if self.steps or self.finite:
            self._probe("consensus()", step, finite=self.finite, timeout=timeout)

    def check_finite(self, step: int) -> None:
        """Raise :class:`NonFiniteError` on every rank if any rank's weights hold NaN or inf."""
        self._probe("check_finite()", step, finite=True)

    def _nonfinite_mask(self) -> int:
        """Bit ``2i``: group ``i``'s parameters are non-finite; bit ``2i + 1``: its buffers."""
        if self.weights is None or not self.weights.groups:
            return 0
        with torch.no_grad():
            ok = torch.stack([
                torch.isfinite(seg).all()
                for g in self.weights.groups[:31]  # the mask is an int64
                for seg in (g.param_segment, g.buffer_segment)
            ])
        return sum(1 << i for i, good in enumerate(ok.tolist()) if not good)

    def _all_reduce(self, t: torch.Tensor, op: ReduceOp.RedOpType, where: str, timeout: timedelta | None) -> None:
        try:
            work = dist.all_reduce(t, op=op, group=self.group, async_op=True)
            if timeout is None:
                work.wait()
            else:
                work.wait(timeout)
        except RuntimeError as err:
            within = f"within {timeout.total_seconds():g} s" if timeout is not None else "within the collective timeout"
            raise StepMismatchError(
                f"rank {dist.get_rank()} waited at {where}, but not every rank reached a matching "
                f"check {within}, or a peer left ({err}). {REMEDY}"
            ) from err

    def _probe(self, kind: str, step: int, *, finite: bool, timeout: timedelta | None = None) -> None:
        code = KINDS.index(kind) + 1
        where = f"{kind} at step {step}"
        mask = self._nonfinite_mask() if finite else 0
        if self.group is None:
            if mask:
                raise NonFiniteError(self._finite_message(where, {0: mask}))
            return
        probe = torch.tensor([step, -step, code, -code, int(mask != 0)], dtype=torch.int64)
        self._all_reduce(probe, ReduceOp.MAX, where, timeout)
        self.checks += 1
        self.bytes_sent += PROBE_BYTES
        high_step, neg_low_step, high_code, neg_low_code, any_bad = probe.tolist()
        agree = high_step == -neg_low_step and high_code == -neg_low_code
        if agree and not any_bad:
            return
        # Every rank sees the same probe, so every rank takes this path: one more tiny collective
        # tells each where the others are.
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        table = torch.zeros(world, 3, dtype=torch.int64)
        table[rank] = torch.tensor([code, step, mask])
        self._all_reduce(table, ReduceOp.SUM, where, timeout)
        rows = table.tolist()
        if not agree:
            places: dict[str, list[int]] = {}
            for r, (c, s, _) in enumerate(rows):
                places.setdefault(f"{KINDS[c - 1]} at step {s}", []).append(r)
            seen = "; ".join(f"{_ranks(rs)}: {place}" for place, rs in places.items())
            raise StepMismatchError(
                f"ranks are out of step: {seen} (step = completed algo.step() calls). {REMEDY}"
            )
        raise NonFiniteError(self._finite_message(where, {r: m for r, (_, _, m) in enumerate(rows) if m}))

    def _finite_message(self, where: str, masks: dict[int, int]) -> str:
        assert self.weights is not None
        parts = []
        for r, m in masks.items():
            what = []
            for i, g in enumerate(self.weights.groups[:31]):
                desc = f"flat group {i} ({g.flat.dtype}, {g.flat.device})"
                if m >> (2 * i) & 1:
                    what.append(f"parameters of {desc}")
                if m >> (2 * i + 1) & 1:
                    what.append(f"buffers of {desc}")
            parts.append(f"rank {r}: {', '.join(what)}")
        return (
            f"non-finite weights (NaN or inf), found at {where}: {'; '.join(parts)}. The run has "
            "diverged; every rank stops here, before an exchange spreads them (lower the "
            "learning rate, or look at the loss)."
        )


def min_steps(num_local_batches: int, group: ProcessGroup | None = None) -> int:
    """The number of steps every rank can run: the minimum of ``num_local_batches`` over ranks.

    For uneven data (ranks holding different numbers of batches), run exactly this many steps on
    every rank and drop the rest of the epoch, as ``drop_last=True`` does for equal shards.
    Collective (one int64 all-reduce); in a single process it returns its argument.

    Args:
        num_local_batches: the batches this rank has this epoch (e.g. ``len(loader)``).
        group: the ranks to agree over (default: all).
    """
    if not isinstance(num_local_batches, int) or isinstance(num_local_batches, bool) or num_local_batches < 0:
        raise ValueError(f"num_local_batches must be an integer >= 0, got {num_local_batches!r}")
    return rank_min(num_local_batches, group)


def pull_stability_bound(momentum: float, nesterov: bool) -> float:
    """The largest ``lr * rho`` for which an elastic pull of strength ``rho`` through SGD is stable.

    On the difference between two replicas the pull ``rho (x_a - x~)`` acts like a quadratic of
    curvature ``rho`` (Chaudhari et al., "Parle", arXiv:1707.00424, eq. 7 and 8c). SGD with step
    ``a = lr * rho`` on it is a linear recurrence; with PyTorch's Nesterov momentum ``mu`` its
    characteristic polynomial is ``l^2 - (1 + mu)(1 - a) l + mu (1 - a)``, whose roots stay in the
    unit circle iff ``0 < a < 2 (1 + mu) / (1 + 2 mu)`` (about 1.357 at ``mu = 0.9``). Heavy-ball
    momentum gives ``l^2 - (1 + mu - a) l + mu``, stable iff ``a < 2 (1 + mu)``; plain SGD ``a < 2``.
    """
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 2.0 * (1.0 + momentum)
