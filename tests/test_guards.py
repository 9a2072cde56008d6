"""Ranks out of step, non-finite weights, consensus() on some ranks only, uneven data, warnings."""

from __future__ import annotations

import math
import time
import warnings
from datetime import timedelta
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from commhooks.config import make_config

from reference import OPT, loss_of, make_model
from spawn import run_ranks

# The collective timeout given to build: an error that comes much sooner was not a timeout.
TIMEOUT_S = 60.0
FAST_S = 10.0
PARLE = {"L": 3, "alpha": 0.75, "gamma": 0.05, "gamma_max": 0.3, "rho": 0.5, "rho_max": 2.0,
         "steps_per_epoch": 4}
REMEDY = "Every rank must call algo.step() the same number of times"


def _build(name, hp, replica_size=1, opt=OPT, find_unused=False, **flags):
    model = make_model()
    # find_unused_parameters=True makes DDP all-reduce a map of used parameters in every backward.
    no_buffer_sync: dict[str, Any] = commhooks.ddp_buffer_sync_kwargs(False)
    ddp = DDP(model, find_unused_parameters=find_unused, **no_buffer_sync)
    optimizer = torch.optim.SGD(ddp.parameters(), **opt)
    algo = commhooks.build(name, ddp, optimizer, replica_size, timeout=timedelta(seconds=TIMEOUT_S),
                           **flags, **hp)
    return model, ddp, optimizer, algo


def _step(ddp, optimizer, algo, rank, k):
    optimizer.zero_grad()
    loss_of(ddp, rank, k).backward()
    algo.step()


def _out_of_step(rank, world, name, hp, *, steps, odd_rank, how, replica_size, find_unused):
    """Every rank runs ``steps`` steps then evaluates in consensus(); ``odd_rank`` skips or repeats one."""
    _, ddp, optimizer, algo = _build(name, hp, replica_size, find_unused=find_unused)
    attempts = 0  # step() calls begun
    progress = time.monotonic()  # when this rank last got through a step: the error must follow soon
    try:
        for k in range(steps):
            if rank == odd_rank and how == "skip" and k == 1:
                continue  # e.g. a batch this rank lacks
            attempts += 1
            _step(ddp, optimizer, algo, rank, k)
            if rank == odd_rank and how == "repeat" and k == 1:
                attempts += 1
                algo.step()  # a second step() for one backward
            progress = time.monotonic()
        with algo.consensus():
            pass
    except commhooks.StepMismatchError as err:
        return {"error": str(err), "seconds": time.monotonic() - progress, "attempts": attempts}
    return {"error": None, "attempts": attempts}


# name, hparams, world, steps, replica_size, DDP's find_unused_parameters
CASES = {
    # the odd rank's last step is a sync on the others / is not
    "cpsgd-sync": ("cpsgd", {"period": 3}, 2, 6, 1, False),
    "cpsgd-local": ("cpsgd", {"period": 3}, 2, 7, 1, False),
    "dpsgd-random-pair": ("dpsgd", {"topology": "random-pair", "seed": 3}, 4, 5, 1, False),
    "dpsgd-ring": ("dpsgd", {"topology": "ring"}, 4, 5, 1, False),
    "parle-outer": ("parle", PARLE, 2, 6, 1, False),  # the others' last step is an outer step
    "parle-inner": ("parle", PARLE, 3, 5, 1, False),
    # DDP communicates inside every backward: the check must come before it
    "cpsgd-find-unused": ("cpsgd", {"period": 3}, 2, 7, 1, True),
    "cpsgd-warmup": ("cpsgd", {"period": 3, "warmup_steps": 8}, 2, 7, 1, False),
    "parle-replicas-of-2": ("parle", PARLE, 4, 5, 2, False),
    "dpsgd-replicas-of-2": ("dpsgd", {"topology": "ring"}, 4, 5, 2, True),
}
REPEAT = ("cpsgd-sync", "dpsgd-ring")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case, how", [(c, "skip") for c in CASES] + [(c, "repeat") for c in REPEAT])
def test_a_rank_out_of_step_fails_fast_on_every_rank(case, how):
    name, hp, world, steps, replica_size, find_unused = CASES[case]
    odd = world - 1
    results = run_ranks(_out_of_step, world, name, hp, steps=steps, odd_rank=odd, how=how, replica_size=replica_size,
                        find_unused=find_unused, timeout=TIMEOUT_S - 5)
    assert [r["attempts"] for r in results] == [steps] * odd + [steps + (1 if how == "repeat" else -1)]
    for rank, res in enumerate(results):
        assert res["error"] is not None, f"rank {rank} did not notice"
        assert REMEDY in res["error"] and "min_steps" in res["error"]
        assert res["seconds"] < FAST_S, res  # an answer, not the 60 s collective timeout
        # Every rank names where every rank was: the odd one is recognisably elsewhere.
        assert res["error"] == results[0]["error"]
    assert "consensus() at step" in results[0]["error"] and f"rank {odd}: " in results[0]["error"]


def _consensus_on_rank_zero_only(rank, world, when):
    """Rank 0 alone evaluates in consensus(): mid-training while the others train on, or at the end."""
    _, ddp, optimizer, algo = _build("cpsgd", {"period": 2})
    try:
        for k in range(4):
            if rank == 0 and when == "mid-training" and k == 2:
                with algo.consensus(timeout=timedelta(seconds=3)):
                    pass
            _step(ddp, optimizer, algo, rank, k)
        if rank == 0 and when == "at the end":
            with algo.consensus(timeout=timedelta(seconds=3)):
                pass
    except commhooks.StepMismatchError as err:
        return str(err)
    return None


@pytest.mark.timeout(60)
def test_consensus_entered_by_one_rank_while_others_train_fails_on_every_rank():
    errors = run_ranks(_consensus_on_rank_zero_only, 3, "mid-training")
    assert all(e is not None for e in errors)
    assert "rank 0: consensus() at step 2" in errors[0]
    assert "ranks 1, 2: periodic average at step 3" in errors[0]
    assert all("enter consensus() and check_finite() together" in e for e in errors)


@pytest.mark.timeout(60)
def test_consensus_entered_by_one_rank_alone_fails_within_its_timeout():
    start = time.monotonic()
    errors = run_ranks(_consensus_on_rank_zero_only, 2, "at the end")
    assert errors[1] is None  # it never entered
    assert "rank 0 waited at consensus() at step 4, but not every rank reached" in errors[0]
    assert "within 3 s" in errors[0]
    assert "enter consensus() and check_finite() together" in errors[0]
    assert time.monotonic() - start < TIMEOUT_S / 2


def _train_and_count(rank, world, name, hp, *, steps, check_steps, find_unused):
    model, ddp, optimizer, algo = _build(name, hp, find_unused=find_unused, check_steps=check_steps)
    for k in range(steps):
        _step(ddp, optimizer, algo, rank, k)
    guard = algo.ctx.guard
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"params": params, "stats": algo.stats(), "checks": guard.checks, "bytes": guard.bytes_sent}


STEPS = 9


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, hp, find_unused, checks", [
    ("cpsgd", {"period": 3}, False, STEPS // 3),  # one per sync
    ("dpsgd", {"topology": "ring"}, False, STEPS),  # one per gossip step
    ("parle", PARLE, False, STEPS // PARLE["L"]),  # one per outer step
    ("cpsgd", {"period": 3}, True, STEPS),  # DDP communicates in every backward: one per step
])
def test_the_check_costs_40_bytes_a_time_and_changes_nothing(name, hp, find_unused, checks):
    on = run_ranks(_train_and_count, 3, name, hp, steps=STEPS, check_steps=True, find_unused=find_unused)
    off = run_ranks(_train_and_count, 3, name, hp, steps=STEPS, check_steps=False, find_unused=find_unused)
    syncs = {"cpsgd": STEPS // 3, "dpsgd": STEPS, "parle": STEPS // PARLE["L"]}[name]
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a["params"], b["params"])
        assert a["stats"]["comm_bytes"] == b["stats"]["comm_bytes"]  # not the algorithm's traffic
        assert a["stats"]["syncs"] == b["stats"]["syncs"] == syncs
        assert a["checks"] == checks and a["bytes"] == 40 * checks
        assert b["checks"] == 0


def _diverge(rank, world, name, hp, *, bad_rank, bad_after, explicit):
    _, ddp, optimizer, algo = _build(name, hp, check_finite=not explicit)
    try:
        for k in range(8):
            _step(ddp, optimizer, algo, rank, k)
            if rank == bad_rank and k + 1 == bad_after:
                with torch.no_grad():
                    next(ddp.parameters())[0, 0] = math.nan
            if explicit:
                algo.check_finite()
    except commhooks.NonFiniteError as err:
        return {"error": str(err), "step": algo.k}
    return {"error": None}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, hp, where", [
    ("cpsgd", {"period": 2}, "periodic average at step 3"),  # syncs in steps 1, 3, 5, ...
    ("dpsgd", {"topology": "random-pair"}, "gossip exchange at step 3"),
    ("easgd", {"period": 2, "steps_per_epoch": 4}, "Elastic-SGD reference average at step 4"),
    ("parle", PARLE, "Parle anchor average at step 5"),  # outer steps in steps 2, 5, ...
])
def test_non_finite_weights_stop_every_rank_at_the_next_exchange(name, hp, where):
    results = run_ranks(_diverge, 3, name, hp, bad_rank=1, bad_after=3, explicit=False)
    for res in results:
        assert res["error"] is not None
        assert where in res["error"]
        assert "rank 1: parameters of flat group 0 (torch.float64, cpu)" in res["error"]
        assert "rank 0" not in res["error"] and "rank 2" not in res["error"]


@pytest.mark.timeout(60)
def test_check_finite_on_demand_names_the_step_on_every_rank():
    results = run_ranks(_diverge, 2, "dpsgd", {"topology": "ring"}, bad_rank=0, bad_after=4, explicit=True)
    for res in results:
        assert "non-finite weights (NaN or inf), found at check_finite() at step 4" in res["error"]
        assert "rank 0: parameters of flat group 0" in res["error"]
        assert res["step"] == 4
    healthy = run_ranks(_diverge, 2, "dpsgd", {"topology": "ring"}, bad_rank=0, bad_after=100, explicit=True)
    assert all(r["error"] is None for r in healthy)


def _min_steps(rank, world, batches):
    return commhooks.min_steps(batches[rank])


@pytest.mark.timeout(60)
def test_min_steps_is_the_smallest_count_on_every_rank():
    assert run_ranks(_min_steps, 3, [5, 3, 4]) == [3, 3, 3]
    with pytest.raises(ValueError, match="num_local_batches"):
        commhooks.min_steps(-1)


def test_pull_stability_bound_is_where_sgd_on_the_pull_starts_to_diverge():
    def grows(a: float, mu: float, nesterov: bool) -> bool:
        x = torch.ones(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([x], lr=a, momentum=mu, nesterov=nesterov)
        for _ in range(200):
            x.grad = x.detach().clone()  # the pull on a replica difference: curvature 1
            opt.step()
        return not bool(x.detach().abs() < 1)

    for mu, nesterov in [(0.9, True), (0.5, True), (0.9, False), (0.0, False)]:
        bound = commhooks.pull_stability_bound(mu, nesterov)
        assert not grows(0.9 * bound, mu, nesterov) and grows(1.1 * bound, mu, nesterov)
    assert abs(commhooks.pull_stability_bound(0.9, True) - 1.357) < 1e-3


def _foot_gun_warnings(name: str, hp: dict, opt: dict, num_replicas: int = 2) -> list[str]:
    """What build warns about ``name`` with ``hp`` and an SGD optimizer ``opt`` (no process group needed)."""
    optimizer = torch.optim.SGD(make_model().parameters(), **opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_config(name, hp).warn_foot_guns(name, optimizer, num_replicas)
    return [str(w.message) for w in caught]


def _recipe_cases() -> dict:
    from recipes import cifar, mnist
    from recipes.cli import algo_defaults

    cases = {}
    for recipe in (mnist.RECIPE, cifar.RECIPE):
        for dataset, d in recipe.datasets.items():
            opt = {"lr": d.lr, "momentum": d.momentum, "nesterov": True, "weight_decay": d.weight_decay}
            for algo in ("easgd", "parle", "entropysgd"):
                for B in (3, 40, 400):
                    hp, _ = algo_defaults(algo, steps_per_epoch=B, total_steps=5 * B, seed=0)
                    cases[f"{recipe.name}-{dataset}-{algo}-{B}"] = (algo, hp, opt)
    return cases


@pytest.mark.timeout(60)
def test_foot_gun_warnings_fire_and_the_recipe_defaults_stay_quiet():
    sgd = {"lr": 0.1, "momentum": 0.9, "nesterov": True}
    heavy_ball = {"lr": 0.1, "momentum": 0.9}
    cases = {
        "parle-short-epoch": ("parle", dict(PARLE, steps_per_epoch=2), sgd),
        "entropysgd-short-epoch": ("entropysgd", {"L": 5, "steps_per_epoch": 4}, sgd),
        "parle-strong-pull": ("parle", dict(PARLE, rho_max=14.0), sgd),  # 1.4 > 1.357
        "parle-fine": ("parle", dict(PARLE, rho_max=13.0), sgd),  # 1.3
        "easgd-nesterov": ("easgd", {"rho_max": 14.0, "steps_per_epoch": 4}, sgd),
        "easgd-heavy-ball": ("easgd", {"rho_max": 14.0, "steps_per_epoch": 4}, heavy_ball),  # < 3.8
        "easgd-unscoped": ("easgd", {"rho": 14.0, "rho_max": 14.0, "scoping": False}, sgd),
    }
    recipe = _recipe_cases()
    # two ranks, one replica each (entropysgd: one replica of both)
    got = {label: _foot_gun_warnings(name, hp, opt, 1 if name == "entropysgd" else 2)
           for label, (name, hp, opt) in {**cases, **recipe}.items()}
    assert "steps_per_epoch=2 < L=3" in got["parle-short-epoch"][0]
    assert "steps_per_epoch=4 < L=5" in got["entropysgd-short-epoch"][0]
    assert "lr * rho_max = 0.1 * 14 = 1.4 exceeds 1.36" in got["parle-strong-pull"][0]
    assert "lr * rho_max = 0.1 * 14" in got["easgd-nesterov"][0]
    assert "lr * rho = 0.1 * 14" in got["easgd-unscoped"][0]
    assert got["parle-fine"] == [] and got["easgd-heavy-ball"] == []
    assert {k: v for k, v in got.items() if k in recipe and v} == {}
