"""A single-process simulation of the rules in docs/, and the distributed run it is compared with.

The simulation is a loop over replicas with one plain model and one optimizer each, written
from the specification and independent of ``commhooks`` (apart from the definition of the
random streams, ``step_seed``). ``train`` runs the same problem on real gloo ranks through
``commhooks.build``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from commhooks import step_seed

OPT: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}


def _mean_of(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean, summed left to right from 0 as the rules are written (the same rounding)."""
    items = list(tensors)
    total: Any = sum(items)
    mean: torch.Tensor = total / len(items)
    return mean


def make_model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def batch(rank: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + 97 * k + rank)
    return (torch.randn(3, 5, generator=g, dtype=torch.float64),
            torch.randn(3, 2, generator=g, dtype=torch.float64))


def loss_of(model: nn.Module, rank: int, k: int) -> torch.Tensor:
    x, y = batch(rank, k)
    loss: torch.Tensor = ((model(x) - y) ** 2).mean()
    return loss


def make_ddp(model: nn.Module) -> DDP:
    """DDP without forward buffer broadcast and without bucket rebuilding.

    DDP rebuilds its buckets after a process's first iteration, which moves gradients inside the
    bucket and changes gloo's summation order on more than two ranks: a resumed process would
    differ from an uninterrupted one by an ulp. ``find_unused_parameters=True`` keeps the
    initial buckets (the reducer only rebuilds without it).
    """
    no_buffer_sync: dict[str, Any] = commhooks.ddp_buffer_sync_kwargs(False)
    return DDP(model, find_unused_parameters=True, **no_buffer_sync)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def train(rank: int, world: int, name: str, hp: dict, *, steps: int, replica_size: int | None = None,
          opt: dict = OPT, save_at: int | None = None, state: dict | None = None,
          data_offset: int = 0) -> dict:
    """Run ``steps`` steps of ``name`` on this rank; return final parameters, stats, period trace.

    ``replica_size`` None is the algorithm's default (1; entropysgd: the world); ``state`` (a
    previous run's ``saved``) resumes from it; ``save_at`` saves after that step; rank r reads
    rank ``r + data_offset``'s data; ``peers`` lists, per step, the gossip peers of each
    ``GossipMixing`` component.
    """
    model = make_model()
    ddp = make_ddp(model)
    optimizer = torch.optim.SGD(ddp.parameters(), **opt)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
    algo = commhooks.build(name, ddp, optimizer, replica_size, **hp)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        algo.load_state_dict(state["algorithm"])
        start = state["step"]
    periods, peers, saved = [], [], None
    for k in range(start, steps):
        optimizer.zero_grad()
        loss_of(ddp, rank + data_offset, k).backward()
        algo.step()
        periods.append(algo.stats().get("period"))
        peers.append([list(c.peers) for c in algo.components if isinstance(c, commhooks.GossipMixing)])
        if save_at is not None and k + 1 == save_at:
            saved = {"model": {n: t.clone() for n, t in model.state_dict().items()},
                     "optimizer": copy.deepcopy(optimizer.state_dict()),
                     "algorithm": copy.deepcopy(algo.state_dict()), "step": k + 1}
    return {"params": flat(model.parameters()), "stats": algo.stats(), "periods": periods,
            "peers": peers, "saved": saved}


class Simulation:
    """``n`` replicas of ``m`` ranks, each replica a plain model with its own optimizer."""

    def __init__(self, world: int, replica_size: int, opt: dict = OPT):
        self.W, self.m, self.n = world, replica_size, world // replica_size
        self.models = [make_model() for _ in range(self.n)]
        self.opts = [torch.optim.SGD(mod.parameters(), **opt) for mod in self.models]
        self.lr, self.mu = opt["lr"], opt.get("momentum", 0.0)
        self.consensus: list[torch.Tensor] | None = None  # set by simulate() for periodic averaging

    def x(self, a: int) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.models[a].parameters()]

    def set_x(self, a: int, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.models[a].parameters(), values, strict=True):
                p.copy_(v)

    def grad(self, a: int, k: int, ranks: list[int] | None = None) -> list[torch.Tensor]:
        """Mean over ``ranks`` (default: replica a's) of the local gradients at ``x_a``."""
        ranks = ranks if ranks is not None else list(range(a * self.m, (a + 1) * self.m))
        model = self.models[a]
        total = [torch.zeros_like(p) for p in model.parameters()]
        for r in ranks:
            model.zero_grad()
            loss_of(model, r, k).backward()
            for t, p in zip(total, model.parameters(), strict=True):
                assert p.grad is not None
                t += p.grad
        return [t / len(ranks) for t in total]

    def global_grad(self, k: int) -> list[torch.Tensor]:
        """Mean over all W ranks of the local gradients, each at its own replica's weights."""
        per = [self.grad(a, k) for a in range(self.n)]
        return [_mean_of(g[i] for g in per) for i in range(len(per[0]))]

    def opt_step(self, a: int, point: list[torch.Tensor], grad: list[torch.Tensor]) -> None:
        """``x_a = OptStep(point, grad)`` with replica a's own optimizer state."""
        self.set_x(a, point)
        for p, g in zip(self.models[a].parameters(), grad, strict=True):
            p.grad = g.clone()
        self.opts[a].step()

    def mean_x(self) -> list[torch.Tensor]:
        xs = [self.x(a) for a in range(self.n)]
        return [_mean_of(x[i] for x in xs) for i in range(len(xs[0]))]

    def average(self) -> float:
        """``x_a = mean_a(x_a)``; returns ``S = mean_a ||x̄ - x_a||^2``."""
        mean = self.mean_x()
        s = sum(float(sum(((m - xi) ** 2).sum() for m, xi in zip(mean, self.x(a), strict=True)))
                for a in range(self.n)) / self.n
        for a in range(self.n):
            self.set_x(a, mean)
        return s

    def set_group_values(self, values: dict[str, float]) -> None:
        """Set param-group values (``lr``, ``momentum``) in every replica's optimizer, as a scheduler would."""
        for opt in self.opts:
            for group in opt.param_groups:
                group.update(values)
        self.lr, self.mu = values.get("lr", self.lr), values.get("momentum", self.mu)

    def flat_params(self, a: int) -> torch.Tensor:
        return flat(self.models[a].parameters())


def simulate(name: str, hp: dict, world: int, replica_size: int, steps: int,
             opt: dict = OPT, schedule=None) -> tuple[Simulation, list]:
    """Run the docs/ rule for ``name``; return the simulation and ADPSGD's period trace.

    ``schedule(k)``, if given, is the dict of param-group values (``lr``, ``momentum``) in force
    at step ``k``, as an LR scheduler stepped after every optimizer step leaves them; the rules
    read ``lr`` and ``mu`` at the step where they use them.
    """
    if name == "entropysgd":
        replica_size = world
    sim = Simulation(world, replica_size, opt)
    n, trace = sim.n, []
    q = 1 - 1 / (2 * hp["steps_per_epoch"]) if hp.get("scoping", True) and "steps_per_epoch" in hp else None

    def scoped(coef, cap, clock):
        return coef if q is None else min(cap, coef * q ** (-clock))

    # State of ADPSGD / CPSGD (and DiLoCo / SlowMo, CPSGD with an outer optimizer)
    c = 0
    p: Any = hp.get("p_init", hp.get("period", OUTER_PERIODS.get(name)))  # None for the other rules
    c2_samples: list[float] = []
    delay = hp.get("delay", 0)
    pending = None  # an overlapped average in flight: {"k", "lr", "xs"}
    has_outer = name in OUTER_DEFAULTS or hp.get("outer_lr", 1.0) != 1.0 or hp.get("outer_momentum", 0.0) != 0.0
    outer = OuterRule(name, hp, sim.x(0)) if has_outer else None

    def control(S: float, lr: float, k: int) -> None:
        """ADPSGD's controller, step 4 of its rule (docs/periodic.md)."""
        nonlocal p
        if k < hp["sample_steps"] or not c2_samples:
            c2_samples.append(S / lr)
        else:
            C2 = sum(c2_samples) / len(c2_samples)
            if S < hp.get("low", 0.7) * lr * C2:
                p += 1
            elif S > hp.get("high", 1.3) * lr * C2:
                p = max(hp.get("p_min", 1), p - 1)
            if hp.get("p_max") is not None:
                p = min(p, hp["p_max"])
    # State of Parle
    anchors = [sim.x(a) for a in range(n)]
    zs = [sim.x(a) for a in range(n)]
    vs = [[torch.zeros_like(t) for t in anchors[0]] for _ in range(n)]
    ref: list[torch.Tensor] = []  # the reference average, set at its first refresh

    for k in range(steps):
        if schedule is not None:
            sim.set_group_values(schedule(k))
        if name in ("ssgd", "ssgd-noise"):
            g = sim.global_grad(k)
            for a in range(n):
                sim.opt_step(a, sim.x(a), g)
            if name == "ssgd-noise":
                for a in range(n):
                    gen = torch.Generator().manual_seed(step_seed(hp.get("seed", 0), k))
                    noise = torch.randn(sum(t.numel() for t in sim.x(a)), generator=gen, dtype=torch.float64)
                    sizes = [t.numel() for t in sim.x(a)]
                    sim.set_x(a, [xi + hp["noise_std"] * ni.view_as(xi)
                                  for xi, ni in zip(sim.x(a), noise.split(sizes), strict=True)])
        elif name in PERIODIC:
            w = hp.get("warmup_steps", 0)
            if k < w:
                g = sim.global_grad(k)
                for a in range(n):
                    sim.opt_step(a, sim.x(a), g)
                if k + 1 == w and outer is not None:
                    outer.g = sim.x(0)  # the local phase starts from the (identical) replicas
            else:
                for a in range(n):
                    sim.opt_step(a, sim.x(a), sim.grad(a, k))
                c += 1
                if pending is not None and k == pending["k"] + delay:
                    # Overlapped averaging: x_a <- x_a + (T - x_s,a), T the (outer-stepped) mean.
                    xs = pending["xs"]
                    mean = sim_mean(xs)
                    S = sum(float(sum(((m - xi) ** 2).sum() for m, xi in zip(mean, xs[a], strict=True))) for a in range(n)) / n
                    target = outer.step(mean, pending["lr"]) if outer is not None else mean
                    for a in range(n):
                        sim.set_x(a, [xi + (t - si) for xi, t, si in zip(sim.x(a), target, xs[a], strict=True)])
                    if name == "adpsgd":
                        control(S, pending["lr"], pending["k"])
                    pending = None
                if c == p:
                    c = 0
                    if delay:
                        pending = {"k": k, "lr": sim.lr, "xs": [sim.x(a) for a in range(n)]}
                    else:
                        S = sim.average()
                        if outer is not None:
                            target = outer.step(sim.x(0), sim.lr)
                            for a in range(n):
                                sim.set_x(a, target)
                        if name == "adpsgd":
                            control(S, sim.lr, k)
            trace.append(p if name == "adpsgd" else None)
        elif name == "dpsgd":
            xs = [sim.x(a) for a in range(n)]
            gs = [sim.grad(a, k) for a in range(n)]
            top = hp.get("topology", "random-pair")
            for a in range(n):
                if n == 1:
                    mixed = xs[a]
                elif top == "all":
                    mixed = sim_mean(xs)
                elif top == "ring":
                    mixed = sim_mean([xs[a], xs[1 - a]]) if n == 2 else \
                        sim_mean([xs[(a - 1) % n], xs[a], xs[(a + 1) % n]])
                else:
                    perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(hp.get("seed", 0), k))).tolist()
                    pos = perm.index(a)
                    if pos == n - 1 and n % 2 == 1:
                        mixed = xs[a]
                    else:
                        b = perm[pos + 1] if pos % 2 == 0 else perm[pos - 1]
                        mixed = sim_mean([xs[a], xs[b]])
                sim.opt_step(a, mixed, gs[a])
        elif name == "easgd":
            period = hp.get("period", 1)
            if k % period == 0:
                ref = sim.mean_x()
            rho = scoped(hp.get("rho", 1.0), hp.get("rho_max", 10.0), k // period)
            for a in range(n):
                xa = sim.x(a)
                g = [gi + rho * (xi - ri) for gi, xi, ri in zip(sim.grad(a, k), xa, ref, strict=True)]
                sim.opt_step(a, xa, g)
        elif name in ("parle", "entropysgd"):
            L, alpha = hp.get("L", 25), hp.get("alpha", 0.75)
            s = k // L
            gamma = scoped(hp.get("gamma", 0.01), hp.get("gamma_max", 1.0), s)
            rho = scoped(hp.get("rho", 1.0), hp.get("rho_max", 10.0), s) if name == "parle" else 0.0
            for a in range(n):
                y = sim.x(a)
                g = [gi + gamma * (yi - xi) for gi, yi, xi in zip(sim.grad(a, k), y, anchors[a], strict=True)]
                sim.opt_step(a, y, g)
                zs[a] = [alpha * z + (1 - alpha) * yi for z, yi in zip(zs[a], sim.x(a), strict=True)]
            if (k + 1) % L == 0:
                ref = sim_mean(anchors)
                for a in range(n):
                    d = [(x - z) + rho * (x - r) for x, z, r in zip(anchors[a], zs[a], ref, strict=True)]
                    vs[a] = [sim.mu * v + di for v, di in zip(vs[a], d, strict=True)]
                    anchors[a] = [x - sim.lr * (di + sim.mu * v) for x, di, v in zip(anchors[a], d, vs[a], strict=True)]
                    sim.set_x(a, anchors[a])
                    zs[a] = [x.clone() for x in anchors[a]]
        else:
            raise AssertionError(name)
    if name in PERIODIC:
        # The model consensus() shows: the replicas' mean, with a correction still pending applied.
        if pending is None:
            sim.consensus = sim.mean_x()
        else:
            target = outer.step(sim_mean(pending["xs"]), pending["lr"]) if outer is not None else sim_mean(pending["xs"])
            sim.consensus = sim_mean([[xi + (t - si) for xi, t, si in zip(sim.x(a), target, pending["xs"][a], strict=True)]
                                      for a in range(n)])
    return sim, trace


PERIODIC = ("cpsgd", "adpsgd", "diloco", "slowmo")
# The library's defaults of the named outer optimizers: (period, outer_lr, outer_momentum, outer_nesterov).
OUTER_DEFAULTS = {"diloco": (500, 0.7, 0.9, True), "slowmo": (48, 1.0, 0.5, False)}
OUTER_PERIODS = {name: d[0] for name, d in OUTER_DEFAULTS.items()}


class OuterRule:
    """The outer optimizer of docs/periodic.md, written from the rule: ``g`` the global weights.

    DiLoCo: ``Δ = g - M``; ``m = μ m + Δ``; ``g = g - η (Δ + μ m)`` (Nesterov) or ``g - η m``.
    SlowMo: ``u = β u + Δ / γ``; ``g = g - α γ u`` (``γ`` the inner lr at the synchronisation).
    """

    def __init__(self, name: str, hp: dict, x0: list[torch.Tensor]):
        _, lr, mu, nesterov = OUTER_DEFAULTS.get(name, (None, 1.0, 0.0, False))
        self.lr, self.mu = hp.get("outer_lr", lr), hp.get("outer_momentum", mu)
        self.nesterov, self.normalize = hp.get("outer_nesterov", nesterov), name == "slowmo"
        self.g = [t.clone() for t in x0]
        self.m = [torch.zeros_like(t) for t in x0]

    def step(self, mean: list[torch.Tensor], inner_lr: float) -> list[torch.Tensor]:
        s = inner_lr if self.normalize else 1.0
        delta = [g - m for g, m in zip(self.g, mean, strict=True)]
        self.m = [self.mu * m + d / s for m, d in zip(self.m, delta, strict=True)]
        if self.nesterov:
            self.g = [g - self.lr * s * (d / s + self.mu * m) for g, d, m in zip(self.g, delta, self.m, strict=True)]
        else:
            self.g = [g - self.lr * s * m for g, m in zip(self.g, self.m, strict=True)]
        return [g.clone() for g in self.g]


def sim_mean(xs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [_mean_of(x[i] for x in xs) for i in range(len(xs[0]))]


def assert_matches(results: list[dict], sim: Simulation, tol: float = 1e-9) -> None:
    """Rank r's final parameters equal its replica's in the simulation, to ``tol``."""
    for rank, res in enumerate(results):
        expected = sim.flat_params(rank // sim.m)
        err = float((res["params"] - expected).abs().max())
        assert err < tol, f"rank {rank}: max |distributed - simulated| = {err:.3e}"
    assert math.isfinite(float(results[0]["params"].abs().max()))
