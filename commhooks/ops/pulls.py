"""Couplings added to the gradients chunk by chunk (Elastic-SGD's and Parle's pulls)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..base.config import ConfigBase, hparam
from ..base.guards import pull_stability_bound
from ..base.inplace import Scratch, add_scaled_difference_
from .component import Context
from .schedules import check_coefficient


@dataclass(frozen=True, kw_only=True)
class CouplingConfig(ConfigBase):
    """The elastic coupling to the replicas' average (Parle, arXiv 1707.00424, eqs. 7 and 8c)."""

    rho: float = hparam(1.0, valid="a finite number >= 0 (0: independent replicas)",
                        help="coupling: rho * (x_a - mean of the replicas) pulls each replica (Elastic-SGD: "
                             "into its gradient; Parle: into its anchor's outer step)")
    rho_max: float = hparam(10.0, valid=">= rho", help="cap of rho under scoping")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_coefficient("rho", self.rho, "rho_max", self.rho_max)


def _sgd_kind(momentum: float, nesterov: bool) -> str:
    if momentum == 0:
        return "SGD without momentum"
    return f"SGD with {'Nesterov' if nesterov else 'heavy-ball'} momentum {momentum:g}"


def warn_unstable_pull(name: str, key: str, rho: float, optimizer: torch.optim.Optimizer, nesterov: bool) -> None:
    """Warn when ``lr * rho`` (``key``: the coefficient's largest value) exceeds the stability
    bound of the pull through the optimizer's step (:func:`~commhooks.pull_stability_bound`):
    the replicas then drift apart once the scoped coefficient gets there."""
    group = optimizer.param_groups[0]
    momentum = float(group.get("momentum", 0.0) or 0.0)
    lr = float(group["lr"])
    bound = pull_stability_bound(momentum, nesterov and momentum > 0)
    if not math.isfinite(lr * rho) or lr * rho > bound:
        warnings.warn(
            f"{name}: lr * {key} = {lr:g} * {rho:g} = {lr * rho:.3g} exceeds {bound:.3g}, the "
            f"stability bound of the elastic pull through {_sgd_kind(momentum, nesterov)}: the replicas "
            f"drift apart once rho passes {bound / lr:.3g}; keep {key} <= {bound / lr:.3g} at "
            f"lr {lr:g}",
            stacklevel=4,
        )


def pull_into_grads(
    ctx: Context, points: list[torch.Tensor], centres: list[torch.Tensor], coef: float,
    scratch: Scratch, squares: torch.Tensor | None = None,
) -> None:
    """``p.grad += coef * (point - centre)`` for every parameter, without temporaries.

    Bit-identical to ``p.grad.add_(point - centre, alpha=coef)``. With ``squares``, also
    ``squares += ||point - centre||^2`` over all parameters, from the same chunks.

    Args:
        ctx: the shared context (its weights' groups give the parameters).
        points, centres: one parameter-prefix-shaped tensor per flat group each.
        coef: the coupling coefficient.
        scratch: the chunk buffers.
        squares: a float64 0-dim accumulator, or None.
    """
    with torch.no_grad():
        for group, point, centre in zip(ctx.weights.groups, points, centres, strict=True):
            for p, a, b in zip(group.params, group.split_params(point), group.split_params(centre), strict=True):
                if p.grad is None:  # an unused parameter: its gradient is the pull alone
                    p.grad = torch.zeros_like(p)
                add_scaled_difference_(p.grad, a, b, coef, scratch.for_tensor(a), squares)
