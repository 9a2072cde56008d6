"""The registry: an algorithm registered from outside commhooks is built, documented, offered by
the recipes' CLI and trained, with no edit to build.py, recipes/cli.py or recipes/report.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from recipes import cli
from recipes.mnist import RECIPE as MNIST

import toy_algorithm
from spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]
TOY = toy_algorithm.NAME


def test_toy_is_registered_with_its_documented_fields():
    assert TOY in commhooks.algorithm_names() and TOY not in commhooks.ALGORITHMS
    assert commhooks.config.describe(TOY).startswith("CPSGD-ramp")
    common = [f.name for f in dataclasses.fields(commhooks.config.CommonConfig)]
    assert [d.name for d in commhooks.config.hparam_docs(TOY)] == [*common, "period", "warmup_steps"]
    with pytest.raises(ValueError, match="period must be an integer >= 1"):
        commhooks.config.make_config(TOY, {"period": 0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        commhooks.config.make_config(TOY, {"period": 2}).period = 3  # type: ignore[attr-defined]


def test_register_rejects_bad_entries():
    spec = commhooks.algorithm_spec(TOY)
    with pytest.raises(ValueError, match="already registered"):
        commhooks.register(spec)
    with pytest.raises(ValueError, match="lower-case"):
        commhooks.AlgorithmSpec(name="Bad Name", config=spec.config, compose=spec.compose)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Undocumented(commhooks.CommonConfig):
        """A field without help text."""

        width: int = 3

    with pytest.raises(ValueError, match=r"\['width'\] lack help"):
        commhooks.AlgorithmSpec(name="undocumented", config=Undocumented, compose=spec.compose)
    with pytest.raises(ValueError, match="subclass of commhooks.CommonConfig"):
        commhooks.AlgorithmSpec(name="plain", config=dict, compose=spec.compose)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be one of"):
        commhooks.algorithm_spec("no-such-algorithm")


def test_toy_is_an_algo_choice_of_the_recipes(capsys):
    args = cli.parse_args(MNIST, ["--dataset", "digits", "--algo", TOY, "--period", "3"])
    assert args.algo == TOY and args.period == 3
    with pytest.raises(SystemExit):
        cli.parse_args(MNIST, ["--help"])
    out = capsys.readouterr().out
    assert TOY in out and "CPSGD-ramp" in out


def _ramp_rank(rank: int, world: int, *, steps: int, p_max: int) -> dict[str, Any]:
    torch.manual_seed(rank)  # replicas start apart; only the averages bring them together
    no_buffer_sync: dict[str, Any] = commhooks.ddp_buffer_sync_kwargs(False)
    model = DDP(torch.nn.Linear(3, 2), **no_buffer_sync)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = commhooks.build(TOY, model, opt, period=p_max)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(100 + rank))
    gaps = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        algo.step()
        w = model.module.weight.detach().clone()
        mean = w.clone()
        torch.distributed.all_reduce(mean)
        gaps.append(float((w - mean / world).abs().max()))
    return {"syncs": algo.stats()["syncs"], "zero_gap_steps": [k + 1 for k, g in enumerate(gaps) if g == 0.0]}


@pytest.mark.timeout(60)
def test_toy_builds_and_follows_its_rule():
    steps, p_max = 12, 3
    out = run_ranks(_ramp_rank, 2, steps=steps, p_max=p_max)
    expected_steps = [1, 3, 6, 9, 12]  # after 1, 2, 3, 3, 3 local steps
    assert toy_algorithm.syncs_after(steps, p_max) == len(expected_steps)
    for r in out:
        assert r["syncs"] == len(expected_steps)
        assert r["zero_gap_steps"] == expected_steps  # identical exactly after each average


@pytest.mark.timeout(120)
def test_toy_trains_through_the_recipe_with_a_plugin(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.pop("OMP_NUM_THREADS", None)
    results = tmp_path / "results.json"
    r = subprocess.run(
        [sys.executable, "-m", "launch", "--nproc-per-node", "2", "--max-restarts", "0", "-m", "recipes.mnist",
         "--dataset", "digits", "--plugin", "toy_algorithm", "--algo", TOY, "--period", "4", "--epochs", "3",
         "--logdir", str(tmp_path / "tb"), "--results", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(results.read_text())
    assert res["algo"] == TOY and res["world_size"] == 2
    assert res["syncs"] == toy_algorithm.syncs_after(res["steps"], 4)
    assert res["val_acc"] >= 0.85, res["val_acc"]
