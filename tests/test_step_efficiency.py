"""The cost of a step: exchange order, honest consensus figures, memory held and allocated."""

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from benchmarks.common import AllocationRecorder, held_bytes, model_bytes
from commhooks.ops.probe import ConsensusProbe

from reference import assert_matches, make_ddp, simulate, train
from spawn import run_ranks

STEPS = 12


def _record_p2p(rank, world, topology):
    """Train DPSGD with isend/irecv wrapped to record the order in which they are posted."""
    calls = []
    originals = {"isend": c10d.isend, "irecv": c10d.irecv}

    def recording(name):
        def post(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return post

    for name in originals:  # batch_isend_irecv checks its ops against the module's own names
        setattr(c10d, name, recording(name))
        setattr(dist, name, getattr(c10d, name))
    try:
        result = train(rank, world, "dpsgd", {"topology": topology}, steps=3, replica_size=1)
    finally:
        for name, fn in originals.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)
    return calls, result


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world,peers", [(2, 1), (3, 2)])
def test_exchange_posts_every_receive_before_its_sends(world, peers):
    out = run_ranks(_record_p2p, world, "ring")
    sim, _ = simulate("dpsgd", {"topology": "ring"}, world, 1, 3)
    assert_matches([r for _, r in out], sim)  # still the same mixing
    for calls, _ in out:
        # one flat group: per step, a receive from each peer, then a send to each
        assert calls == (["irecv"] * peers + ["isend"] * peers) * 3, calls


@pytest.mark.timeout(90)
def test_gossip_consensus_distance_is_measured_apart_and_never_a_false_zero():
    quiet = run_ranks(train, 4, "dpsgd", {"topology": "random-pair", "seed": 3}, steps=STEPS, replica_size=1)
    loud = run_ranks(train, 4, "dpsgd", {"topology": "random-pair", "seed": 3, "log_every": 2}, steps=STEPS, replica_size=1)
    sim, _ = simulate("dpsgd", {"topology": "random-pair", "seed": 3}, 4, 1, STEPS)
    mean = sum(sim.flat_params(a) for a in range(4)) / 4
    expected = sum(float(((mean - sim.flat_params(a)) ** 2).sum()) for a in range(4)) / 4
    n_params = quiet[0]["params"].numel()
    for q, m in zip(quiet, loud, strict=True):
        assert torch.equal(q["params"], m["params"])  # measuring does not touch training
        assert math.isnan(q["stats"]["consensus_distance"]) and q["stats"]["measure_bytes"] == 0
        assert q["stats"]["comm_bytes"] == m["stats"]["comm_bytes"]  # the algorithm's bytes alone
        # six measurements: the sampled weights (all of them, the model is small) and one scalar
        assert m["stats"]["measure_bytes"] == 6 * (n_params * 8 + 8)
        assert m["stats"]["consensus_step"] == STEPS
        assert expected > 0 and abs(m["stats"]["consensus_distance"] - expected) < 1e-12 * expected


def _probe_estimates(rank, world, *, draws, sample_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(200, 1))  # 20,401 parameters
    no_buffer_sync: dict[str, Any] = commhooks.ddp_buffer_sync_kwargs(False)
    ddp = DDP(model, **no_buffer_sync)
    algo = commhooks.build("cpsgd", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), period=10**6)
    with torch.no_grad():  # replica a: shared weights + a's own perturbation of known size
        gen = torch.Generator().manual_seed(100 + rank)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=0.1 * (rank + 1))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    mean = flat.clone()
    dist.all_reduce(mean)
    exact = float(((mean / world - flat) ** 2).sum())
    exact_t = torch.tensor([exact], dtype=torch.float64)
    dist.all_reduce(exact_t)
    probe = ConsensusProbe(algo.ctx.weights, sample_size=sample_size)
    estimates = []
    for k in range(draws):
        probe.measure(algo.ctx, k)
        estimates.append(algo.stats()["consensus_distance"])
    return float(exact_t) / world, estimates, algo.stats()


@pytest.mark.timeout(60)
def test_sampled_consensus_estimate_is_unbiased_and_kilobytes():
    draws, m = 40, 500
    for exact, estimates, stats in run_ranks(_probe_estimates, 4, draws=draws, sample_size=m):
        assert all(abs(e / exact - 1) < 0.35 for e in estimates), (exact, estimates)
        assert abs(sum(estimates) / draws / exact - 1) < 0.05, (exact, sum(estimates) / draws)
        assert len(set(estimates)) > draws // 2  # a fresh sample each time
        assert stats["measure_bytes"] == draws * (m * 8 + 8) and stats["comm_bytes"] == 0


# Memory beyond the model each algorithm needs with 4 replicas, in units of S (the parameters'
# bytes): a copy for the exchange/reference/noise, Parle's anchor, running average and momentum
# (3 S) plus the anchors' average in flight during the inner steps. Small fixed buffers (the
# chunk scratch of 256 KiB, the consensus probe's 115 KB) come on top.
HELD: list[tuple[str, dict[str, Any], int]] = [
    ("ssgd", {}, 0),
    ("ssgd-noise", {"noise_std": 0.01}, 1),
    ("cpsgd", {"period": 4, "log_every": 5}, 0),
    ("adpsgd", {"p_init": 2, "sample_steps": 4}, 1),
    # outer optimizers: the global weights and the momentum; overlap: the snapshot and the mean in flight
    ("diloco", {"period": 4}, 2),
    ("slowmo", {"period": 4, "outer_momentum": 0.0}, 1),
    ("cpsgd", {"period": 4, "delay": 2}, 2),
    ("adpsgd", {"p_init": 2, "p_min": 2, "sample_steps": 4, "delay": 1}, 2),
    ("diloco", {"period": 4, "delay": 1}, 4),
    ("dpsgd", {"topology": "random-pair", "log_every": 5}, 1),
    ("dpsgd", {"topology": "ring"}, 2),
    ("dpsgd", {"topology": "all"}, 1),
    ("easgd", {"period": 2, "steps_per_epoch": 4}, 1),
    ("entropysgd", {"L": 5, "steps_per_epoch": 4}, 3),
    ("parle", {"L": 5, "steps_per_epoch": 4}, 4),
]


def _memory(rank, world):
    out = []
    for name, hp, _ in HELD:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(512, 1024), nn.Tanh(), nn.Linear(1024, 512))  # 4.2 MB
        ddp = make_ddp(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        algo = commhooks.build(name, ddp, opt, world if name == "entropysgd" else 1, **hp)
        recorder = AllocationRecorder()
        x = torch.randn(4, 512, generator=torch.Generator().manual_seed(rank))
        for _ in range(10):  # syncs, an outer step, measurements, reference refreshes
            opt.zero_grad(set_to_none=True)
            ddp(x).square().mean().backward()
            with recorder, recorder.exclude_optimizer(opt):
                algo.step()
        size = model_bytes(model)
        out.append((held_bytes(algo) / size, recorder.largest / size, recorder.total / size / 10))
    return out


@pytest.mark.timeout(120)
def test_memory_held_is_the_algorithms_state_and_no_step_allocates_a_model():
    for rank_result in run_ranks(_memory, 4):
        for (name, hp, expected), (held, largest, per_step) in zip(HELD, rank_result, strict=True):
            label = f"{name} {hp}"
            assert expected <= held < expected + 0.1, f"{label}: holds {held:.3f} S, needs {expected} S"
            assert largest < 0.01 and per_step < 0.01, f"{label}: allocates {largest:.3f} S at once, {per_step:.3f} S per step"


@pytest.mark.timeout(30)
def test_allocation_recorder_sees_temporaries_only():
    """The recorder itself: a temporary is seen; in-place ops, views and ``out=`` are not."""
    x = torch.zeros(1000)
    recorder = AllocationRecorder()
    with recorder:
        x.add_(1.0)
        x[10:20].mul_(2.0)
        torch.sub(x, x, out=x)
    quiet = recorder.total
    with recorder:
        y = x - 1.0
    assert quiet == 0 and recorder.largest == recorder.total == y.numel() * y.element_size()


def _buffers_after_refresh(rank, world, name, hp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    ddp = make_ddp(model)
    algo = commhooks.build(name, ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), **hp)
    ddp(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None and bn.num_batches_tracked is not None
    with torch.no_grad():  # each rank's statistics after its forward: its rank
        bn.running_mean.fill_(rank)
        bn.num_batches_tracked.fill_(rank)
    algo.step()  # averaged while the optimizer steps, in place before the next forward
    return bn.running_mean.clone(), int(bn.num_batches_tracked)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,hp", [("easgd", {"steps_per_epoch": 4}), ("parle", {"L": 1, "steps_per_epoch": 4})])
def test_elastic_buffers_are_averaged_at_a_refresh(name, hp):
    for mean, count in run_ranks(_buffers_after_refresh, 4, name, hp):
        assert torch.equal(mean, torch.full((3,), 1.5, dtype=torch.float64)) and count == 3


def _noise_drawn_in_line(rank, world, hp, *, steps):
    from reference import OPT, flat, loss_of, make_model

    model = make_model()
    ddp = make_ddp(model)
    opt = torch.optim.SGD(ddp.parameters(), **OPT)
    algo = commhooks.build("ssgd-noise", ddp, opt, **hp)
    noise = algo.components[-1]
    assert isinstance(noise, commhooks.IsotropicNoise)
    noise.prefetch = False  # as on an accelerator: drawn inside step()
    for k in range(steps):
        opt.zero_grad()
        loss_of(ddp, rank, k).backward()
        algo.step()
    return flat(model.parameters())


@pytest.mark.timeout(60)
def test_noise_drawn_in_the_background_or_in_line_is_the_same():
    hp = {"noise_std": 0.01, "seed": 4}
    background = run_ranks(train, 2, "ssgd-noise", hp, steps=5, replica_size=1)
    in_line = run_ranks(_noise_drawn_in_line, 2, hp, steps=5)
    for b, i in zip(background, in_line, strict=True):
        assert torch.equal(b["params"], i)
