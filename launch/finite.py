"""Finding non-finite values (NaN, +-inf) in weights and checkpoint state, cheaply.

One host-device synchronisation per device for the whole state: the per-tensor verdicts are
stacked on their device and read once; names are looked up only when something is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

# One class for a diverged run, the library's: a NaN found by `algo.check_finite()` or
# `build(check_finite=True)` then ends a recipe exactly like one found in a checkpoint.
from commhooks import NonFiniteError

__all__ = ["NonFiniteError", "named_tensors", "nonfinite"]


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with a dotted path as its name."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (empty: all finite).

    Args:
        named: (name, tensor) pairs, e.g. `model.named_parameters()` or `named_tensors(state)`.
    """
    by_device: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for name, t in named:
        if t.is_floating_point() or t.is_complex():
            names, flags = by_device.setdefault(t.device, ([], []))
            names.append(name)
            flags.append(torch.isfinite(t.detach()).all())
    bad: list[str] = []
    for names, flags in by_device.values():
        ok = torch.stack(flags)
        if not bool(ok.all()):  # the one synchronisation per device
            bad += [n for n, good in zip(names, ok.tolist(), strict=True) if not good]
    return bad

