"""Isotropic weight noise with identical draws on every rank (SSGD*, OpenReview fStMpzKkjMT, Sections 2.1, 4.3).

The noise is a function of ``(seed, step)`` alone, so every rank draws the same vector without
communicating and SSGD's replicas stay identical.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
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

    The draw of step ``k`` lands in one persistent parameter-sized buffer (the same numbers as a
    fresh ``torch.randn`` from the same generator). On a CPU, where drawing costs more than the
    add (Box-Muller over every weight), it is drawn on a background thread while step ``k``'s
    forward and backward run (the draws are known in advance: they depend on ``(seed, k)``
    only), so the step itself only adds.

    Args:
        ctx: the shared context.
        noise_std: sigma, > 0.
        seed: the stream's seed; the draw of step ``k`` uses :func:`step_seed` ``(seed, k)``.
        prefetch: draw in the background (default: on a CPU; an accelerator draws fast in-line).
    """

    def __init__(self, ctx: Context, noise_std: float, seed: int, prefetch: bool | None = None) -> None:
        self.ctx, self.noise_std, self.seed = ctx, noise_std, seed
        self.noise = [torch.empty_like(seg) for seg in ctx.weights.param_segments()]
        self.prefetch = ctx.weights.device.type == "cpu" if prefetch is None else prefetch
        self._pool: ThreadPoolExecutor | None = None
        self._drawing: Future | None = None
        self._drawn_for: int | None = None

    def _draw(self, k: int) -> None:
        gen = step_generator(self.seed, k, self.ctx.weights.device)
        with torch.no_grad():
            for buf in self.noise:
                torch.randn(buf.numel(), generator=gen, dtype=buf.dtype, device=buf.device, out=buf)

    def _settle(self) -> None:
        if self._drawing is not None:
            self._drawing.result()
            self._drawing = None

    def prepare(self, k: int) -> None:
        if not self.prefetch:
            return
        self._settle()
        if self._pool is None:  # created on first use, in the process that trains
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commhooks-noise")
        self._drawing = self._pool.submit(self._draw, k)
        self._drawn_for = k

    def after_optimizer(self, k: int) -> None:
        self._settle()
        if self._drawn_for != k:
            self._draw(k)
            self._drawn_for = k
        with torch.no_grad():
            for seg, noise in zip(self.ctx.weights.param_segments(), self.noise):
                seg.add_(noise, alpha=self.noise_std)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}  # the stream position is the step counter itself
