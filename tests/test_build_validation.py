"""Bad input to ``commhooks.build`` raises ValueError naming the argument; warnings where due."""

import warnings

import pytest
import torch
from torch import nn

import commhooks
from reference import OPT, make_ddp, make_model
from spawn import run_ranks

# (case id, algorithm, replica_size, hparams, the argument the message must name)
BAD = [
    ("period<1", "cpsgd", 1, {"period": 0}, "period"),
    ("warmup<0", "cpsgd", 1, {"period": 2, "warmup_steps": -1}, "warmup_steps"),
    ("adpsgd-warmup<0", "adpsgd", 1, {"sample_steps": 4, "warmup_steps": -2}, "warmup_steps"),
    ("low>=high", "adpsgd", 1, {"sample_steps": 4, "low": 1.3, "high": 1.3}, "low"),
    ("noise_std<=0", "ssgd-noise", 1, {"noise_std": 0.0}, "noise_std"),
    ("noise_std-missing", "ssgd-noise", 1, {}, "noise_std"),
    ("replica_size-divides", "cpsgd", 3, {"period": 2}, "replica_size"),
    ("unknown-hparam", "cpsgd", 1, {"period": 2, "perod": 3}, "perod"),
    ("unknown-name", "localsgd", 1, {}, "name"),
    ("topology", "dpsgd", 1, {"topology": "star"}, "topology"),
    ("rho<0", "easgd", 1, {"rho": -1.0, "steps_per_epoch": 5}, "rho"),
    ("scoping-needs-B", "parle", 1, {}, "steps_per_epoch"),
    ("alpha", "parle", 1, {"alpha": 1.0, "steps_per_epoch": 5}, "alpha"),
    ("entropysgd-replicas", "entropysgd", 1, {"steps_per_epoch": 5}, "replica_size"),
    ("buffers", "cpsgd", 1, {"period": 2, "buffers": "sync"}, "buffers"),
    ("compression", "ssgd", 1, {"grad_compression": "int8"}, "grad_compression"),
]


def _try_all(rank, world):
    messages = {}
    for case, name, replica_size, hp, _ in BAD:
        ddp = make_ddp(make_model())
        opt = torch.optim.SGD(ddp.parameters(), **OPT)
        try:
            commhooks.build(name, ddp, opt, replica_size, **hp)
            messages[case] = None
        except ValueError as err:
            messages[case] = str(err)
    ddp = make_ddp(make_model())
    other = torch.optim.SGD(nn.Linear(2, 2).double().parameters(), lr=0.1)
    try:
        commhooks.build("ssgd", ddp, other)
    except ValueError as err:
        messages["optimizer"] = str(err)
    plain = make_model()
    try:
        commhooks.build("ssgd", plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    except ValueError as err:
        messages["model"] = str(err)
    return messages


@pytest.fixture(scope="module")
def messages():
    return run_ranks(_try_all, 2, timeout=90)[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case,argument", [(c[0], c[4]) for c in BAD] + [("optimizer", "optimizer"), ("model", "model")])
def test_bad_input_raises_value_error_naming_the_argument(messages, case, argument):
    assert messages[case] is not None, f"{case}: no ValueError"
    assert argument in messages[case], messages[case]


def _warnings(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = make_ddp(make_model())
        commhooks.build("cpsgd", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), period=1)
    out["period1"] = [str(w.message) for w in caught]
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = DDP(bn)  # buffers broadcast at every forward (DDP's default)
        commhooks.build("dpsgd", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1))
    out["broadcast"] = [str(w.message) for w in caught]
    return out


@pytest.mark.timeout(60)
def test_warnings_for_cpsgd_period_one_and_buffer_broadcast():
    out = run_ranks(_warnings, 2)[0]
    assert any("use 'ssgd'" in m for m in out["period1"]), out["period1"]
    assert any("broadcasts rank 0's buffers" in m for m in out["broadcast"]), out["broadcast"]


def _mismatch(rank, world):
    ddp = make_ddp(make_model())
    with pytest.raises(RuntimeError, match="ranks disagree on hparams"):
        commhooks.build("cpsgd", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), period=2 + rank)
    return True


@pytest.mark.timeout(60)
def test_ranks_with_different_hparams_fail_on_every_rank_without_hanging():
    assert run_ranks(_mismatch, 2) == [True, True]
