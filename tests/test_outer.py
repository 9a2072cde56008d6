"""Outer optimizers (DiLoCo, SlowMo) and overlapped averaging (``delay``) on 4 gloo ranks.

Against the single-process simulation of their rules (tests/reference.py, docs/periodic.md), and
the exact identities: DiLoCo with outer lr 1 and no momentum is CPSGD, ``delay=0`` is the
blocking rule, a resumed run (mid-period, and with an average in flight) is the uninterrupted one.
"""

import copy
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import MultiStepLR

import commhooks
from commhooks.config import CPSGDConfig, DiLoCoConfig, SlowMoConfig, make_config

from reference import OPT, assert_matches, batch, flat, loss_of, make_ddp, make_model, simulate, train
from spawn import run_ranks

STEPS = 12
WORLD = 4
ADAPTIVE = {"warmup_steps": 1, "p_init": 3, "p_min": 2, "sample_steps": 4, "low": 0.99, "high": 1.01}

# (algorithm, hyper-parameters): each against its simulated rule, with replica_size 1 and 2.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "diloco": ("diloco", {"period": 3, "warmup_steps": 2}),  # outer Nesterov, lr 0.7, momentum 0.9
    "diloco-heavy-ball": ("diloco", {"period": 3, "outer_nesterov": False, "outer_lr": 0.5}),
    "slowmo": ("slowmo", {"period": 3, "warmup_steps": 1}),  # slow momentum 0.5, lr 1
    "cpsgd+outer": ("cpsgd", {"period": 2, "outer_lr": 1.3, "outer_momentum": 0.4}),
    "adpsgd+outer": ("adpsgd", {**ADAPTIVE, "outer_lr": 0.8, "outer_momentum": 0.5, "outer_nesterov": True}),
    "cpsgd-delay1": ("cpsgd", {"period": 3, "warmup_steps": 1, "delay": 1}),
    "cpsgd-delay2": ("cpsgd", {"period": 3, "delay": 2, "log_every": 2}),
    "adpsgd-delay1": ("adpsgd", {**ADAPTIVE, "delay": 1}),
    "diloco-delay2": ("diloco", {"period": 3, "warmup_steps": 1, "delay": 2}),
    "slowmo-delay1": ("slowmo", {"period": 4, "delay": 1}),
}


def _runs(rank, world, cases, *, replica_size):
    return {case: train(rank, world, *CASES[case], steps=STEPS, replica_size=replica_size) for case in cases}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("replica_size", [1, 2])
def test_matches_simulation(replica_size):
    results = run_ranks(_runs, WORLD, list(CASES), replica_size=replica_size, timeout=110)
    for case, (name, hp) in CASES.items():
        sim, trace = simulate(name, hp, WORLD, replica_size, STEPS)
        runs = [r[case] for r in results]
        assert_matches(runs, sim)
        if name == "adpsgd":
            assert all(r["periods"] == trace for r in runs), (case, [r["periods"] for r in runs], trace)
    # log_every with delay: the distance of the last applied average (snapshot after step 8,
    # applied after step 10) is measured exactly, and labelled with the snapshot's step
    stats = results[0]["cpsgd-delay2"]["stats"]
    assert stats["consensus_step"] == 9 and stats["consensus_distance"] > 0 and stats["measure_bytes"] > 0


def test_the_cases_exercise_the_rules():
    """Each case really moves away from the plain average, and the adaptive ones adapt."""
    for case, (name, hp) in CASES.items():
        sim, trace = simulate(name, hp, WORLD, 1, STEPS)
        plain_hp = {k: v for k, v in hp.items() if not k.startswith("outer_") and k != "delay"}
        plain_name = "adpsgd" if name == "adpsgd" else "cpsgd"
        plain, _ = simulate(plain_name, plain_hp, WORLD, 1, STEPS)
        assert float((sim.flat_params(0) - plain.flat_params(0)).abs().max()) > 1e-6, case
        if name == "adpsgd":
            assert len(set(trace)) > 1, (case, trace)


def _identities(rank, world):
    out: dict[Any, dict] = {}
    for replica_size in (1, 2):
        base = {"period": 3, "warmup_steps": 2}
        out["cpsgd", replica_size] = train(rank, world, "cpsgd", base, steps=STEPS, replica_size=replica_size)
        diloco_as_cpsgd = {**base, "outer_lr": 1.0, "outer_momentum": 0.0}
        out["diloco", replica_size] = train(rank, world, "diloco", diloco_as_cpsgd, steps=STEPS, replica_size=replica_size)
        out["delay0", replica_size] = train(rank, world, "cpsgd", {**base, "delay": 0}, steps=STEPS, replica_size=replica_size)
    out["adpsgd"] = train(rank, world, "adpsgd", ADAPTIVE, steps=STEPS, replica_size=1)
    out["adpsgd-delay0"] = train(rank, world, "adpsgd", {**ADAPTIVE, "delay": 0}, steps=STEPS, replica_size=1)
    out["slowmo"] = train(rank, world, "slowmo", {"period": 3, "outer_momentum": 0.0}, steps=STEPS, replica_size=1)
    out["cpsgd3"] = train(rank, world, "cpsgd", {"period": 3}, steps=STEPS, replica_size=1)
    out["diloco3"] = train(rank, world, "diloco", {"period": 3}, steps=STEPS, replica_size=1)
    out["cpsgd3+outer"] = train(rank, world, "cpsgd", {"period": 3, "outer_lr": 0.7, "outer_momentum": 0.9,
                                                       "outer_nesterov": True}, steps=STEPS, replica_size=1)
    return out


@pytest.mark.timeout(120)
def test_identities_bit_for_bit():
    """DiLoCo(outer_lr=1, outer_momentum=0) is CPSGD and delay=0 is the blocking rule, bit for bit."""
    for res in run_ranks(_identities, WORLD, timeout=110):
        pairs: list[tuple[Any, Any]] = [(("diloco", m), ("cpsgd", m)) for m in (1, 2)] + [(("delay0", m), ("cpsgd", m)) for m in (1, 2)]
        pairs += [("adpsgd-delay0", "adpsgd"), ("slowmo", "cpsgd3")]  # SlowMo with alpha 1, beta 0: the average
        pairs += [("cpsgd3+outer", "diloco3")]  # diloco is cpsgd with DiLoCo's outer optimizer
        for a, b in pairs:
            assert torch.equal(res[a]["params"], res[b]["params"]), (a, b)
            for key in ("comm_bytes", "syncs"):
                assert res[a]["stats"][key] == res[b]["stats"][key], (a, b, key)
        assert res["adpsgd-delay0"]["periods"] == res["adpsgd"]["periods"]


def _scheduled(rank, world, name, hp, *, steps, milestone):
    """Train with an LR schedule (the inner lr halves after ``milestone`` steps)."""
    model = make_model()
    ddp = make_ddp(model)
    inner = torch.optim.SGD(ddp.parameters(), **OPT)
    algo = commhooks.build(name, ddp, inner, 1, **hp)
    opt = algo.as_optimizer()
    sched = MultiStepLR(opt, milestones=[milestone], gamma=0.5)
    for k in range(steps):
        opt.zero_grad()
        loss_of(ddp, rank, k).backward()
        opt.step()
        sched.step()
    return {"params": flat(model.parameters())}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("delay", [0, 2])
def test_slowmo_normalises_by_the_inner_lr_of_the_synchronisation(delay):
    hp, milestone = {"period": 3, "outer_momentum": 0.7, "delay": delay}, 5
    results = run_ranks(_scheduled, WORLD, "slowmo", hp, steps=STEPS, milestone=milestone)

    def schedule(k):
        return {"lr": OPT["lr"] * (0.5 if k >= milestone else 1.0)}

    sim, _ = simulate("slowmo", hp, WORLD, 1, STEPS, schedule=schedule)
    assert_matches(results, sim)
    unnormalised, _ = simulate("cpsgd", {"period": 3, "outer_momentum": 0.7, "delay": delay}, WORLD, 1, STEPS,
                               schedule=schedule)
    assert float((sim.flat_params(0) - unnormalised.flat_params(0)).abs().max()) > 1e-6  # the schedule matters


SAVE_AT = 5  # after step 4: mid-period for every case; an average in flight for the delayed ones
RESUME: dict[str, tuple[str, dict[str, Any], int]] = {
    "diloco": ("diloco", {"period": 3, "warmup_steps": 1}, 2),
    "slowmo": ("slowmo", {"period": 3, "warmup_steps": 1}, 1),
    "cpsgd-in-flight": ("cpsgd", {"period": 3, "warmup_steps": 1, "delay": 2, "log_every": 1}, 1),
    "adpsgd-in-flight": ("adpsgd", {**ADAPTIVE, "p_init": 3, "delay": 2, "p_min": 3}, 1),
    "diloco-in-flight": ("diloco", {"period": 3, "warmup_steps": 1, "delay": 2}, 2),
}


def _save_and_unsaved(rank, world):
    out: dict[Any, dict] = {}
    for case, (name, hp, m) in RESUME.items():
        out[case] = train(rank, world, name, hp, steps=STEPS, replica_size=m, save_at=SAVE_AT)
        out[case, "unsaved"] = train(rank, world, name, hp, steps=STEPS, replica_size=m)
    return out


def _resume(rank, world, states):
    return {case: train(rank, world, name, hp, steps=STEPS, replica_size=m, state=states[case][rank])
            for case, (name, hp, m) in RESUME.items()}


@pytest.mark.timeout(150)
def test_resume_mid_period_and_mid_flight_is_exact():
    full = run_ranks(_save_and_unsaved, WORLD, timeout=140)
    states = {case: [copy.deepcopy(r[case]["saved"]) for r in full] for case in RESUME}
    for case in RESUME:
        component_states = states[case][0]["algorithm"]["components"]
        if "in-flight" in case:  # the save really caught an average in flight
            assert component_states[1]["delayed"]["step"] is not None, case
    resumed = run_ranks(_resume, WORLD, states, timeout=140)
    for f, r in zip(full, resumed, strict=True):
        for case in RESUME:
            # saving resolves an in-flight average early: that changes no bit of the run
            assert torch.equal(f[case]["params"], f[case, "unsaved"]["params"]), case
            assert torch.equal(f[case]["params"], r[case]["params"]), case
            for key in ("syncs", "comm_bytes", "consensus_distance", "consensus_step"):
                a, b = f[case]["stats"][key], r[case]["stats"][key]
                assert a == b or (a != a and b != b), (case, key, a, b)
            assert f[case]["periods"][SAVE_AT:] == r[case]["periods"], case


def _consensus_with_pending(rank, world, name, hp, *, steps):
    model = make_model()
    ddp = make_ddp(model)
    opt = torch.optim.SGD(ddp.parameters(), **OPT)
    algo = commhooks.build(name, ddp, opt, 1, **hp)
    for k in range(steps):
        opt.zero_grad()
        loss_of(ddp, rank, k).backward()
        algo.step()
    local = flat(model.parameters())
    with algo.consensus():
        inside = flat(model.parameters())
    return {"local": local, "inside": inside, "after": flat(model.parameters())}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["cpsgd", "diloco"])
def test_consensus_includes_a_pending_correction(name):
    """The run ends one step after a synchronisation whose correction is two steps late."""
    hp, steps = {"period": 3, "delay": 2}, 7  # averages after steps 2 and 5; the second is pending
    results = run_ranks(_consensus_with_pending, WORLD, name, hp, steps=steps)
    sim, _ = simulate(name, hp, WORLD, 1, steps)
    expected = flat(sim.consensus)
    for res in results:
        assert torch.equal(res["after"], res["local"])  # consensus() restores the local weights
        assert float((res["inside"] - expected).abs().max()) < 1e-9
    if name == "diloco":  # the pending outer step moves the model away from the replicas' mean
        mean = sum(r["local"] for r in results) / WORLD
        assert float((results[0]["inside"] - mean).abs().max()) > 1e-6


BAD = [
    ("cpsgd", {"period": 3, "delay": 3}, "delay must be < period (3)"),
    ("cpsgd", {"period": 3, "delay": -1}, "delay must be an integer >= 0"),
    ("cpsgd", {"period": 3, "delay": 1.0}, "delay must be an integer >= 0"),
    ("adpsgd", {"sample_steps": 4, "p_min": 2, "delay": 2}, "delay must be < p_min (2)"),
    ("diloco", {"delay": 500}, "delay must be < period (500)"),
    ("diloco", {"outer_lr": 0.0}, "outer_lr must be a finite number > 0"),
    ("slowmo", {"outer_lr": float("inf")}, "outer_lr must be a finite number > 0"),
    ("diloco", {"outer_momentum": 1.0}, "outer_momentum must be in [0, 1)"),
    ("cpsgd", {"period": 2, "outer_momentum": -0.1}, "outer_momentum must be in [0, 1)"),
    ("slowmo", {"outer_nesterov": 1}, "outer_nesterov must be True or False"),
    ("slowmo", {"period": 0}, "period must be an integer >= 1"),
]


@pytest.mark.parametrize("name,hp,message", BAD)
def test_validation_names_the_argument(name, hp, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_config(name, hp)


def test_defaults_are_the_papers():
    diloco, slowmo = make_config("diloco", {}), make_config("slowmo", {})
    assert isinstance(diloco, DiLoCoConfig) and isinstance(slowmo, SlowMoConfig)
    assert (diloco.period, diloco.outer_lr, diloco.outer_momentum, diloco.outer_nesterov) == (500, 0.7, 0.9, True)
    assert (slowmo.period, slowmo.outer_lr, slowmo.outer_momentum, slowmo.outer_nesterov) == (48, 1.0, 0.5, False)
    cpsgd = make_config("cpsgd", {"period": 4})
    assert isinstance(cpsgd, CPSGDConfig)
    assert (cpsgd.delay, cpsgd.outer_lr, cpsgd.outer_momentum) == (0, 1.0, 0.0) and not cpsgd.has_outer_optimizer


def _batchnorm_delayed(rank, world, *, steps):
    torch.manual_seed(0)
    # momentum=1: after a forward the running statistics are exactly that batch's (closed form)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(5, momentum=1.0), torch.nn.Linear(5, 2)).double()
    ddp = make_ddp(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    algo = commhooks.build("cpsgd", ddp, opt, 1, period=2, delay=1)
    for k in range(steps):
        opt.zero_grad()
        x, y = batch(rank, k)
        ((ddp(x) - y) ** 2).mean().backward()
        algo.step()
    bn = model[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    return {"mean": bn.running_mean.clone(), "var": bn.running_var.clone(), "count": int(bn.num_batches_tracked)}


@pytest.mark.timeout(60)
def test_overlapped_average_corrects_buffers_too():
    """Averaged after step 1, corrected after step 2: running stats = own of step 2 + (mean - own) of step 1."""
    results = run_ranks(_batchnorm_delayed, WORLD, steps=3)

    def stats(rank, k):
        x = batch(rank, k)[0]
        return x.mean(0), x.var(0, unbiased=True)

    for i, key in enumerate(("mean", "var")):
        at_snapshot = [stats(r, 1)[i] for r in range(WORLD)]
        mean = sum(at_snapshot) / WORLD
        for rank, res in enumerate(results):
            expected = stats(rank, 2)[i] + (mean - at_snapshot[rank])
            assert float((res[key] - expected).abs().max()) < 1e-12, (key, rank)
    assert all(res["count"] == 3 for res in results)  # integer buffers: equal counts, zero correction
