"""Entropy-SGD inner loops with elastically coupled anchors: Parle (arXiv 1707.00424, eq. 8; eq. 6).

The model's parameters hold the inner iterate ``y_a``. Per replica: the anchor ``x_a``, the
running average ``z_a`` and the anchor's momentum ``v_a``. Step ``k`` (``s = k // L``):

1. ``g = grad(y_a) + gamma_s (y_a - x_a)``; ``y_a = OptStep(y_a, g)``            (eq. 8a)
2. ``z_a = alpha z_a + (1 - alpha) y_a``                                          (eq. 8b)
3. every ``L`` steps: ``x~ = mean_a(x_a)``; ``d = (x_a - z_a) + rho_s (x_a - x~)`` (eq. 8c);
   Nesterov on the anchor ``v = mu v + d; x -= lr (d + mu v)`` (Remark 2); ``y = z = x``.

Entropy-SGD is this with one replica: ``x~ = x_a`` exactly, no anchor communication at all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..base.config import check, hparam
from ..base.inplace import Scratch
from ..ops.averages import BufferAverage, ReferenceAverage, count_sync
from ..ops.component import Component, Context
from ..ops.pulls import CouplingConfig, pull_into_grads
from ..ops.schedules import ScopingConfig, check_coefficient, scoped


@dataclass(frozen=True, kw_only=True)
class ProximalConfig(ScopingConfig):
    """The fields of :class:`ProximalInnerLoop` (with several replicas, also a :class:`CouplingConfig`)."""

    L: int = hparam(25, valid="an integer >= 1", help="inner steps per outer step (and per weight exchange in parle)", int_at_least=1)
    alpha: float = hparam(0.75, valid="in [0, 1)", help="weight of the running average of the inner iterates: z = alpha z + (1 - alpha) y")
    gamma: float = hparam(0.01, valid="a finite number >= 0", help="proximal coupling: gamma * (y - x) pulls the inner iterate y to its anchor x")
    gamma_max: float = hparam(1.0, valid=">= gamma", help="cap of gamma under scoping")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha < 1, "alpha", "in [0, 1)", self.alpha)
        check_coefficient("gamma", self.gamma, "gamma_max", self.gamma_max)

    def warn_foot_guns(self, name: str, optimizer: Any, num_replicas: int) -> None:
        """Warn when ``steps_per_epoch < L``: the anchors, the model ``consensus()`` evaluates, only
        move every ``L`` steps, so they are still the initial weights after the first epoch."""
        super().warn_foot_guns(name, optimizer, num_replicas)
        B, L = self.steps_per_epoch, self.L
        if isinstance(B, int) and B < L:
            warnings.warn(
                f"{name}: steps_per_epoch={B} < L={L}: the anchors (the model consensus() "
                f"evaluates) move once every L={L} steps, so after the first epoch they are still "
                f"the initial weights; choose L <= steps_per_epoch",
                stacklevel=3,
            )


class ProximalInnerLoop(Component):
    """The Parle/Entropy-SGD step wrapper (Parle, arXiv 1707.00424, eq. 8; Entropy-SGD eq. 6).

    State: the anchor, the running average and the anchor's momentum (three parameter-sized
    buffers), plus, with several replicas, the buffer the anchors' average is reduced into while
    the ``L`` inner steps run (so that it never blocks). Every step works in place: the proximal
    pull goes into the gradients chunk by chunk, the running average is one ``lerp_``, and the
    outer step turns the running average and the reference into its own temporaries, which it
    then resets. With one replica (Entropy-SGD) there is no reference at all: ``x~ = x_a``.

    Args:
        ctx: the shared context.
        L: inner steps per outer step.
        alpha: the running average's coefficient.
        gamma, gamma_max: the proximal coefficient and its cap.
        rho, rho_max: the elastic coefficient and its cap (0 for Entropy-SGD).
        steps_per_epoch: ``B`` of the scoping schedule, clock ``s = k // L``.
        scoping: anneal ``gamma`` and ``rho`` (True) or keep them constant.
    """

    def __init__(
        self, ctx: Context, *, L: int, alpha: float, gamma: float, gamma_max: float,
        rho: float, rho_max: float, steps_per_epoch: int | None, scoping: bool,
    ) -> None:
        self.ctx, self.L, self.alpha = ctx, L, alpha
        self.gamma, self.gamma_max, self.rho, self.rho_max = gamma, gamma_max, rho, rho_max
        self.steps_per_epoch, self.scoping = steps_per_epoch, scoping
        params = ctx.weights.param_segments()
        self.anchor = [p.detach().clone() for p in params]
        self.average = [p.detach().clone() for p in params]
        self.velocity = [torch.zeros_like(p) for p in params]
        self.reference = ReferenceAverage(ctx) if ctx.topo.num_replicas > 1 else None
        self.buffer_average = BufferAverage(ctx)
        self.scratch = Scratch(ctx.weights)
        self.k = 0

    @classmethod
    def from_config(cls, ctx: Context, cfg: ProximalConfig, coupling: CouplingConfig | None = None) -> ProximalInnerLoop:
        """Entropy-SGD without ``coupling`` (``rho = 0``), Parle with it."""
        return cls(ctx, L=cfg.L, alpha=cfg.alpha, gamma=cfg.gamma, gamma_max=cfg.gamma_max,
                   rho=coupling.rho if coupling else 0.0, rho_max=coupling.rho_max if coupling else 0.0,
                   steps_per_epoch=cfg.steps_per_epoch, scoping=cfg.scoping)

    def coefficients(self, k: int) -> tuple[float, float]:
        s = k // self.L
        return (
            scoped(self.gamma, self.gamma_max, self.steps_per_epoch, s, self.scoping),
            scoped(self.rho, self.rho_max, self.steps_per_epoch, s, self.scoping),
        )

    def prepare(self, k: int) -> None:
        self.k = k
        self.buffer_average.finish()
        if self.reference is not None and not self.reference.started:
            # The anchors stay put for the L inner steps: their average runs meanwhile.
            self.reference.start(self.anchor)

    def before_optimizer(self, k: int) -> None:
        gamma, _ = self.coefficients(k)
        pull_into_grads(self.ctx, self.ctx.weights.param_segments(), self.anchor, gamma, self.scratch)

    def after_optimizer(self, k: int) -> None:
        y = self.ctx.weights.param_segments()
        with torch.no_grad():
            for z, yi in zip(self.average, y, strict=True):
                z.lerp_(yi, 1.0 - self.alpha)  # z = alpha z + (1 - alpha) y, one pass
        if (k + 1) % self.L == 0:
            self._outer_step(k)

    def _outer_step(self, k: int) -> None:
        _, rho = self.coefficients(k)
        lr, mu = self.ctx.lr, self.ctx.momentum
        self.ctx.guard.before_exchange("Parle anchor average", k)
        refs = self.reference.get() if self.reference is not None else [None] * len(self.anchor)
        squares = torch.zeros((), dtype=torch.float64, device=self.ctx.weights.device)
        with torch.no_grad():
            for x, z, v, ref, y in zip(self.anchor, self.average, self.velocity, refs, self.ctx.weights.param_segments(), strict=True):
                d = torch.sub(x, z, out=z)  # x - z, in the running average's buffer (reset below)
                if ref is not None:
                    pull = torch.sub(x, ref, out=ref)  # x - x~, in the consumed reference
                    squares.add_(torch.dot(pull, pull))
                    d.add_(pull, alpha=rho)
                v.mul_(mu).add_(d)
                x.sub_(d.add_(v, alpha=mu), alpha=lr)
                y.copy_(x)
                z.copy_(x)
        if self.reference is not None:
            count_sync(self.ctx, local_squared=squares, step=k + 1)
            self.reference.discard()  # consumed: prepare() starts the next outer period's average
            self.buffer_average.start()

    def consensus_params(self) -> list[torch.Tensor]:
        return self.anchor

    def stats(self) -> dict[str, float]:
        gamma, rho = self.coefficients(self.k)
        return {"gamma": gamma, "rho": rho}

    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": [t.clone() for t in self.anchor],
            "average": [t.clone() for t in self.average],
            "velocity": [t.clone() for t in self.velocity],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for key in ("anchor", "average", "velocity"):
                for dst, src in zip(getattr(self, key), state[key], strict=True):
                    dst.copy_(src)
        if self.reference is not None:
            self.reference.discard()  # it was started from the anchors before loading
