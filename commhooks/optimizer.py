"""``optimizer.step()`` runs the algorithm: an optimizer that wraps the user's, and a bare-step guard.

Training loops, LR schedulers, ``torch.amp.GradScaler``, clipping helpers and trainer libraries
all call ``optimizer.step()``. :meth:`Algorithm.as_optimizer` returns an
:class:`AlgorithmOptimizer`: a real ``torch.optim.Optimizer`` whose ``step()`` *is*
``algo.step()`` (the components before the user's step, the user's optimizer step, the
components after, ``k += 1``), so there is one step counter, ``Algorithm.k``, whichever way the
loop steps. Usage with GradScaler, gradient accumulation, clipping and schedulers:
``docs/usage.md``.

Why a wrapper and not step hooks on the user's own optimizer (``register_step_pre_hook`` /
``register_step_post_hook``, as torchft does for local SGD):

- ``GradScaler.step(opt)`` calls ``opt.step()`` only on ranks whose *own* gradients are finite.
  With local gradients (every algorithm here after its warm-up, except SSGD and SSGD*) an
  overflow stays on its rank (or replica), so hooks would run the exchange on some ranks only:
  a hang, or collectives that pair the wrong tensors. An
  optimizer that sets ``_step_supports_amp_scaling = True`` is called on every rank with the
  scaler's ``found_inf`` instead, so the ranks can agree first (one 4-byte all-reduce). That flag
  cannot be set on the user's optimizer without changing what its own ``step()`` must do.
- A hook cannot skip the user's step, which a skipped (overflowed) step needs.
- LR schedulers keep a reference to the optimizer they were given and only mutate its
  ``param_groups``; the wrapper *shares* the user optimizer's ``param_groups``, ``state`` and
  ``defaults`` (properties, so they stay shared after ``load_state_dict`` replaces them), so a
  scheduler over either object drives the same learning rate, and ADPSGD's controller and
  Parle's outer step read it at the step where they use it.

A loop that still steps the user's optimizer directly would skip every exchange while the
replicas drift apart with no error. :func:`guard_bare_steps` (installed by every
:class:`Algorithm`) is a step pre-hook on the user's optimizer that raises ``RuntimeError`` at
the first such call, *before* it changes a weight, on every rank that makes it. It raises rather
than warns: a warning among many ranks' logs is easily missed, and the run it would accompany is
not the algorithm's any more. ``algo.bare_step_guard.remove()`` lifts it for a deliberate use.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from .algorithm import Algorithm


def guard_bare_steps(algorithm: Algorithm) -> RemovableHandle:
    """Make ``optimizer.step()`` on the algorithm's optimizer raise unless the algorithm makes the call.

    Returns the hook's handle (``.remove()`` lifts the guard). The check runs before the step, so
    a refused call leaves the weights and the optimizer's state untouched.
    """

    def refuse_bare_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not algorithm._inside_step:
            raise RuntimeError(
                f"commhooks: optimizer.step() was called on the optimizer given to "
                f"commhooks.build({algorithm.name!r}, ...) outside the algorithm. That step would "
                "skip the algorithm's exchange and the replicas would drift apart silently, so it "
                "was refused before changing anything. Call algo.step(), or step "
                "opt = algo.as_optimizer() (a torch.optim.Optimizer whose step() is algo.step(); "
                "give that one to GradScaler.step, LR schedulers and trainer libraries). "
                "algo.bare_step_guard.remove() allows bare steps on purpose."
            )

    return algorithm.optimizer.register_step_pre_hook(refuse_bare_step)


class AlgorithmOptimizer(torch.optim.Optimizer):
    """The user's optimizer with ``step()`` replaced by the algorithm's step (``algo.as_optimizer()``).

    Shares ``param_groups``, ``state`` and ``defaults`` with the user's optimizer (so LR
    schedulers over either one act on both); ``zero_grad``, ``state_dict``, ``load_state_dict``
    and ``add_param_group`` delegate to it, so a checkpoint of either loads into the other. The
    algorithm's own state is ``algo.state_dict()``, saved beside it as before.

    With ``torch.amp.GradScaler``, ``scaler.step(opt)`` calls ``step()`` on every rank with the
    scaler's verdict (``_step_supports_amp_scaling``): the gradients are unscaled here exactly as
    ``GradScaler.unscale_`` does, and the ranks agree on the verdict with one 4-byte all-reduce
    (MAX over the default group; not charged to ``stats()``: it is the scaler's bookkeeping, not
    the algorithm's exchange). If any rank found an inf or NaN, every rank skips the step: no
    component runs, the user's optimizer does not step and ``Algorithm.k`` does not advance, so
    the run continues as if that step had never happened. Each rank's scaler still updates its
    own scale from its own gradients, as it always does.

    Args:
        algorithm: the algorithm whose :meth:`~Algorithm.step` this optimizer's ``step()`` runs.
    """

    # GradScaler then calls step() on every rank, overflow or not, with ``found_inf`` set.
    _step_supports_amp_scaling = True

    def __init__(self, algorithm: Algorithm) -> None:
        # Not Optimizer.__init__: it would rebuild param_groups and state instead of sharing them.
        self.algorithm = algorithm
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()  # this class's step() runs its own step hooks, as any optimizer's
        self._warned_capturable_if_run_uncaptured = True

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The user's optimizer (the one given to ``commhooks.build``)."""
        return self.algorithm.optimizer

    # Properties, not copies: the inner optimizer's load_state_dict replaces these objects.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:
        return self.inner.state

    @state.setter
    def state(self, value: defaultdict[torch.Tensor, Any]) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """``algo.step()``; a ``closure`` is evaluated once first (it must run forward and backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step for this call only
        if found_inf is not None:
            grad_scale = getattr(self, "grad_scale", None)  # None when the user called unscale_
            if grad_scale is not None:
                found_inf = found_inf + self._unscale_grads(grad_scale)
            if self._any_rank_found_inf(found_inf):
                # Re-arm the gradient hook for the next backward; an exchange it already started
                # (gossip) read weights this skip leaves untouched, so the next step uses it.
                self.algorithm.ctx.grad_state.end_backward()
                return loss
        self.algorithm.step()
        return loss

    def _unscale_grads(self, grad_scale: torch.Tensor) -> torch.Tensor:
        """``grad /= scale`` in place, with ``GradScaler.unscale_``'s arithmetic; returns the inf flag."""
        inv_scale = grad_scale.double().reciprocal().float()
        found = torch.zeros((), dtype=torch.float32, device=grad_scale.device)
        by_device_dtype: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device_dtype[(p.grad.device, p.grad.dtype)].append(p.grad)
        with torch.no_grad():
            for (device, _), grads in by_device_dtype.items():
                flag = torch.zeros((), dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, inv_scale.to(device))
                found += flag.to(found.device)
        return found

    def _any_rank_found_inf(self, found_inf: torch.Tensor) -> bool:
        """Whether any rank's scaler found an inf/NaN: every rank gets the same answer."""
        flag = found_inf.detach().to(self.algorithm.ctx.weights.device, torch.float32).reshape(1).clone()
        if self.algorithm.ctx.topo.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The user's optimizer's ``state_dict`` (the algorithm's is ``algo.state_dict()``)."""
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"AlgorithmOptimizer({self.algorithm.name!r}, {self.inner!r})"
