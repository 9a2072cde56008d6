"""Isotropic weight noise with identical draws on every rank (SSGD*, OpenReview fStMpzKkjMT, Sections 2.1, 4.3).

The noise is a function of ``(seed, step)`` alone, so every rank draws the same vector without
communicating and SSGD's replicas stay identical.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..base.config import ConfigBase, check, hparam, is_int
from ..base.rng import step_generator
from ..ops.component import Component, Context


@dataclass(frozen=True, kw_only=True)
class NoiseConfig(ConfigBase):
    """The fields of :class:`IsotropicNoise`."""

    noise_std: float = hparam(0.01, valid="a finite number > 0",
                              help="sigma of the Gaussian noise added to every parameter after each step")
    seed: int = hparam(0, valid="an integer", help="seed of the noise draws (every rank draws the same noise)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std) and self.noise_std > 0,
              "noise_std", "a finite number > 0", self.noise_std)
        check(is_int(self.seed), "seed", "an integer", self.seed)


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

    @classmethod
    def from_config(cls, ctx: Context, cfg: NoiseConfig) -> IsotropicNoise:
        return cls(ctx, cfg.noise_std, cfg.seed)

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
            for seg, noise in zip(self.ctx.weights.param_segments(), self.noise, strict=True):
                seg.add_(noise, alpha=self.noise_std)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}  # the stream position is the step counter itself
