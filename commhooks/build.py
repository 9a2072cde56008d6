"""``commhooks.build``: validate, lay the weights out flat, register the hook, compose the algorithm."""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import asdict
from datetime import timedelta

import torch
from torch.nn.parallel import DistributedDataParallel

from .algorithm import Algorithm, Component, Context
from .averaging import AdaptivePeriod, ConstantPeriod, GradientScope, PeriodicAveraging
from .comm import CommMeter, make_topology
from .config import ALGORITHMS, CommonConfig, make_config
from .consistency import check_same_across_ranks
from .elastic import ElasticPull
from .entropy import ProximalInnerLoop
from .flat import FlatWeights
from .gossip import GossipMixing
from .grad_hooks import GradSyncState, make_grad_hook
from .guards import ExchangeGuard, warn_foot_guns
from .noise import IsotropicNoise
from .outer import OuterOptimizer

# Algorithms whose rule keeps every replica identical: buffers broadcast by DDP are harmless.
SYNCHRONOUS: tuple[str, ...] = ("ssgd", "ssgd-noise")


def ddp_buffer_sync_kwargs(enabled: bool) -> dict[str, bool]:
    """DDP's keyword for broadcasting rank 0's buffers at every forward, for this torch.

    ``broadcast_buffers`` was renamed ``forward_sync_buffers`` in torch 2.15. Pass
    ``enabled=False`` for every algorithm that keeps replicas apart (not in ``SYNCHRONOUS``).
    """
    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    return {key: enabled}


def resolve_replica_size(name: str, replica_size: int | None, world_size: int) -> int:
    """The ranks per replica: ``None`` means 1, or the world size for ``entropysgd`` (one replica).

    Raises ``ValueError`` naming ``replica_size`` if it is not a positive divisor of the world
    size, or not the world size for ``entropysgd``.
    """
    if replica_size is None:
        replica_size = world_size if name == "entropysgd" else 1
    if name == "entropysgd" and replica_size != world_size:
        raise ValueError(
            f"replica_size must equal the world size ({world_size}) for 'entropysgd' (one replica), "
            f"got {replica_size}; use 'parle' for several replicas"
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


def _components(name: str, cfg: CommonConfig, ctx: Context) -> list[Component]:
    h = asdict(cfg)
    if name in SYNCHRONOUS:
        comps: list[Component] = [GradientScope(ctx, global_until=math.inf)]
        if name == "ssgd-noise":
            comps.append(IsotropicNoise(ctx, h["noise_std"], h["seed"]))
        return comps
    if name in ("cpsgd", "diloco", "slowmo"):
        schedule = ConstantPeriod(period=h["period"])
    elif name == "adpsgd":
        schedule = AdaptivePeriod(
            period=h["p_init"], sample_steps=h["sample_steps"], low=h["low"], high=h["high"],
            p_min=h["p_min"], p_max=h["p_max"],
        )
    if name in ("cpsgd", "adpsgd", "diloco", "slowmo"):
        w = h["warmup_steps"]
        measure = h.get("log_every", 0)
        comps = [GradientScope(ctx, global_until=w), PeriodicAveraging(ctx, schedule, w, measure, h["delay"])]
        if name in ("diloco", "slowmo") or cfg.has_outer_optimizer:  # type: ignore[attr-defined]
            comps.append(OuterOptimizer(ctx, lr=h["outer_lr"], momentum=h["outer_momentum"], nesterov=h["outer_nesterov"],
                                        normalize=name == "slowmo", warmup_steps=w))
        return comps
    local = GradientScope(ctx, global_until=0)
    if name == "dpsgd":
        return [local, GossipMixing(ctx, h["topology"], h["seed"], h["log_every"])]
    if name == "easgd":
        return [local, ElasticPull(
            ctx, rho=h["rho"], rho_max=h["rho_max"], period=h["period"],
            steps_per_epoch=h["steps_per_epoch"], scoping=h["scoping"],
        )]
    assert name in ("entropysgd", "parle")
    return [local, ProximalInnerLoop(
        ctx, L=h["L"], alpha=h["alpha"], gamma=h["gamma"], gamma_max=h["gamma_max"],
        rho=h.get("rho", 0.0), rho_max=h.get("rho_max", 0.0),
        steps_per_epoch=h["steps_per_epoch"], scoping=h["scoping"],
    )]


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
        name: one of ``commhooks.ALGORITHMS``.
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
    if name not in ALGORITHMS:
        raise ValueError(f"name must be one of {ALGORITHMS}, got {name!r}")
    _check_model_and_optimizer(model, optimizer)
    cfg = make_config(name, hparams)
    for flag, value in (("check_steps", check_steps), ("check_finite", check_finite)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    replica_size = resolve_replica_size(name, replica_size, world)
    cfg.validate(world, replica_size)
    if name == "cpsgd" and cfg.period == 1:  # type: ignore[attr-defined]
        warnings.warn("cpsgd with period=1 is SSGD computed at higher cost: use 'ssgd'", stacklevel=2)
    if name not in SYNCHRONOUS and world // replica_size > 1 and _syncs_buffers_in_forward(model):
        warnings.warn(
            f"{name}: the DDP model broadcasts rank 0's buffers at every forward, which replaces "
            "each replica's own BatchNorm statistics; construct DDP with broadcast_buffers=False "
            "(forward_sync_buffers=False from torch 2.15)",
            stacklevel=2,
        )
    warn_foot_guns(name, asdict(cfg), optimizer, world // replica_size)

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
    if name in SYNCHRONOUS or topo.num_replicas == 1:
        meter.record_distance(0.0, 0)  # identical replicas by construction: a true zero
    grad_state = GradSyncState(group=None, meter=meter)
    guard = ExchangeGuard(topo.guard_group, weights, exchanges=topo.num_replicas > 1 and name not in SYNCHRONOUS, steps=check_steps, finite=check_finite)
    ctx = Context(weights=weights, topo=topo, meter=meter, grad_state=grad_state, optimizer=optimizer, guard=guard)
    components = _components(name, cfg, ctx)
    model.register_comm_hook(grad_state, make_grad_hook(cfg.grad_compression))
    return Algorithm(
        name=name,
        model=model,
        ctx=ctx,
        components=components,
        hparams={"replica_size": replica_size, **asdict(cfg)},
        replicas_identical=name in SYNCHRONOUS,
    )
