"""QSGD (Alistarh et al., NeurIPS 2017, arXiv 1610.02132): the quantizer in-process, the hook on gloo ranks.

The quantizer is checked against its two defining properties (Lemma 3.1): unbiasedness, by a
statistical test whose tolerance comes from the exact per-coordinate variance and which fails for
a biased (nearest-rounding) quantizer, and the variance bound. The hook is checked against the
rule itself: every rank ends with the mean over its group of every rank's decoded code.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from commhooks.base.qsgd import (
    Layout,
    QSGDCode,
    QSGDCompressor,
    bucket_norms,
    decode,
    encode,
    num_levels,
    pack_bits,
    packed_size,
    payload_bytes,
    stream_seed,
    unpack_bits,
    variance_bound,
)
from commhooks.config import make_config

from spawn import run_ranks

# ---------------------------------------------------------------------------------------------
# The quantizer, in-process


@pytest.mark.parametrize("width", range(1, 9))
def test_packing_round_trip(width):
    gen = torch.Generator().manual_seed(width)
    for n in (1, 7, 8, 9, 1000, 1001):
        values = torch.randint(0, 1 << width, (n,), generator=gen)
        packed = pack_bits(values, width)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, width)
        assert packed.numel() <= math.ceil(n / 8) * width  # width bits per value, no more
        assert torch.equal(unpack_bits(packed, width, n).long(), values)
    with pytest.raises(ValueError, match="width"):
        pack_bits(torch.zeros(8, dtype=torch.int64), 9)


def _exact_moments(v: torch.Tensor, layout: Layout, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(|E Q(v)|, per-coordinate standard deviation of Q(v)) in closed form (float64)."""
    s = num_levels(bits)
    norms = layout.per_coordinate(bucket_norms(v, layout)).double()
    scaled = v.double().abs() * s / norms.clamp_min(1e-300)
    p = scaled - scaled.floor()
    return v.double().abs(), norms / s * (p * (1 - p)).sqrt()


def _bias_statistics(v: torch.Tensor, bits: int, bucket_size: int, draws: int, uniforms_of) -> tuple[float, float]:
    """Over ``N = draws`` quantizations of ``v``, how far the mean is from ``v``, in two units.

    Per coordinate: ``|mean_i - v_i| / t_i``, where ``t_i`` is Bernstein's deviation bound for the
    mean of ``N`` independent draws of variance ``sigma_i^2`` (exact, closed form) and range
    ``b_i = ||bucket|| / s``, at a failure probability ``delta / d`` per coordinate:
    ``t = ((2/3) L b + sqrt((2/3 L b)^2 + 8 N L sigma^2)) / (2N)`` with ``L = ln(2d / delta)``.
    An unbiased quantizer stays below 1 with probability ``1 - delta``; the largest value is
    returned. Norm-wise: ``||mean - v||^2`` over its expectation ``sum_i sigma_i^2 / N`` for an
    unbiased quantizer (about 1).
    """
    layout = Layout.of([v.numel()], bucket_size)
    total = torch.zeros(v.numel(), dtype=torch.float64)
    for i in range(draws):
        total += decode(encode(v, uniforms_of(i), layout, bits), layout).double()
    mean = total / draws
    _, sigma = _exact_moments(v, layout, bits)
    err = (mean - v.double()).abs()
    spread = layout.per_coordinate(bucket_norms(v, layout)).double() / num_levels(bits)
    L = math.log(2 * v.numel() / DELTA)
    a = 2 / 3 * L * spread
    t = (a + (a.pow(2) + 8 * draws * L * sigma.pow(2)).sqrt()) / (2 * draws)
    t += 1e-6 * spread  # float32 arithmetic: exact levels are exact only up to rounding
    return float((err / t).max()), float(err.pow(2).sum() / (sigma.pow(2).sum() / draws))


DELTA = 1e-6  # the chance that the per-coordinate check fails an unbiased quantizer


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mean_of_draws_is_the_gradient_and_a_biased_quantizer_fails(bits):
    v = torch.randn(2000, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 3, 2000)
    draws = 400
    gen = torch.Generator().manual_seed(7)
    worst, ratio = _bias_statistics(v, bits, 512, draws, lambda i: torch.rand(v.numel(), generator=gen))
    assert worst <= 1, worst
    # ||mean - v||^2 sums ~2000 independent terms of mean 1 (in units of its expectation): ~1 +- 0.05
    assert ratio < 1.3, ratio
    # The same check on nearest rounding (every uniform 0.5): biased, and caught both ways.
    worst, ratio = _bias_statistics(v, bits, 512, draws, lambda i: torch.full((v.numel(),), 0.5))
    assert worst > 2 and ratio > 10, (worst, ratio)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_variance_bound(bits):
    """``E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2`` (Lemma 3.1), in closed form and measured."""
    d = 512
    gen = torch.Generator().manual_seed(bits)
    vectors = {
        "gaussian": torch.randn(3 * d, generator=gen),
        "flat": torch.ones(3 * d),  # all |v_i| equal: the sqrt(d)/s regime at few bits
        "spiky": torch.randn(3 * d, generator=gen) ** 5,
        "short tail": torch.randn(d + 17, generator=gen),
    }
    bound = variance_bound(d, bits)
    for name, v in vectors.items():
        layout = Layout.of([v.numel()], d)
        _, sigma = _exact_moments(v, layout, bits)
        expected = float(sigma.pow(2).sum())
        assert expected <= bound * float(v.double().pow(2).sum()) * (1 + 1e-6), name
        draws = 200
        measured = sum(float((decode(encode(v, torch.rand(v.numel(), generator=gen), layout, bits), layout).double()
                              - v.double()).pow(2).sum()) for _ in range(draws)) / draws
        if expected > 0:
            assert abs(measured - expected) <= 0.1 * expected, (name, measured, expected)


def test_code_layout_and_bytes():
    """Buckets never span two parameters; the wire format is norms + (bits + 1) bits per coordinate."""
    sizes = [1000, 3, 512, 1025]
    layout = Layout.of(sizes, 512)
    assert layout.lengths.tolist() == [512, 488, 3, 512, 512, 512, 1]
    gen = torch.Generator().manual_seed(0)
    x, u = torch.randn(layout.numel, generator=gen), torch.rand(layout.numel, generator=gen)
    code = encode(x, u, layout, 8)
    payload = code.payload()
    assert payload.numel() == payload_bytes(layout, 8) == 4 * 7 + layout.numel + math.ceil(layout.numel / 8)
    assert payload.numel() <= 0.3 * 4 * layout.numel
    # the concatenation's code is every segment's own code: layout-independent quantization
    whole = decode(QSGDCode.from_payload(payload, layout, 8), layout)
    parts, start = [], 0
    for n in sizes:
        seg = Layout.of([n], 512)
        parts.append(decode(encode(x[start:start + n], u[start:start + n], seg, 8), seg))
        start += n
    assert torch.equal(whole, torch.cat(parts))
    # signs and zero buckets survive; a level is never above s
    z = torch.zeros(600)
    assert torch.equal(decode(encode(z, torch.rand(600), Layout.of([600], 512), 3), Layout.of([600], 512)), z)
    # levels that are exact (3/5 and 4/5 of s = 255) do not move; the sign is kept
    y, two = torch.tensor([-3.0, 4.0]), Layout.of([2], 512)
    assert torch.allclose(decode(encode(y, torch.rand(2), two, 8), two), y, rtol=1e-6, atol=0)


def test_draws_are_reproducible_and_distinct_across_ranks_steps_and_parameters():
    params = [torch.zeros(700), torch.zeros(30)]
    layout = Layout.of([700, 30], 512)

    def draws(rank, step, seed=0, order=(0, 1)):
        comp = QSGDCompressor(params, bits=8, bucket_size=512, seed=seed, rank=rank)
        sizes = [params[i].numel() for i in order]
        return comp.uniforms(list(order), Layout.of(sizes, 512), step, torch.device("cpu"))

    base = draws(0, 3)
    assert torch.equal(base, draws(0, 3))  # reproducible
    for other in (draws(1, 3), draws(0, 4), draws(0, 3, seed=1)):
        assert not torch.equal(base[:700], other[:700]) and not torch.equal(base[700:], other[700:])
    # a parameter's draws do not depend on the DDP bucket it sits in, nor its position there
    swapped = draws(0, 3, order=(1, 0))
    assert torch.equal(base[:700], swapped[30:]) and torch.equal(base[700:], swapped[:30])
    assert len({stream_seed(0, k, r, i) for k in range(20) for r in range(8) for i in range(20)}) == 20 * 8 * 20
    assert layout.num_buckets == 3


@pytest.mark.parametrize(("field", "value"), [
    ("qsgd_bits", 0), ("qsgd_bits", 9), ("qsgd_bits", 4.0), ("qsgd_bits", True),
    ("qsgd_bucket_size", 0), ("qsgd_bucket_size", "512"), ("qsgd_seed", 1.5), ("grad_compression", "qsgd8"),
])
def test_hyper_parameters_are_validated(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        make_config("cpsgd", {"period": 2, "grad_compression": "qsgd", field: value})


def test_recipe_flags():
    from recipes import cli
    from recipes.mnist import RECIPE

    args = cli.parse_args(RECIPE, ["--dataset", "digits", "--algo", "cpsgd", "--grad-compression", "qsgd",
                                   "--qsgd-bits", "4", "--qsgd-bucket-size", "128", "--qsgd-seed", "3"])
    passed, _, _ = cli.resolve_hparams(args, steps_per_epoch=10, total_steps=100)
    assert {k: passed[k] for k in ("grad_compression", "qsgd_bits", "qsgd_bucket_size", "qsgd_seed")} == {
        "grad_compression": "qsgd", "qsgd_bits": 4, "qsgd_bucket_size": 128, "qsgd_seed": 3}


# ---------------------------------------------------------------------------------------------
# The hook on gloo ranks


def _model() -> nn.Module:
    torch.manual_seed(4321)  # parameters larger than a bucket, and one smaller
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5))


def _batch(rank: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(555 + 31 * k + rank)
    return torch.randn(8, 40, generator=g), torch.randn(8, 5, generator=g)


def _loss(model: nn.Module, rank: int, k: int) -> torch.Tensor:
    x, y = _batch(rank, k)
    loss: torch.Tensor = ((model(x) - y) ** 2).mean()
    return loss


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _train(rank: int, world: int, name: str, hp: dict, *, steps: int, replica_size: int | None = None,
           save_at: int | None = None, state: dict | None = None) -> dict:
    """``steps`` steps of ``name``; per step, this rank's local gradient and what the hook left.

    Plain DDP (it rebuilds its buckets after the first iteration, so a resumed process sees
    another bucket layout at its first step than the uninterrupted one did).
    """
    model = _model()
    no_buffer_sync: dict[str, Any] = commhooks.ddp_buffer_sync_kwargs(False)
    ddp = DDP(model, **no_buffer_sync)
    if state is not None:  # after DDP's construction, which broadcasts rank 0's weights
        model.load_state_dict(state["model"])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    algo = commhooks.build(name, ddp, opt, replica_size, **hp)
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        algo.load_state_dict(state["algorithm"])
        start = state["step"]
    local, hooked, saved = [], [], None
    for k in range(start, steps):
        local.append(_flat(torch.autograd.grad(_loss(model, rank, k), list(model.parameters()))))
        opt.zero_grad()
        _loss(ddp, rank, k).backward()
        hooked.append(_flat(p.grad for p in model.parameters()))
        algo.step()
        if save_at is not None and k + 1 == save_at:
            saved = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
                     "algorithm": copy.deepcopy(algo.state_dict()), "step": k + 1}
    return {"local": local, "hooked": hooked, "params": _flat(model.parameters()), "stats": algo.stats(),
            "saved": saved}


SIZES = [p.numel() for p in _model().parameters()]


def _decoded(local: torch.Tensor, rank: int, step: int, bits: int, bucket_size: int, seed: int) -> torch.Tensor:
    """Rank ``rank``'s contribution at ``step``, quantized here with the library's pure functions."""
    layout = Layout.of(SIZES, bucket_size)
    comp = QSGDCompressor([torch.empty(n) for n in SIZES], bits=bits, bucket_size=bucket_size, seed=seed, rank=rank)
    uniforms = comp.uniforms(list(range(len(SIZES))), layout, step, torch.device("cpu"))
    return decode(encode(local, uniforms, layout, bits), layout)


def _expected_mean(results: list[dict], group: list[int], step: int, bits: int, bucket_size: int, seed: int) -> torch.Tensor:
    """The rule: the mean over the group of every member's decoded code, summed in rank order."""
    total = _decoded(results[group[0]]["local"][step], group[0], step, bits, bucket_size, seed)
    for r in group[1:]:
        total += _decoded(results[r]["local"][step], r, step, bits, bucket_size, seed)
    return total / len(group)


@pytest.mark.timeout(120)
def test_ranks_hold_the_mean_of_decoded_codes_and_send_under_0_3x_of_ssgd():
    steps, hp = 3, {"grad_compression": "qsgd", "qsgd_bits": 8}
    plain = run_ranks(_train, 3, "ssgd", {}, steps=steps)
    res = run_ranks(_train, 3, "ssgd", hp, steps=steps)
    for k in range(steps):
        expected = _expected_mean(res, [0, 1, 2], k, 8, 512, 0)
        for r in range(3):
            assert torch.equal(res[r]["hooked"][k], expected), (k, r)  # bit-identical on every rank
        # the rule is not a no-op: the quantized mean differs from the exact one, but little
        exact = sum(plain[r]["local"][k] for r in range(3)) / 3
        if k == 0:
            assert not torch.equal(expected, exact) and float((expected - exact).norm()) < 0.05 * float(exact.norm())
    n = sum(SIZES)
    layout = Layout.of(SIZES, 512)
    assert plain[0]["stats"]["comm_bytes"] == steps * n * 4
    assert res[0]["stats"]["comm_bytes"] == steps * payload_bytes(layout, 8)
    ratio = res[0]["stats"]["comm_bytes"] / plain[0]["stats"]["comm_bytes"]
    assert ratio <= 0.3, ratio


@pytest.mark.timeout(120)
def test_composes_with_warmup_and_replicas():
    """CPSGD, warm-up 2, replicas of 2 on 4 ranks, 3 bits, buckets of 100: quantized exchange over
    all ranks in the warm-up, inside the replica after it; with replicas of 1, nothing after it."""
    bits, bucket, seed, warmup, steps = 3, 100, 5, 2, 5
    hp = {"period": 2, "warmup_steps": warmup, "grad_compression": "qsgd", "qsgd_bits": bits,
          "qsgd_bucket_size": bucket, "qsgd_seed": seed}
    res = run_ranks(_train, 4, "cpsgd", hp, steps=steps, replica_size=2)
    for k in range(steps):
        for r in range(4):
            group = list(range(4)) if k < warmup else [r // 2 * 2, r // 2 * 2 + 1]
            assert torch.equal(res[r]["hooked"][k], _expected_mean(res, group, k, bits, bucket, seed)), (k, r)
    payload = payload_bytes(Layout.of(SIZES, bucket), bits)
    n = sum(SIZES)
    syncs = res[0]["stats"]["syncs"]
    assert syncs >= 1 and res[0]["stats"]["comm_bytes"] == steps * payload + syncs * n * 4
    solo = run_ranks(_train, 2, "cpsgd", hp, steps=steps, replica_size=1)
    for k in range(warmup, steps):  # local gradients, untouched: nothing travels, nothing quantized
        assert all(torch.equal(s["hooked"][k], s["local"][k]) for s in solo)
    assert solo[0]["stats"]["comm_bytes"] == warmup * payload + solo[0]["stats"]["syncs"] * n * 4


@pytest.mark.timeout(120)
def test_resume_is_exact():
    """Saved mid-period after the warm-up, rebuilt (fresh DDP buckets), loaded: the same run."""
    hp = {"period": 3, "warmup_steps": 2, "grad_compression": "qsgd", "qsgd_bits": 4, "qsgd_seed": 9}
    full = run_ranks(_train, 4, "cpsgd", hp, steps=8, replica_size=2, save_at=4)
    resumed = run_ranks(_resume, 4, hp, states=[f["saved"] for f in full])
    for f, r in zip(full, resumed, strict=True):
        assert torch.equal(f["params"], r["params"])
        assert all(torch.equal(a, b) for a, b in zip(f["hooked"][4:], r["hooked"], strict=True))
        assert f["stats"]["comm_bytes"] == r["stats"]["comm_bytes"]


def _resume(rank: int, world: int, hp: dict, *, states: list[dict]) -> dict:
    return _train(rank, world, "cpsgd", hp, steps=8, replica_size=2, state=states[rank])


# ---------------------------------------------------------------------------------------------
# Training: QSGD-8 reaches SSGD's accuracy on digits


def _digits(rank: int, world: int, epochs: int) -> dict:
    from recipes.data import TensorLoader, load_digits, val_batches
    from recipes.models import build_model

    data = load_digits()
    out = {}
    runs: dict[str, dict[str, Any]] = {"ssgd": {}, "qsgd": {"grad_compression": "qsgd", "qsgd_bits": 8}}
    for label, hp in runs.items():
        torch.manual_seed(0)
        model = build_model("lenet", data.in_channels, data.num_classes)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        algo = commhooks.build("ssgd", ddp, opt, **hp)
        loader = TensorLoader(data, batch_size=32, rank=rank, world_size=world)
        for epoch in range(epochs):
            if epoch == round(0.6 * epochs):  # the recipe's schedule: lr x0.1 at 60% of the run
                for group in opt.param_groups:
                    group["lr"] *= 0.1
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                algo.step()
        correct = torch.zeros(2)
        with torch.no_grad(), algo.consensus():
            for x, y in val_batches(data, rank, world, 256):
                correct += torch.tensor([float((model(x).argmax(1) == y).sum()), float(len(y))])
        torch.distributed.all_reduce(correct)
        out[label] = {"acc": float(correct[0] / correct[1]), "bytes": algo.stats()["comm_bytes"]}
    return out


@pytest.mark.timeout(180)
def test_digits_accuracy_matches_ssgd_with_under_0_3x_the_bytes():
    res = run_ranks(_digits, 2, 5, timeout=170)[0]
    assert res["ssgd"]["acc"] > 0.9, res
    assert abs(res["qsgd"]["acc"] - res["ssgd"]["acc"]) <= 0.01, res
    assert res["qsgd"]["bytes"] <= 0.3 * res["ssgd"]["bytes"], res
