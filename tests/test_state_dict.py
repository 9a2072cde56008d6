"""Save after step k, rebuild, load, continue: identical to the uninterrupted run."""

import pytest
import torch

from reference import train
from spawn import run_ranks

STEPS, SAVE_AT = 12, 5
CASES = {
    "ssgd": {},
    "ssgd-noise": {"noise_std": 0.01},
    "cpsgd": {"period": 3, "warmup_steps": 1},
    "adpsgd": {"warmup_steps": 1, "p_init": 2, "sample_steps": 4, "low": 0.9, "high": 1.1},
    "dpsgd": {"topology": "random-pair", "seed": 2},
    "easgd": {"period": 2, "steps_per_epoch": 3},
    "entropysgd": {"L": 3, "steps_per_epoch": 2},
    "parle": {"L": 3, "steps_per_epoch": 2, "gamma": 0.05},
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", list(CASES))
def test_resume_is_exact(name):
    replica_size = None if name == "entropysgd" else 2 if name == "parle" else 1
    full = run_ranks(train, 4, name, CASES[name], steps=STEPS, replica_size=replica_size, save_at=SAVE_AT)
    states = [r["saved"] for r in full]
    resumed = run_ranks(_resume, 4, name, CASES[name], replica_size=replica_size, states=states)
    for f, r in zip(full, resumed, strict=True):
        assert torch.equal(f["params"], r["params"])
        assert f["stats"]["syncs"] == r["stats"]["syncs"]
        assert f["stats"]["comm_bytes"] == r["stats"]["comm_bytes"]
        assert f["periods"][SAVE_AT:] == r["periods"]


def _resume(rank, world, name, hp, *, replica_size, states):
    return train(rank, world, name, hp, steps=STEPS, replica_size=replica_size, state=states[rank])


def _wrong_algorithm(rank, world, states):
    with pytest.raises(ValueError, match="saved by algorithm 'cpsgd'"):
        train(rank, world, "ssgd", {}, steps=2, replica_size=1, state=states[rank])
    return True


@pytest.mark.timeout(60)
def test_loading_another_algorithms_state_is_refused():
    full = run_ranks(train, 2, "cpsgd", {"period": 2}, steps=2, replica_size=1, save_at=1)
    assert all(run_ranks(_wrong_algorithm, 2, [r["saved"] for r in full]))
