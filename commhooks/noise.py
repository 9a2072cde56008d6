"""Isotropic weight noise with identical draws on every rank (SSGD*, OpenReview fStMpzKkjMT, Sections 2.1, 4.3).

The noise is a function of ``(seed, step)`` alone, so every rank draws the same vector without
communicating and SSGD's replicas stay identical.
"""

from __future__ import annotations

from typing import Any

import torch

from .algorithm import Component, Context

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, k: int) -> int:
    """A 63-bit seed for step ``k`` of a stream ``seed`` (splitmix64 of the pair).

    Shared by the noise and the gossip matching so that each is a pure function of (seed, k).
    """
    x = (seed * 0x9E3779B97F4A7C15 + k + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def step_generator(seed: int, k: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, k))


class IsotropicNoise(Component):
    """After every step, ``w += N(0, noise_std^2 I)`` on the parameters.

    Args:
        ctx: the shared context.
        noise_std: sigma, > 0.
        seed: the stream's seed; the draw of step ``k`` uses :func:`step_seed` ``(seed, k)``.
    """

    def __init__(self, ctx: Context, noise_std: float, seed: int) -> None:
        self.ctx, self.noise_std, self.seed = ctx, noise_std, seed

    def after_optimizer(self, k: int) -> None:
        weights = self.ctx.weights
        gen = step_generator(self.seed, k, weights.device)
        with torch.no_grad():
            for seg in weights.param_segments():
                noise = torch.randn(seg.numel(), generator=gen, dtype=seg.dtype, device=seg.device)
                seg.add_(noise, alpha=self.noise_std)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}  # the stream position is the step counter itself
