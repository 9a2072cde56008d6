"""Elastic restarts under `python -m launch` (gloo on CPU, 2-4 ranks, the tiny worker).

A worker SIGKILLs itself on the first attempt; the launcher restarts the group, every rank
resumes from the newest complete checkpoint, and the final weights must equal an uninterrupted
run's exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher import REPO, run_launcher

WORKER = REPO / "tests" / "workers" / "tiny_train.py"
# diloco: averaged after step 3, corrected after step 6: the checkpoint after step 6 (k = 5) holds it in flight
HPARAMS: dict[str, dict[str, Any]] = {"ssgd": {}, "cpsgd": {"period": 4}, "dpsgd": {}, "diloco": {"period": 4, "delay": 3}}
STEPS, EVERY = 20, 3  # kills at step 8 resume from 6; kills inside save 9 also resume from 6


@dataclass(frozen=True)
class Launched:
    """How a launcher run ended: its exit code and its output (stdout and stderr together)."""

    returncode: int
    log: str


def launch(
    tmp: Path, name: str, *worker_args: str, nproc: int = 2, restarts: int = 2, timeout: float = 60
) -> Launched:
    """Run the tiny worker under the launcher; its checkpoints and weights go to tmp/name."""
    args = [
        "--nproc-per-node", str(nproc),
        "--max-restarts", str(restarts), str(WORKER),
        "--ckpt-dir", str(tmp / name / "ckpt"), "--out", str(tmp / name / "out"),
        "--steps", str(STEPS), "--ckpt-every", str(EVERY), *worker_args,
    ]
    rc, out, _ = run_launcher(args, timeout)
    return Launched(rc, out)


def weights(out: Path, nproc: int = 2) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"rank_{r}.pt") for r in range(nproc)]


def assert_same_weights(a: list[dict], b: list[dict]) -> None:
    for rank, (x, y) in enumerate(zip(a, b, strict=True)):
        for key in x:
            assert torch.equal(x[key], y[key]), f"rank {rank}: {key} differs"


_references: dict[str, list[dict]] = {}


def reference(tmp_factory: pytest.TempPathFactory, name: str) -> list[dict]:
    """Final weights of an uninterrupted 2-rank run of `name` (computed once per session)."""
    if name not in _references:
        tmp = tmp_factory.mktemp(f"ref-{name}")
        proc = launch(tmp, "run", "--algo", name, "--hparams", json.dumps(HPARAMS[name]),
                      restarts=0)
        assert proc.returncode == 0, proc.log[-4000:]
        _references[name] = weights(tmp / "run" / "out")
    return _references[name]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["ssgd", "cpsgd", "dpsgd", "diloco"])
def test_killed_worker_resumes_bit_identically(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = reference(tmp_path_factory, name)
    proc = launch(tmp_path, "killed", "--algo", name, "--hparams", json.dumps(HPARAMS[name]),
                  "--kill-at", "8", "--kill-rank", "1")
    assert proc.returncode == 0, proc.log[-4000:]
    assert "rank 1 killing itself after step 8" in proc.log
    assert "resumed from step 6 (saved by 2 ranks)" in proc.log
    assert "done at step 20, world size 2, attempt 1" in proc.log
    assert_same_weights(weights(tmp_path / "killed" / "out"), expected)


@pytest.mark.timeout(120)
def test_kill_inside_checkpoint_write_uses_previous_complete_step(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    name = "cpsgd"
    expected = reference(tmp_path_factory, name)
    # Rank 0 dies right after renaming its own file of step 9 into place: the step folder has a
    # real rank file but no marker; rank 1 is blocked in the save's closing all-reduce.
    proc = launch(tmp_path, "killed", "--algo", name, "--hparams", json.dumps(HPARAMS[name]),
                  "--kill-in-save", "9", "--kill-rank", "0")
    assert proc.returncode == 0, proc.log[-4000:]
    assert "rank 0 killing itself inside save 9" in proc.log
    assert "resumed from step 6 (saved by 2 ranks)" in proc.log
    assert_same_weights(weights(tmp_path / "killed" / "out"), expected)
    kept = sorted(p.name for p in (tmp_path / "killed" / "ckpt").iterdir())
    assert kept == ["step_000000015", "step_000000018"]


@pytest.mark.timeout(120)
def test_resume_on_more_ranks_starts_from_the_average(tmp_path: Path) -> None:
    name = "cpsgd"
    hp = json.dumps(HPARAMS[name])
    # Two ranks stop after step 6 (period 4: the replicas differ at the step-6 checkpoint).
    first = launch(tmp_path, "job", "--algo", name, "--hparams", hp, "--steps", "7", restarts=0)
    assert first.returncode == 0, first.log[-4000:]
    second = launch(tmp_path, "job", "--algo", name, "--hparams", hp, "--steps", "9",
                    "--dump-start", str(tmp_path / "start"), nproc=4, restarts=0, timeout=90)
    assert second.returncode == 0, second.log[-4000:]
    assert (
        "resumed from step 6 written by 2 ranks; world size is now 4: starting every rank from "
        "the replica average with fresh optimizer and algorithm state"
    ) in second.log
    assert "done at step 9, world size 4" in second.log
    average = torch.load(tmp_path / "job" / "ckpt" / "step_000000006" / "average.pt")["model"]
    saved = [
        torch.load(tmp_path / "job" / "ckpt" / "step_000000006" / f"rank_{r:05d}.pt",
                   weights_only=False)["model"]
        for r in range(2)
    ]
    assert not torch.equal(saved[0]["0.weight"], saved[1]["0.weight"])  # a real average
    for key in average:
        assert torch.equal(average[key], (saved[0][key] + saved[1][key]) / 2)
    for start in weights(tmp_path / "start", nproc=4):
        assert_same_weights([start], [average])


@pytest.mark.timeout(60)
def test_different_configurations_fail_fast_naming_the_key(tmp_path: Path) -> None:
    proc = launch(tmp_path, "bad", "--algo", "ddp", "--skew-config", restarts=0, timeout=50)
    assert proc.returncode != 0
    assert "ranks disagree on lr" in proc.log
    assert "rank 0 has lr=0.05" in proc.log and "rank 1 has lr=0.1" in proc.log
