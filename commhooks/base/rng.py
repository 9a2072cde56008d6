"""Random streams that are pure functions of ``(seed, step)``: every rank draws the same numbers
without communicating (the noise of SSGD*, the gossip matching, the consensus probe's sample)."""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, k: int) -> int:
    """A 63-bit seed for step ``k`` of a stream ``seed`` (splitmix64 of the pair)."""
    x = (seed * 0x9E3779B97F4A7C15 + k + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def step_generator(seed: int, k: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with :func:`step_seed` ``(seed, k)`` on ``device``."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, k))
