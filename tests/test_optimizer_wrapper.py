"""``algo.as_optimizer()``: the user's loop calls ``optimizer.step()``, with schedulers, AMP, clipping, accumulation.

Every test runs 2 gloo ranks; each spawn runs several short trainings so the file stays fast.
"""

import math
from typing import Any

import pytest
import torch
from torch.amp import GradScaler
from torch.nn.utils import clip_grad_norm_
from torch.optim.lr_scheduler import MultiStepLR, OneCycleLR

import commhooks

from reference import (
    OPT,
    assert_matches,
    batch,
    flat,
    loss_of,
    make_ddp,
    make_model,
    simulate,
)
from spawn import run_ranks

WORLD, STEPS = 2, 8
CASES: dict[str, dict[str, Any]] = {
    "ssgd": {},
    "ssgd-noise": {"noise_std": 0.01, "seed": 3},
    "cpsgd": {"period": 2, "warmup_steps": 1},
    "adpsgd": {"warmup_steps": 1, "p_init": 2, "sample_steps": 4, "low": 0.9, "high": 1.1},
    "diloco": {"period": 2, "warmup_steps": 1},
    "slowmo": {"period": 3, "warmup_steps": 1, "delay": 1},
    "dpsgd": {"topology": "random-pair", "seed": 5},
    "easgd": {"rho": 0.5, "rho_max": 2.0, "period": 2, "steps_per_epoch": 3},
    "entropysgd": {"L": 3, "gamma": 0.05, "gamma_max": 0.3, "steps_per_epoch": 2},
    "parle": {"L": 3, "gamma": 0.05, "gamma_max": 0.3, "rho": 0.5, "rho_max": 2.0, "steps_per_epoch": 2},
}


def test_cases_cover_every_algorithm():
    assert set(CASES) == set(commhooks.ALGORITHMS)


def _build(name: str, hp: dict):
    model = make_model()
    ddp = make_ddp(model)
    inner = torch.optim.SGD(ddp.parameters(), **OPT)
    return model, ddp, inner, commhooks.build(name, ddp, inner, None, **hp)


def _scaler() -> GradScaler:
    return GradScaler("cpu", init_scale=2.0**10)  # a power of two: scaling is exact


WAYS = ("optimizer.step", "closure", "scaler.step", "scaler+unscale_+clip")


def _one_step(how, opt, algo, ddp, scaler, rank, k):
    if how == "closure":
        def closure():
            opt.zero_grad()
            loss = loss_of(ddp, rank, k)
            loss.backward()
            return loss
        opt.step(closure)
        return
    opt.zero_grad()
    loss = loss_of(ddp, rank, k)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if how == "algo.step":
        algo.step()
    elif how == "optimizer.step":
        opt.step()
    else:
        if how == "scaler+unscale_+clip":
            scaler.unscale_(opt)
            clip_grad_norm_(ddp.parameters(), max_norm=1e9)
        scaler.step(opt)
        scaler.update()


def _ways_of_stepping(rank, world, *, steps):
    """Each algorithm, stepped through algo.step() and four other ways, the same MultiStepLR schedule."""
    out = {}
    for name, hp in CASES.items():
        for how in ("algo.step", *WAYS):
            model, ddp, inner, algo = _build(name, hp)
            opt = inner if how == "algo.step" else algo.as_optimizer()
            sched = MultiStepLR(opt, milestones=[3], gamma=0.5)
            scaler = _scaler() if how.startswith("scaler") else None
            for k in range(steps):
                _one_step(how, opt, algo, ddp, scaler, rank, k)
                sched.step()
            out[(name, how)] = {"params": flat(model.parameters()), "stats": algo.stats()}
    return out


@pytest.mark.timeout(120)
def test_optimizer_step_is_algo_step_bit_for_bit_for_every_algorithm():
    results = run_ranks(_ways_of_stepping, WORLD, steps=STEPS, timeout=110)
    for rank, res in enumerate(results):
        for name in CASES:
            ref = res[(name, "algo.step")]
            assert ref["stats"]["step"] == STEPS
            for how in WAYS:
                got = res[(name, how)]
                assert torch.equal(got["params"], ref["params"]), f"{name}, {how}, rank {rank}"
                for key in ("comm_bytes", "syncs", "step"):
                    assert got["stats"][key] == ref["stats"][key], f"{name}, {how}, {key}"


def _bare_steps(rank, world):
    model, ddp, inner, algo = _build("cpsgd", {"period": 2})
    opt = algo.as_optimizer()
    for k in range(2):
        opt.zero_grad()
        loss_of(ddp, rank, k).backward()
        opt.step()
    inner.zero_grad()
    loss = loss_of(ddp, rank, 2)
    before = flat(model.parameters())
    momentum_before = [inner.state[p]["momentum_buffer"].clone() for p in ddp.parameters()]
    errors = []
    scaler = _scaler()
    scaler.scale(loss).backward()
    for bare_step in (inner.step, lambda: scaler.step(inner)):  # a habit, and a GradScaler given the inner one
        try:
            bare_step()
        except RuntimeError as e:
            errors.append(str(e))
    untouched = torch.equal(before, flat(model.parameters())) and all(
        torch.equal(m, inner.state[p]["momentum_buffer"]) for m, p in zip(momentum_before, ddp.parameters(), strict=True))
    k_after_refusals = algo.k
    algo.bare_step_guard.remove()
    inner.step()  # allowed on purpose now
    return {"errors": errors, "untouched": untouched, "k": k_after_refusals,
            "moved_after_remove": not torch.equal(before, flat(model.parameters()))}


@pytest.mark.timeout(60)
def test_bare_inner_optimizer_step_is_refused_at_the_first_call():
    for res in run_ranks(_bare_steps, WORLD):
        assert len(res["errors"]) == 2, res["errors"]
        for message in res["errors"]:
            assert "outside the algorithm" in message and "'cpsgd'" in message
            assert "algo.step()" in message and "algo.as_optimizer()" in message
        assert res["untouched"], "a refused step changed weights or optimizer state"
        assert res["k"] == 2
        assert res["moved_after_remove"]


SKIP = 3  # the data index whose step overflows on rank 0


def _overflow(rank, world, *, steps):
    out = {}
    for name, hp in CASES.items():
        for how in ("overflow", "never-happened"):
            model, ddp, _, algo = _build(name, hp)
            opt = algo.as_optimizer()
            scaler = _scaler()
            at_skip = {}
            for d in range(steps):
                if how == "never-happened" and d == SKIP:
                    continue
                opt.zero_grad()
                loss = loss_of(ddp, rank, d)
                if how == "overflow" and d == SKIP and rank == 0:
                    loss = loss * math.inf  # fp16-like overflow on this rank only
                scaler.scale(loss).backward()
                if how == "overflow" and d == SKIP:
                    at_skip = {"k": algo.k, "stats": algo.stats(), "scale": scaler.get_scale(),
                               "global_grads": algo.ctx.grad_state.group is not None,
                               "finite_here": all(bool(torch.isfinite(p.grad).all()) for p in ddp.parameters())}
                scaler.step(opt)
                if how == "overflow" and d == SKIP:
                    at_skip.update(k_after=algo.k, stats_after=algo.stats())
                scaler.update()
                if how == "overflow" and d == SKIP:
                    at_skip["scale_after"] = scaler.get_scale()
            out[(name, how)] = {"params": flat(model.parameters()), "stats": algo.stats(), "at_skip": at_skip}
    return out


@pytest.mark.timeout(120)
def test_grad_scaler_overflow_on_one_rank_is_skipped_by_every_rank():
    steps = 7
    results = run_ranks(_overflow, WORLD, steps=steps, timeout=110)
    grad_bytes = sum(p.numel() * p.element_size() for p in make_model().parameters())
    for name in CASES:
        for rank, res in enumerate(results):
            hit, never = res[(name, "overflow")], res[(name, "never-happened")]
            s = hit["at_skip"]
            # every rank skipped: the clock did not move and nothing was exchanged in the step
            assert s["k"] == s["k_after"] == SKIP, (name, rank, s["k"], s["k_after"])
            for key in ("comm_bytes", "syncs"):
                assert s["stats"][key] == s["stats_after"][key], (name, rank, key)
            # the run then is the run in which that step never happened
            assert torch.equal(hit["params"], never["params"]), (name, rank)
            assert hit["stats"]["step"] == never["stats"]["step"] == steps - 1
            assert hit["stats"]["syncs"] == never["stats"]["syncs"], (name, rank)
            extra = grad_bytes if s["global_grads"] else 0  # the skipped backward's gradient all-reduce
            assert hit["stats"]["comm_bytes"] == never["stats"]["comm_bytes"] + extra, (name, rank)
            # each scaler updated its scale as usual: backed off where its own gradients overflowed
            expected_scale = s["scale"] * (1.0 if s["finite_here"] else 0.5)
            assert s["scale_after"] == expected_scale, (name, rank)
        zero, one = results[0][(name, "overflow")]["at_skip"], results[1][(name, "overflow")]["at_skip"]
        assert not zero["finite_here"]
        if not one["global_grads"]:  # local gradients: only the agreement made rank 1 skip
            assert one["finite_here"], name


def _scheduled(rank, world, name, hp, *, steps, make_scheduler):
    model, ddp, _, algo = _build(name, hp)
    opt = algo.as_optimizer()
    sched = make_scheduler(opt)
    periods = []
    for k in range(steps):
        opt.zero_grad()
        loss_of(ddp, rank, k).backward()
        opt.step()
        sched.step()
        periods.append(algo.stats().get("period"))
    return {"params": flat(model.parameters()), "periods": periods}


def _schedule_values(make_scheduler, steps: int) -> list[dict]:
    """The (lr, momentum) a scheduler stepped after every optimizer step sets at each step."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], **OPT)
    sched = make_scheduler(opt)
    values = []
    for _ in range(steps):
        values.append({key: opt.param_groups[0][key] for key in ("lr", "momentum")})
        opt.step()  # no gradient: changes nothing, keeps the scheduler's order check quiet
        sched.step()
    return values


@pytest.mark.timeout(60)
def test_multisteplr_drives_adpsgd_period_like_the_simulation():
    hp, steps = CASES["adpsgd"], 30

    def make(opt):
        return MultiStepLR(opt, milestones=[10], gamma=0.1)

    results = run_ranks(_scheduled, WORLD, "adpsgd", hp, steps=steps, make_scheduler=make)
    values = _schedule_values(make, steps)
    sim, expected = simulate("adpsgd", hp, WORLD, 1, steps, schedule=values.__getitem__)
    for res in results:
        assert res["periods"] == expected
    assert_matches(results, sim)
    _, constant_lr = simulate("adpsgd", hp, WORLD, 1, steps)
    assert expected != constant_lr  # the schedule really moves the controller


@pytest.mark.timeout(60)
def test_onecyclelr_drives_parle_outer_step_like_the_simulation():
    hp, steps = CASES["parle"], 12

    def make(opt):  # warms up, then anneals; cycles momentum between 0.85 and 0.95 as well
        return OneCycleLR(opt, max_lr=0.3, total_steps=steps + 1)

    results = run_ranks(_scheduled, WORLD, "parle", hp, steps=steps, make_scheduler=make)
    values = _schedule_values(make, steps)
    assert len({v["momentum"] for v in values}) > 1 and len({v["lr"] for v in values}) > 1
    sim, _ = simulate("parle", hp, WORLD, 1, steps, schedule=values.__getitem__)
    assert_matches(results, sim)


def _grad_norm(optimizer) -> float:
    return math.sqrt(sum(float((p.grad ** 2).sum()) for g in optimizer.param_groups for p in g["params"]))


def _clipped_run(name, rank, steps, max_norm, mode, coefs):
    """``mode``: "before-step" clips after backward (records ``coefs``); "scaled-loss" scales step
    k's loss by ``coefs[k]`` instead; "pre-hook" clips in a step pre-hook of the inner optimizer."""
    model, ddp, inner, algo = _build(name, CASES[name])
    opt = algo.as_optimizer()
    params = list(ddp.parameters())
    seen = []  # the gradient norm the inner optimizer steps with

    def clip_total(optimizer, args, kwargs):
        clip_grad_norm_(params, max_norm)  # a step pre-hook must return None

    def record(optimizer, args, kwargs):
        seen.append(_grad_norm(optimizer))

    if mode == "pre-hook":
        inner.register_step_pre_hook(clip_total)
    inner.register_step_pre_hook(record)
    for k in range(steps):
        opt.zero_grad()
        loss = loss_of(ddp, rank, k)
        (coefs[k] * loss if mode == "scaled-loss" else loss).backward()
        if mode == "before-step":
            norm = float(clip_grad_norm_(params, max_norm))
            coefs.append(min(1.0, max_norm / (norm + 1e-6)))  # clip_grad_norm_'s own coefficient
        opt.step()
    return flat(model.parameters()), seen


def _clipping(rank, world, *, steps, max_norm):
    out = {}
    for name in ("easgd", "parle"):
        coefs: list[float] = []
        clipped, seen_a = _clipped_run(name, rank, steps, max_norm, "before-step", coefs)
        scaled, _ = _clipped_run(name, rank, steps, max_norm, "scaled-loss", coefs)
        total, seen_c = _clipped_run(name, rank, steps, max_norm, "pre-hook", coefs)
        out[name] = {"clipped": clipped, "scaled": scaled, "total": total,
                     "coefs": coefs, "seen_a": seen_a, "seen_c": seen_c}
    return out


@pytest.mark.timeout(60)
def test_clip_grad_norm_clips_the_data_gradient_and_a_pre_hook_clips_the_total():
    max_norm = 0.05
    for res in run_ranks(_clipping, WORLD, steps=STEPS, max_norm=max_norm):
        for name, r in res.items():
            assert min(r["coefs"]) < 0.5, name  # clipping is active
            # clipping == scaling the data gradient only: the pull/proximal term is not clipped
            assert float((r["clipped"] - r["scaled"]).abs().max()) < 1e-12, name
            assert max(abs(s / max_norm - 1) for s in r["seen_a"]) > 1e-3, (name, r["seen_a"])
            # the pre-hook sees the total gradient, and clips it (to max_norm less clip's 1e-6 guard)
            assert all(1 - 1e-4 < s / max_norm <= 1 for s in r["seen_c"]), (name, r["seen_c"])
            assert float((r["total"] - r["clipped"]).abs().max()) > 1e-9, name


def _accumulated(rank, world, *, steps):
    """Two micro-batches per step (rows 0-1 under no_sync, then row 2), losses summing to loss_of."""
    out = {}
    for name, hp in CASES.items():
        model, ddp, _, algo = _build(name, hp)
        opt = algo.as_optimizer()
        for k in range(steps):
            opt.zero_grad()
            x, y = batch(rank, k)
            with ddp.no_sync():
                (((ddp(x[:2]) - y[:2]) ** 2).sum() / y.numel()).backward()
            (((ddp(x[2:]) - y[2:]) ** 2).sum() / y.numel()).backward()
            opt.step()
        out[name] = {"params": flat(model.parameters())}
    return out


@pytest.mark.timeout(90)
def test_no_sync_accumulation_matches_one_step_on_the_mean_gradient():
    results = run_ranks(_accumulated, WORLD, steps=STEPS, timeout=80)
    for name, hp in CASES.items():
        sim, _ = simulate(name, hp, WORLD, 1, STEPS)
        assert_matches([r[name] for r in results], sim)
