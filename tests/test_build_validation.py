"""Bad input to ``commhooks.build`` raises ValueError naming the argument; warnings where due.

The checks that need no process group (the name, the hyper-parameters, the replica size, the
model's type) run in this process; the ones that need a DDP model or several ranks run on gloo
ranks.
"""

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from commhooks.config import make_config

from reference import OPT, make_ddp, make_model
from spawn import run_ranks

WORLD = 2
# (case id, algorithm, replica_size, hparams, the argument the message must name)
BAD: list[tuple[str, str, int, dict[str, Any], str]] = [
    ("period<1", "cpsgd", 1, {"period": 0}, "period"),
    ("warmup<0", "cpsgd", 1, {"period": 2, "warmup_steps": -1}, "warmup_steps"),
    ("adpsgd-warmup<0", "adpsgd", 1, {"sample_steps": 4, "warmup_steps": -2}, "warmup_steps"),
    ("low>=high", "adpsgd", 1, {"sample_steps": 4, "low": 1.3, "high": 1.3}, "low"),
    ("noise_std<=0", "ssgd-noise", 1, {"noise_std": 0.0}, "noise_std"),
    ("sample_steps-missing", "adpsgd", 1, {}, "sample_steps"),
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
# Through build itself on real ranks: one case per kind of check, in build's order.
THROUGH_BUILD = ("unknown-name", "unknown-hparam", "replica_size-divides", "period<1")


def _validate(name: str, replica_size: int, hp: dict, world: int = WORLD) -> None:
    """build's checks of its arguments that need no process group, in build's order."""
    make_config(name, hp)  # the name, unknown and missing hyper-parameters, every field's rule
    commhooks.resolve_replica_size(name, replica_size, world)


@pytest.mark.parametrize("case, name, replica_size, hp, argument", BAD, ids=[c[0] for c in BAD])
def test_bad_hparams_raise_value_error_naming_the_argument(case, name, replica_size, hp, argument):
    with pytest.raises(ValueError, match=argument):
        _validate(name, replica_size, hp)


def test_the_library_defaults_are_valid():
    required = {"adpsgd": {"sample_steps": 4}, "easgd": {"steps_per_epoch": 4},
                "entropysgd": {"steps_per_epoch": 4}, "parle": {"steps_per_epoch": 4}}
    for name in commhooks.ALGORITHMS:
        _validate(name, WORLD if name == "entropysgd" else 1, required.get(name, {}))


def test_a_model_that_is_not_ddp_is_refused_before_any_collective():
    plain = make_model()
    with pytest.raises(ValueError, match="model must be a torch.nn.parallel.DistributedDataParallel"):
        commhooks.build("ssgd", plain, torch.optim.SGD(plain.parameters(), lr=0.1))  # type: ignore[arg-type]


def _through_build(rank, world):
    """The messages build raises on real ranks: a sample of BAD, and an optimizer over other parameters."""
    messages: dict[str, str | None] = {}
    for case, name, replica_size, hp, _ in BAD:
        if case not in THROUGH_BUILD:
            continue
        ddp = make_ddp(make_model())
        try:
            commhooks.build(name, ddp, torch.optim.SGD(ddp.parameters(), **OPT), replica_size, **hp)
            messages[case] = None
        except ValueError as err:
            messages[case] = str(err)
    ddp = make_ddp(make_model())
    try:
        commhooks.build("ssgd", ddp, torch.optim.SGD(nn.Linear(2, 2).double().parameters(), lr=0.1))
        messages["optimizer"] = None
    except ValueError as err:
        messages["optimizer"] = str(err)
    return messages


@pytest.mark.timeout(90)
def test_build_raises_value_error_naming_the_argument_on_every_rank():
    expected = {c[0]: c[4] for c in BAD if c[0] in THROUGH_BUILD} | {"optimizer": "optimizer must own the model's parameters"}
    for messages in run_ranks(_through_build, WORLD, timeout=80):
        assert set(messages) == set(expected)
        for case, argument in expected.items():
            assert messages[case] is not None and argument in messages[case], (case, messages[case])


def _warnings(rank, world):
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
    with warnings.catch_warnings(record=True) as caught:  # build consults the foot-gun checks (test_guards.py)
        warnings.simplefilter("always")
        ddp = make_ddp(make_model())
        commhooks.build("parle", ddp, torch.optim.SGD(ddp.parameters(), **OPT), L=3, steps_per_epoch=2)
    out["short-epoch"] = [str(w.message) for w in caught]
    return out


@pytest.mark.timeout(60)
def test_warnings_for_cpsgd_period_one_buffer_broadcast_and_foot_guns():
    out = run_ranks(_warnings, WORLD)[0]
    assert any("use 'ssgd'" in m for m in out["period1"]), out["period1"]
    assert any("broadcasts rank 0's buffers" in m for m in out["broadcast"]), out["broadcast"]
    assert any("steps_per_epoch=2 < L=3" in m for m in out["short-epoch"]), out["short-epoch"]


def _mismatch(rank, world):
    ddp = make_ddp(make_model())
    with pytest.raises(RuntimeError, match="ranks disagree on hparams"):
        commhooks.build("cpsgd", ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), period=2 + rank)
    return True


@pytest.mark.timeout(60)
def test_ranks_with_different_hparams_fail_on_every_rank_without_hanging():
    assert run_ranks(_mismatch, WORLD) == [True, True]
