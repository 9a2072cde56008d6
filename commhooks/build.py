"""``commhooks.build``: validate, lay the weights out flat, register the hook, compose the algorithm."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import asdict
from datetime import timedelta

import torch
from torch.nn.parallel import DistributedDataParallel

from .algorithm import Algorithm
from .algorithms import ALGORITHMS
from .base.comm import CommMeter, make_topology
from .base.compression import make_grad_hook
from .base.consistency import check_same_across_ranks
from .base.flat import FlatWeights
from .base.grad_hooks import GradSyncState
from .base.guards import ExchangeGuard
from .ops.component import Context
from .registry import algorithm_spec, make_config

# Algorithms whose rule keeps every replica identical: buffers broadcast by DDP are harmless.
SYNCHRONOUS: tuple[str, ...] = tuple(name for name in ALGORITHMS if algorithm_spec(name).replicas_identical)


def ddp_buffer_sync_kwargs(enabled: bool) -> dict[str, bool]:
    """DDP's keyword for broadcasting rank 0's buffers at every forward, for this torch.

    ``broadcast_buffers`` was renamed ``forward_sync_buffers`` in torch 2.15. Pass
    ``enabled=False`` for every algorithm that keeps replicas apart (its registry entry's
    ``replicas_identical`` is False).
    """
    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    return {key: enabled}


def resolve_replica_size(name: str, replica_size: int | None, world_size: int) -> int:
    """The ranks per replica: ``None`` means 1, or the world size for a single-replica rule.

    Raises ``ValueError`` naming ``replica_size`` if it is not a positive divisor of the world
    size, or not the world size for a single-replica rule (``entropysgd``).
    """
    spec = algorithm_spec(name)
    if replica_size is None:
        replica_size = spec.default_replica_size(world_size)
    if spec.single_replica and replica_size != world_size:
        raise ValueError(
            f"replica_size must equal the world size ({world_size}) for {name!r} (one replica), "
            f"got {replica_size}" + ("; use 'parle' for several replicas" if name == "entropysgd" else "")
        )
    if not isinstance(replica_size, int) or isinstance(replica_size, bool) or replica_size < 1:
        raise ValueError(f"replica_size must be a positive integer, got {replica_size!r}")
    if world_size % replica_size != 0:
        raise ValueError(f"replica_size={replica_size} must divide the world size {world_size}")
    return replica_size


def _check_model_and_optimizer(model: object, optimizer: object) -> None:
    if not isinstance(model, DistributedDataParallel):
        raise ValueError(
            f"model must be a torch.nn.parallel.DistributedDataParallel, got {type(model).__name__}"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.module.named_parameters() if p.requires_grad and id(p) not in owned]
    if missing:
        raise ValueError(
            f"optimizer must own the model's parameters; it lacks {missing[:3]}"
            f"{' and more' if len(missing) > 3 else ''} (build it over model.parameters())"
        )


def _syncs_buffers_in_forward(model: DistributedDataParallel) -> bool:
    # Renamed from broadcast_buffers to forward_sync_buffers in torch 2.15.
    flag = getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", False))
    return bool(flag) and any(True for _ in model.module.buffers())


def _model_layout(model: DistributedDataParallel) -> list[tuple[str, str, tuple[int, ...]]]:
    named = list(model.module.named_parameters()) + list(model.module.named_buffers())
    return [(name, str(t.dtype), tuple(t.shape)) for name, t in named]


def build(
    name: str,
    model: DistributedDataParallel,
    optimizer: torch.optim.Optimizer,
    replica_size: int | None = None,
    *,
    timeout: timedelta = timedelta(minutes=10),
    check_steps: bool = True,
    check_finite: bool = False,
    **hparams: object,
) -> Algorithm:
    """Attach algorithm ``name`` to a DDP model; call the result's ``step()`` instead of ``optimizer.step()``.

    Or step ``algo.as_optimizer()``, an optimizer whose ``step()`` is ``algo.step()``, which
    GradScaler, LR schedulers and trainer libraries accept (docs/usage.md). From here on
    ``optimizer.step()`` itself raises: a bare step would skip the algorithm's exchange.

    Collective: every rank calls it with the same arguments (checked; a mismatch raises on every
    rank). It relocates the model's parameters and buffers into flat buffers, creates the replica
    process groups and registers the DDP communication hook.

    Args:
        name: a registered algorithm (``commhooks.algorithm_names()``: the built-ins of
            ``commhooks.ALGORITHMS`` and any added with ``commhooks.register``).
        model: a ``DistributedDataParallel`` over the model; build it with
            ``broadcast_buffers=False`` for algorithms that keep replicas apart.
        optimizer: any ``torch.optim.Optimizer`` over ``model.parameters()``.
        replica_size: ranks per replica (docs/README.md); default 1, and the world size for
            ``entropysgd`` (which is Parle with a single replica).
        timeout: the collective timeout of the process groups created here.
        check_steps: before every weight exchange and ``consensus()``, check (40 bytes, one
            gloo all-reduce on CPU) that every rank is at the same exchange of the same step;
            a rank that skipped or repeated a ``step()`` then raises
            ``commhooks.StepMismatchError`` on every rank instead of mixing the wrong weights
            or hanging (``commhooks.guards``).
        check_finite: also check every rank's weights for NaN/inf before each weight exchange
            (one pass over the weights and one host-device sync per exchange; DPSGD exchanges
            at every step) and raise ``commhooks.NonFiniteError`` on every rank. Without it,
            call ``algo.check_finite()`` where you log or evaluate.
        **hparams: the algorithm's hyper-parameters, named as in docs/README.md
            (see ``commhooks.config_class(name)``).
    """
    spec = algorithm_spec(name)
    _check_model_and_optimizer(model, optimizer)
    cfg = make_config(name, hparams)
    for flag, value in (("check_steps", check_steps), ("check_finite", check_finite)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    replica_size = resolve_replica_size(name, replica_size, world)
    if not spec.replicas_identical and world // replica_size > 1 and _syncs_buffers_in_forward(model):
        warnings.warn(
            f"{name}: the DDP model broadcasts rank 0's buffers at every forward, which replaces "
            "each replica's own BatchNorm statistics; construct DDP with broadcast_buffers=False "
            "(forward_sync_buffers=False from torch 2.15)",
            stacklevel=2,
        )
    cfg.warn_foot_guns(name, optimizer, world // replica_size)

    # Before any group is created: ranks that disagree must fail here, not hang in new_group.
    device = next(model.module.parameters()).device
    check_same_across_ranks(
        {"algorithm": name, "replica_size": replica_size, "hparams": asdict(cfg),
         "model": _model_layout(model), "checks": (check_steps, check_finite)},
        device=device if device.type == "cuda" else "cpu",
    )
    topo = make_topology(replica_size, timeout)
    weights = FlatWeights(model.module, buffers=cfg.buffers)
    meter = CommMeter()
    if spec.replicas_identical or topo.num_replicas == 1:
        meter.record_distance(0.0, 0)  # identical replicas by construction: a true zero
    grad_state = GradSyncState(group=None, meter=meter)
    exchanges = topo.num_replicas > 1 and not spec.replicas_identical
    guard = ExchangeGuard(topo.guard_group, weights, exchanges=exchanges, steps=check_steps, finite=check_finite)
    ctx = Context(weights=weights, topo=topo, meter=meter, grad_state=grad_state, optimizer=optimizer, guard=guard)
    components = spec.compose(cfg, ctx)
    model.register_comm_hook(grad_state, make_grad_hook(cfg, model.module.parameters()))
    return Algorithm(
        name=name,
        model=model,
        ctx=ctx,
        components=components,
        hparams={"replica_size": replica_size, **asdict(cfg)},
        replicas_identical=spec.replicas_identical,
    )
