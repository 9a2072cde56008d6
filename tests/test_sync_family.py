"""SSGD, SSGD*, CPSGD and ADPSGD on 4 gloo ranks against the simulation of their rules (docs/)."""

import itertools
from typing import Any

import pytest
import torch

from reference import OPT, assert_matches, flat, loss_of, make_ddp, make_model, simulate, train
from spawn import run_ranks

STEPS = 12
CASES: dict[str, dict[str, Any]] = {
    "ssgd": {},
    "ssgd-noise": {"noise_std": 0.01, "seed": 3},
    "cpsgd": {"period": 3, "warmup_steps": 2},
    # sample during the first syncs, then adapt: low/high chosen so the period moves both ways.
    "adpsgd": {"warmup_steps": 1, "p_init": 2, "sample_steps": 4, "low": 0.9, "high": 1.1},
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("replica_size", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_simulation(name, replica_size):
    results = run_ranks(train, 4, name, CASES[name], steps=STEPS, replica_size=replica_size)
    sim, _ = simulate(name, CASES[name], 4, replica_size, STEPS)
    assert_matches(results, sim)


def _plain_ddp(rank, world, *, steps):
    model = make_model()
    ddp = make_ddp(model)  # plain DDP: no hook
    opt = torch.optim.SGD(ddp.parameters(), **OPT)
    for k in range(steps):
        opt.zero_grad()
        loss_of(ddp, rank, k).backward()
        opt.step()
    return flat(model.parameters())


@pytest.mark.timeout(60)
def test_ssgd_equals_plain_ddp():
    plain = run_ranks(_plain_ddp, 4, steps=STEPS)
    ours = run_ranks(train, 4, "ssgd", {}, steps=STEPS, replica_size=1)
    for p, o in zip(plain, ours, strict=True):
        assert torch.equal(p, o["params"])  # the same arithmetic, bit for bit


@pytest.mark.timeout(60)
def test_cpsgd_period_one_equals_ssgd():
    ssgd = run_ranks(train, 4, "ssgd", {}, steps=STEPS, replica_size=1)
    cpsgd = run_ranks(train, 4, "cpsgd", {"period": 1}, steps=STEPS, replica_size=1)
    for s, c in zip(ssgd, cpsgd, strict=True):
        assert float((s["params"] - c["params"]).abs().max()) < 1e-12


@pytest.mark.timeout(60)
def test_adpsgd_period_trace_identical_and_moves_both_ways():
    hp = {"warmup_steps": 1, "p_init": 2, "sample_steps": 4, "low": 0.9, "high": 1.1}
    steps = 40
    results = run_ranks(train, 4, "adpsgd", hp, steps=steps, replica_size=1)
    traces = [r["periods"] for r in results]
    assert all(t == traces[0] for t in traces), traces
    _, expected = simulate("adpsgd", hp, 4, 1, steps)
    assert traces[0] == expected
    moves = [b - a for a, b in itertools.pairwise(traces[0]) if b != a]
    assert any(d > 0 for d in moves) and any(d < 0 for d in moves), traces[0]


@pytest.mark.timeout(60)
def test_adpsgd_without_thresholds_is_cpsgd():
    hp = {"p_init": 3, "sample_steps": 2, "low": 0.0, "high": float("inf")}
    ad = run_ranks(train, 4, "adpsgd", hp, steps=STEPS, replica_size=1)
    cp = run_ranks(train, 4, "cpsgd", {"period": 3}, steps=STEPS, replica_size=1)
    for a, c in zip(ad, cp, strict=True):
        assert torch.equal(a["params"], c["params"])
