"""Buffer policy at a sync, consensus() as an exact mean that restores, gradient compression."""

import math

import pytest
import torch
from torch import nn

import commhooks

from reference import make_ddp, make_model, train
from spawn import run_ranks


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()


def _buffers_at_sync(rank, world, *, buffers, replica_size):
    model = _bn_model()
    ddp = make_ddp(model)
    algo = commhooks.build("cpsgd", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), replica_size,
                           period=1, buffers=buffers)
    ddp(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    bn = model[1]
    with torch.no_grad():  # each rank sets its buffers to its rank just before the sync
        bn.running_mean.fill_(rank)
        bn.running_var.fill_(10.0 * rank)
        bn.num_batches_tracked.fill_(rank)
    algo.step()
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("replica_size", [1, 2])
def test_float_buffers_averaged_integer_buffers_maxed(replica_size):
    for mean, var, count in run_ranks(_buffers_at_sync, 4, buffers="average", replica_size=replica_size):
        assert torch.equal(mean, torch.full((3,), 1.5, dtype=torch.float64))
        assert torch.equal(var, torch.full((3,), 15.0, dtype=torch.float64))
        assert count == 3


@pytest.mark.timeout(60)
def test_local_buffers_never_communicated():
    for rank, (mean, _var, count) in enumerate(run_ranks(_buffers_at_sync, 4, buffers="local", replica_size=1)):
        assert torch.equal(mean, torch.full((3,), float(rank), dtype=torch.float64))
        assert count == rank


def _consensus(rank, world, name, hp):
    model = make_model()
    ddp = make_ddp(model)
    algo = commhooks.build(name, ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), **hp)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(rank))
    local = [p.detach().clone() for p in model.parameters()]
    with algo.consensus() as inside:
        assert inside is model
        averaged = [p.detach().clone() for p in model.parameters()]
    restored = [p.detach().clone() for p in model.parameters()]
    return averaged, all(torch.equal(a, b) for a, b in zip(local, restored, strict=True))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,hp", [("cpsgd", {"period": 100}), ("dpsgd", {}),
                                     ("easgd", {"steps_per_epoch": 4})])
def test_consensus_is_the_exact_mean_and_restores(name, hp):
    for averaged, restored in run_ranks(_consensus, 4, name, hp):
        assert restored
        assert all(torch.equal(a, torch.full_like(a, 1.5)) for a in averaged)


def _parle_consensus(rank, world):
    """Parle's consensus is the mean of the anchors, not of the inner iterates."""
    model = make_model()
    ddp = make_ddp(model)
    algo = commhooks.build("parle", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), L=5, steps_per_epoch=4)
    inner_loop = algo.components[-1]
    assert isinstance(inner_loop, commhooks.ProximalInnerLoop)
    anchors = inner_loop.anchor
    with torch.no_grad():
        for seg in anchors:
            seg.fill_(float(rank))
        for p in model.parameters():
            p.fill_(100.0)  # inner iterate: must not show through
    with algo.consensus():
        return [p.detach().clone() for p in model.parameters()]


@pytest.mark.timeout(60)
def test_parle_consensus_averages_anchors():
    for params in run_ranks(_parle_consensus, 4):
        assert all(torch.equal(p, torch.full_like(p, 1.5)) for p in params)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compressed_gradients_halve_bytes_and_stay_close(compression):
    plain = run_ranks(train, 2, "ssgd", {}, steps=6, replica_size=1)
    packed = run_ranks(train, 2, "ssgd", {"grad_compression": compression}, steps=6, replica_size=1)
    assert packed[0]["stats"]["comm_bytes"] * 4 == plain[0]["stats"]["comm_bytes"]  # float64 -> 16 bit
    tol = 1e-2 if compression == "bf16" else 1e-3
    err = float((packed[0]["params"] - plain[0]["params"]).abs().max())
    assert 0 < err < tol
    assert torch.equal(packed[0]["params"], packed[1]["params"])  # still synchronous


@pytest.mark.timeout(120)
def test_stats_count_bytes_and_syncs():
    res = run_ranks(train, 4, "cpsgd", {"period": 3}, steps=12, replica_size=1)
    n_params = res[0]["params"].numel()
    stats = res[0]["stats"]
    assert stats["syncs"] == 4
    # four weight all-reduces of float64 parameters and nothing else: a CPSGD sync is the mean
    assert stats["comm_bytes"] == 4 * n_params * 8 and stats["comm_seconds"] >= 0
    assert stats["measure_bytes"] == 0 and math.isnan(stats["consensus_distance"])  # not measured
    measured = run_ranks(train, 4, "cpsgd", {"period": 3, "log_every": 3}, steps=12, replica_size=1)[0]["stats"]
    assert measured["comm_bytes"] == stats["comm_bytes"]  # measurement is not the algorithm's
    assert measured["measure_bytes"] == 4 * 8  # one float64 scalar per sync
    # ADPSGD with thresholds that never move is CPSGD; it computes S exactly, as its own scalar
    adaptive = {"p_init": 3, "sample_steps": 2, "low": 0.0, "high": float("inf")}
    exact = run_ranks(train, 4, "adpsgd", adaptive, steps=12, replica_size=1)[0]["stats"]
    assert exact["comm_bytes"] == 4 * (n_params * 8 + 8) and exact["measure_bytes"] == 0
    assert exact["consensus_distance"] > 0 and measured["consensus_step"] == exact["consensus_step"] == 12
    # a model smaller than the probe's sample is measured exactly
    assert abs(measured["consensus_distance"] - exact["consensus_distance"]) <= 1e-12 * exact["consensus_distance"]
