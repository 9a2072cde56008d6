"""Outer optimizers on periodic averaging: DiLoCo's outer Nesterov SGD and SlowMo's slow momentum.

Local SGD replaces every replica by the replicas' mean at a synchronisation. An outer optimizer
treats the move of the global weights since the previous synchronisation as a gradient instead:
with ``g`` the global weights after the previous synchronisation (every replica started the
period from them) and ``M = mean_a(x_a)`` the mean of this one, the pseudo-gradient is
``Δ = g - M`` and

- DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
  arXiv 2311.08105, Algorithm 1; outer Nesterov SGD, lr 0.7, momentum 0.9):
  ``m <- μ m + Δ``; ``g <- g - η (Δ + μ m)`` (Nesterov) or ``g <- g - η m`` (heavy ball);
- SlowMo (Wang, Tantia, Ballas & Rabbat, "SlowMo: Improving Communication-Efficient Distributed
  SGD with Slow Momentum", ICLR 2020, arXiv 1910.00643, Algorithm 1): the same with the momentum
  normalised by the inner lr ``γ`` of the synchronisation step: ``u <- β u + Δ / γ``;
  ``g <- g - α γ u``;

and every replica continues from the new ``g``. With ``η = 1`` and ``μ = 0`` this is exactly the
average, bit for bit: the update is computed from the mean as ``M + (1 - η) Δ - η μ s v`` (``s``
the normalisation, ``v`` the momentum the rule steps with), and terms whose coefficient is zero
are skipped rather than added as ``0 * Δ`` (which differs for -0, inf and NaN).

The outer step acts on the parameters; floating buffers (BatchNorm statistics) take the plain
average. Memory: ``g`` and the momentum buffer are parameter-sized (no momentum buffer when
``μ = 0``); a step allocates nothing model-sized (``Δ`` is formed inside ``g``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..base.config import ConfigBase, check, hparam, is_finite_number
from ..ops.component import Component, Context

OUTER_LR_HELP = ("eta, the outer learning rate on the pseudo-gradient g - mean of the replicas (g: the previous "
                 "average's result); 1 with outer_momentum 0 is the plain average")
OUTER_MOMENTUM_HELP = "mu, the outer momentum: m <- mu * m + (g - mean of the replicas)"
OUTER_NESTEROV_HELP = "Nesterov outer momentum (DiLoCo) instead of heavy ball"


@dataclass(frozen=True, kw_only=True)
class OuterConfig(ConfigBase):
    """The fields of :class:`OuterOptimizer`; ``1, 0, False`` is the plain average (none is built)."""

    outer_lr: float = hparam(1.0, valid="a finite number > 0", help=OUTER_LR_HELP)
    outer_momentum: float = hparam(0.0, valid="in [0, 1)", help=OUTER_MOMENTUM_HELP)
    outer_nesterov: bool = hparam(False, valid="True or False", help=OUTER_NESTEROV_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(is_finite_number(self.outer_lr) and self.outer_lr > 0, "outer_lr", "a finite number > 0", self.outer_lr)
        check(is_finite_number(self.outer_momentum) and 0 <= self.outer_momentum < 1, "outer_momentum", "in [0, 1)",
              self.outer_momentum)
        check(isinstance(self.outer_nesterov, bool), "outer_nesterov", "True or False", self.outer_nesterov)

    @property
    def has_outer_optimizer(self) -> bool:
        """Whether the rule differs from the plain average (an outer optimizer must be built)."""
        return self.outer_lr != 1.0 or self.outer_momentum != 0.0


class OuterOptimizer(Component):
    """Outer SGD with momentum on the pseudo-gradient of every periodic synchronisation.

    In its ``average_formed`` phase (a periodic synchronisation announces the replicas' mean ``M``,
    per flat group the parameter segment, and the lr of the synchronisation step) it replaces
    ``M`` in place by the outer step ``T`` (the new global weights). Place it
    after the averaging component (it reads the weights at the end of the warm-up).

    Args:
        ctx: the shared context.
        lr: the outer learning rate (η; SlowMo's α).
        momentum: the outer momentum (μ; SlowMo's β), in [0, 1).
        nesterov: Nesterov momentum (DiLoCo) instead of heavy ball (SlowMo).
        normalize: SlowMo's normalisation by the inner lr of the synchronisation step.
        warmup_steps: the first local step: ``g`` is taken from the weights after step
            ``warmup_steps - 1`` (the synchronous warm-up keeps every replica identical), or at
            construction when 0.
    """

    def __init__(
        self, ctx: Context, *, lr: float, momentum: float, nesterov: bool, normalize: bool = False, warmup_steps: int = 0,
    ) -> None:
        self.ctx, self.lr, self.momentum, self.nesterov = ctx, lr, momentum, nesterov
        self.normalize, self.warmup_steps = normalize, warmup_steps
        with torch.no_grad():
            self.global_weights = [seg.detach().clone() for seg in ctx.weights.param_segments()]
            self.momentum_buffers = [torch.zeros_like(g) for g in self.global_weights] if momentum else None

    @classmethod
    def from_config(cls, ctx: Context, cfg: OuterConfig, *, normalize: bool = False, warmup_steps: int = 0) -> OuterOptimizer:
        return cls(ctx, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.outer_nesterov,
                   normalize=normalize, warmup_steps=warmup_steps)

    def after_optimizer(self, k: int) -> None:
        if k + 1 == self.warmup_steps:  # the last synchronous step: the local phase starts here
            with torch.no_grad():
                for g, seg in zip(self.global_weights, self.ctx.weights.param_segments(), strict=True):
                    g.copy_(seg)

    def average_formed(self, means: list[torch.Tensor], lr: float) -> None:
        """Replace ``means`` (the replicas' mean ``M``, per group) by the outer step ``T`` in place;
        ``lr`` is the inner optimizer's at the synchronisation step."""
        inner_lr = lr
        scale = 1.0
        if self.normalize:
            if not inner_lr > 0:
                raise ValueError(f"slowmo normalises by the optimizer's lr, which must be > 0 at a synchronisation, got {inner_lr!r}")
            scale = inner_lr
        mu = self.momentum
        delta_coef = 1.0 - self.lr  # of Δ in T = M + (1 - η) Δ - η μ s v
        momentum_coef = self.lr * mu * scale  # of v
        buffers: list[torch.Tensor | None] = [None] * len(means)
        if self.momentum_buffers is not None:
            buffers = list(self.momentum_buffers)
        with torch.no_grad():
            for g, target, buf in zip(self.global_weights, means, buffers, strict=True):
                delta = g.sub_(target)  # Δ = g - M, formed in g's own storage
                if buf is not None and self.nesterov:
                    self._accumulate(buf, delta, scale)  # Nesterov steps with the new momentum
                if delta_coef != 0.0:
                    target.add_(delta, alpha=delta_coef)
                if buf is not None and momentum_coef != 0.0:
                    target.sub_(buf, alpha=momentum_coef)
                if buf is not None and not self.nesterov:
                    self._accumulate(buf, delta, scale)  # heavy ball steps with the old one
                g.copy_(target)

    def _accumulate(self, buf: torch.Tensor, delta: torch.Tensor, scale: float) -> None:
        buf.mul_(self.momentum)
        if scale == 1.0:
            buf.add_(delta)
        else:
            buf.add_(delta, alpha=1.0 / scale)

    def state_dict(self) -> dict[str, Any]:
        # Mid-period neither g nor the momentum can be recomputed from the weights: save both.
        return {"global_weights": [g.clone() for g in self.global_weights],
                "momentum": None if self.momentum_buffers is None else [b.clone() for b in self.momentum_buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for g, saved in zip(self.global_weights, state["global_weights"], strict=True):
                g.copy_(saved)
            if self.momentum_buffers is not None:
                for b, saved in zip(self.momentum_buffers, state["momentum"], strict=True):
                    b.copy_(saved)
