"""The object ``commhooks.build`` returns: an optimizer step wrapped by composable components.

Every algorithm in docs/README.md is a short list of :class:`~commhooks.ops.component.Component` s.
One call of :meth:`Algorithm.step` is::

    (in backward)  for c in components: c.backward_started(k)   # start weight exchanges
    for c in components: c.before_optimizer(k)   # mix weights, add pulls to gradients
    optimizer.step()                             # the user's OptStep
    for c in components: c.after_optimizer(k)    # average, add noise, outer steps
    k += 1
    for c in components: c.prepare(k)            # set up step k's backward (groups, prefetch)

``Algorithm`` owns the step counter and the two signals components react to: "backward started"
(it alone sets ``GradSyncState.on_backward``) and "an average was formed" (it alone sets
``Context.average_formed``, which a periodic synchronisation calls before applying the mean); it
dispatches each to every component's phase of that name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .base.comm import CommMeter, replica_max_, replica_mean_
from .base.consistency import check_same_across_ranks
from .ops.component import Component, Context
from .optimizer import AlgorithmOptimizer, guard_bare_steps


class Algorithm:
    """A communication algorithm attached to a DDP model; use :meth:`step` instead of ``optimizer.step()``.

    Or step :meth:`as_optimizer`, a ``torch.optim.Optimizer`` whose ``step()`` is :meth:`step`.

    Args:
        name: the algorithm's name in ``commhooks.ALGORITHMS``.
        model: the DDP model (its comm hook is already registered).
        ctx: the shared context.
        components: the step wrappers, in order.
        hparams: the resolved hyper-parameters (for ``state_dict`` and logs).
        replicas_identical: whether the rule keeps every replica equal (SSGD), so that
            :meth:`consensus` needs no communication.
    """

    def __init__(
        self,
        *,
        name: str,
        model: DistributedDataParallel,
        ctx: Context,
        components: list[Component],
        hparams: dict[str, Any],
        replicas_identical: bool,
    ) -> None:
        self.name = name
        self.model = model
        self.ctx = ctx
        self.components = components
        self.hparams = hparams
        self.replicas_identical = replicas_identical or ctx.topo.num_replicas == 1
        self.k = 0
        ctx.grad_state.on_backward = self._backward_started
        ctx.average_formed = self._average_formed
        self._prepare()
        # optimizer.py: a bare optimizer.step() outside step() raises; as_optimizer() wraps it.
        self._inside_step = False
        self.bare_step_guard = guard_bare_steps(self)
        self._as_optimizer: AlgorithmOptimizer | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.ctx.optimizer

    @property
    def replica_size(self) -> int:
        return self.ctx.topo.replica_size

    def _backward_started(self) -> None:
        # DDP all-reduces inside backward (gradients, and the used-parameter map with
        # find_unused_parameters): check the step first, or a rank a step ahead blocks there
        # while the others wait in their next check.
        if self.ctx.grad_state.group is not None or self.model.find_unused_parameters:
            self.ctx.guard.before_backward(self.k)
        for c in self.components:
            c.backward_started(self.k)

    def _average_formed(self, means: list[torch.Tensor], lr: float) -> None:
        for c in self.components:
            c.average_formed(means, lr)

    def _prepare(self) -> None:
        self.ctx.grad_state.step = self.k
        for c in self.components:
            c.prepare(self.k)

    def step(self) -> None:
        """The user's optimizer step plus this algorithm's exchange (docs/README.md)."""
        self.ctx.grad_state.end_backward()
        k = self.k
        for c in self.components:
            c.before_optimizer(k)
        self._inside_step = True  # the only call the bare-step guard lets through
        try:
            self.optimizer.step()
        finally:
            self._inside_step = False
        for c in self.components:
            c.after_optimizer(k)
        self.k = k + 1
        self._prepare()

    def as_optimizer(self) -> AlgorithmOptimizer:
        """A ``torch.optim.Optimizer`` whose ``step()`` is :meth:`step` (the same object every call).

        Hand it to the training loop, ``GradScaler.step``, LR schedulers and trainer libraries
        in place of the optimizer given to ``build`` (docs/usage.md).
        """
        if self._as_optimizer is None:
            self._as_optimizer = AlgorithmOptimizer(self)
        return self._as_optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def stats(self) -> dict[str, float]:
        """Communication and consensus figures (docs/metrics.md), plus ``step``."""
        out = self.ctx.meter.as_dict()
        for c in self.components:
            out.update(c.stats())
        out["step"] = float(self.k)
        return out

    def check_finite(self) -> None:
        """Raise ``commhooks.NonFiniteError`` on every rank if any rank's weights hold NaN or inf.

        Collective: every rank calls it at the same step (log, evaluation or checkpoint points).
        It reads every weight once (one host-device sync) and all-reduces 40 bytes; the error
        names the step, the ranks and the flat groups. ``build(..., check_finite=True)`` runs
        the same check before every weight exchange.
        """
        self.ctx.guard.check_finite(self.k)

    @contextlib.contextmanager
    def consensus(self, timeout: timedelta | None = None) -> Iterator[torch.nn.Module]:
        """Inside, the model holds the replica average (for Parle: of the anchors). Collective.

        Every rank must enter it, after the same number of steps: otherwise every rank that
        entered raises ``commhooks.StepMismatchError`` instead of averaging with another rank's
        weight exchange. The local weights are restored on exit, bit for bit.

        Args:
            timeout: how long to wait for the other ranks to enter (default: the collective
                timeout given to ``build``).
        """
        if self.replicas_identical:
            yield self.model.module
            return
        self.ctx.guard.enter_consensus(self.k, timeout)
        weights = self.ctx.weights
        saved = weights.snapshot()
        try:
            with torch.no_grad():
                for c in self.components:
                    values = c.consensus_params()
                    if values is not None:
                        for seg, v in zip(weights.param_segments(), values, strict=True):
                            seg.copy_(v)
                # Communication for evaluation is not the algorithm's: keep it out of the meter.
                scratch = CommMeter()
                replica_mean_(weights.comm_segments(), self.ctx.topo, scratch)
                replica_max_(weights.max_segments(), self.ctx.topo, scratch)
            yield self.model.module
        finally:
            weights.restore(saved)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: counters, controllers, references, RNG positions.

        Per rank (replicas differ). The model's weights and the optimizer's state are not in it:
        save ``model.state_dict()`` and ``optimizer.state_dict()`` beside it.
        """
        return {
            "algorithm": self.name,
            "step": self.k,
            "world_size": self.ctx.topo.world_size,
            "replica_size": self.ctx.topo.replica_size,
            "meter": self.ctx.meter.as_dict(),
            "components": [c.state_dict() for c in self.components],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Load the model's weights first. Collective (checks ranks agree)."""
        if state.get("algorithm") != self.name:
            raise ValueError(
                f"state_dict: saved by algorithm {state.get('algorithm')!r}, this is {self.name!r}"
            )
        for key in ("world_size", "replica_size"):
            mine = getattr(self.ctx.topo, key)
            if state[key] != mine:
                raise ValueError(
                    f"state_dict: saved with {key}={state[key]}, now {key}={mine}; an algorithm's "
                    "state only resumes on the same layout (start from the replica average instead)"
                )
        if len(state["components"]) != len(self.components):
            raise ValueError("state_dict: component list does not match this algorithm")
        check_same_across_ranks({"step": state["step"]}, device=self.ctx.weights.device)
        self.k = int(state["step"])
        for c, s in zip(self.components, state["components"], strict=True):
            c.load_state_dict(s)
        self._prepare()
        # Last: what _prepare() just restarted (a reference prefetch) was already counted
        # before the save, so the restored figures continue exactly.
        self.ctx.meter.load_dict(state["meter"])
