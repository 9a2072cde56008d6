"""Where gradients are averaged: over all ranks (SSGD, warm-up) or inside the replica."""

from __future__ import annotations

import torch.distributed as dist

from ..ops.component import Component, Context


class GradientScope(Component):
    """Gradients are averaged over all ranks before step ``global_until``, inside the replica after.

    The only writer of the gradient hook's group (``ctx.grad_state.group``): every algorithm
    has exactly one scope, its first component.

    Args:
        ctx: the shared context.
        global_until: the first step with local gradients (``math.inf``: always global, SSGD).
    """

    def __init__(self, ctx: Context, global_until: float) -> None:
        self.ctx, self.global_until = ctx, global_until

    def prepare(self, k: int) -> None:
        # Set before step k's backward: the hook reads it while DDP reduces buckets.
        if k < self.global_until:
            self.ctx.grad_state.group = dist.group.WORLD if self.ctx.topo.world_size > 1 else None
        else:
            self.ctx.grad_state.group = self.ctx.topo.replica_group
