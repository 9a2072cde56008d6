"""The launcher's argument handling, the world-size-1 runtime, and the checkpointer in one process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from launch import cli
from launch.checkpoint import MARKER, Checkpointer
from launch.runtime import init_distributed, seed_everything, shutdown

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_pet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun options read PET_* variables; a developer's environment must not leak in.
    for key in list(os.environ):
        if key.startswith("PET_"):
            monkeypatch.delenv(key)


@pytest.mark.timeout(30)
def test_defaults_are_standalone_auto_and_restarting() -> None:
    args = cli.parse_args(["train.py", "--lr", "0.1"])
    assert args.standalone
    assert args.max_restarts == cli.DEFAULT_MAX_RESTARTS > 0
    assert int(args.nproc_per_node) == cli.auto_nproc_per_node() >= 1
    assert args.training_script == "train.py"
    assert args.training_script_args == ["--lr", "0.1"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spelling", ["--nproc-per-node", "--nproc_per_node"])
def test_torchrun_options_pass_through(spelling: str) -> None:
    args = cli.parse_args(
        [spelling, "3", "--max_restarts", "0", "--monitor-interval", "0.5", "-m", "recipes.x", "--a"]
    )
    assert (args.nproc_per_node, args.max_restarts, args.monitor_interval) == ("3", 0, 0.5)
    assert args.module and args.training_script == "recipes.x"
    assert args.training_script_args == ["--a"]


@pytest.mark.timeout(30)
def test_pet_environment_beats_our_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_MAX_RESTARTS", "7")
    assert cli.parse_args(["train.py"]).max_restarts == 7


@pytest.mark.timeout(30)
def test_multinode_means_c10d_and_needs_an_endpoint() -> None:
    args = cli.parse_args(["--nnodes", "1:2", "--rdzv-endpoint", "10.0.0.1:29400", "t.py"])
    assert (args.rdzv_backend, args.standalone) == ("c10d", False)
    with pytest.raises(ValueError, match="--rdzv-endpoint"):
        cli.parse_args(["--nnodes", "2", "t.py"])


@pytest.mark.timeout(30)
def test_multinode_bounds_the_rendezvous_wait_unless_told() -> None:
    args = cli.parse_args(["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29400",
                           "--rdzv-conf", "is_host=1", "t.py"])
    assert args.rdzv_conf == f"is_host=1,join_timeout={cli.DEFAULT_JOIN_TIMEOUT_S}"
    args = cli.parse_args(["--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-conf",
                           "join_timeout=20", "t.py"])
    assert args.rdzv_conf == "join_timeout=20"


@pytest.mark.timeout(30)
def test_only_final_exit_codes_stop_the_restarts() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launch.agent import final_failure
    from launch.exitcodes import EXIT_DIVERGED, EXIT_USAGE

    def failures(*codes: int) -> dict:
        return {r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=c, error_file="")
                for r, c in enumerate(codes)}

    assert final_failure(failures(1, -9)) is None  # a crash, a SIGKILL: restart
    assert final_failure(failures(-15, EXIT_USAGE)) == (1, EXIT_USAGE)
    assert final_failure(failures(EXIT_DIVERGED, EXIT_DIVERGED)) == (0, EXIT_DIVERGED)


@pytest.mark.timeout(30)
def test_worker_environment_keeps_user_value(monkeypatch: pytest.MonkeyPatch) -> None:
    # run() sets these in this process for the agent: each restored (absent) afterwards
    for name in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "LAUNCH_AGENT_PID", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(cli.torchrun, "run", lambda args: None)  # no agent, no workers
    cli.run(cli.parse_args(["--nproc-per-node", "1", "-m", "json.tool"]))
    assert os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")
    cli.run(cli.parse_args(["--nproc-per-node", "1", "-m", "json.tool"]))
    assert os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"


@pytest.mark.timeout(60)
def test_module_mode_runs_under_the_launcher() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "--nproc-per-node", "2", "--max-restarts", "0",
         "-m", "json.tool", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("usage:") == 2  # both workers ran `python -m json.tool --help`
    assert "standalone" in proc.stderr


class _Algo:
    """The part of commhooks' algorithm interface the checkpointer needs (plain DDP)."""

    def consensus(self):  # noqa: ANN201
        import contextlib

        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {"k": 1}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


@pytest.mark.timeout(60)
def test_single_process_checkpoints(tmp_path: Path) -> None:
    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    try:
        rt = init_distributed(seed=3, config={"a": 1})
        assert (rt.rank, rt.world_size, rt.backend, rt.restart_count) == (0, 1, "gloo", 0)
        assert rt.is_main and dist.is_initialized()
        model = torch.nn.Linear(3, 2).to(torch.float64)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        ckpt = Checkpointer(tmp_path, rt, keep=2)
        assert ckpt.latest() is None
        for step in (2, 4, 6):
            with torch.no_grad():
                model.weight.fill_(step)
            seed_everything(step)
            ckpt.save(step, model=ddp, optimizer=opt, algorithm=_Algo(), extra={"epoch": step})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000004", "step_000000006"]
        # A partial (unmarked) newer step is ignored; so is a marked one missing a rank's file.
        (tmp_path / "step_000000008").mkdir()
        (tmp_path / "step_000000008" / "rank_00000.pt").write_bytes(b"torn")
        (tmp_path / "step_000000010").mkdir()
        (tmp_path / "step_000000010" / MARKER).write_text(json.dumps({"world_size": 1}))
        resume = ckpt.latest()
        assert resume is not None and (resume.step, resume.resized) == (6, False)
        assert resume.extra == {"epoch": 6}
        seed_everything(6)
        expected = (random.random(), np.random.rand(), torch.rand(3))
        seed_everything(99)
        with torch.no_grad():
            model.weight.zero_()
        resume.load_model(ddp)
        assert torch.equal(model.weight, torch.full((2, 3), 6.0, dtype=torch.float64))
        algo = _Algo()
        resume.load_training(optimizer=opt, algorithm=algo)
        assert algo.loaded == {"k": 1}
        assert (random.random(), np.random.rand()) == expected[:2]
        assert torch.equal(torch.rand(3), expected[2])
        # Saving the torn step again replaces it; pruning then drops older complete steps.
        ckpt.save(8, model=ddp, optimizer=opt, algorithm=_Algo())
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["step_000000006", "step_000000008", "step_000000010"]
        assert sorted(p.name for p in (tmp_path / "step_000000008").iterdir()) == [
            MARKER, "average.pt", "rank_00000.pt"
        ]
    finally:
        shutdown()
    assert not dist.is_initialized()


@pytest.mark.timeout(30)
def test_bad_arguments_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(seed=0, timeout_s=0)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, None, keep=0)  # type: ignore[arg-type]
