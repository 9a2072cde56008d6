"""Reliability: never silently wrong, never stuck (gloo on CPU, 2 ranks, `python -m launch`).

- a diverged run stops every rank at the next check, once, with exit code 3, and keeps the
  checkpoints written before it; a non-finite state is never written;
- deterministic errors (a bad flag or hyper-parameter, missing data, an impossible replica size)
  end the job after the first attempt with exit code 2 and one message;
- a SIGKILLed launcher (its pid or its process group) leaves no worker behind, and a one-node job
  listens on loopback only;
- a crafted, truncated or incomplete newest checkpoint makes every rank fall back to the previous
  complete step together, naming the file; the crafted file's code never runs;
- keep-N never deletes the step just written; results files are strict JSON and survive a rerun.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.checkpoint import MARKER, Checkpointer, NonFiniteError
from launch.finite import named_tensors, nonfinite
from launch.runtime import init_distributed, shutdown
from recipes import report, train
from recipes.mnist import RECIPE as MNIST

from launcher import run_launcher
from test_launch_restart import HPARAMS, REPO, assert_same_weights, launch, reference, weights


def _quiet_limit(seconds: float) -> float:
    """`seconds` on an idle machine, stretched by the current CPU load (shared test machines)."""
    return seconds * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))




def _recipe(tmp: Path, *flags: str) -> list[str]:
    return ["--nproc-per-node", "2", "-m", "recipes.mnist", "--logdir", str(tmp / "tb"), *flags]


def _load_finite(folder: Path) -> None:
    """Every file of a step loads with weights-only unpickling and holds only finite values."""
    for f in sorted(folder.glob("*.pt")):
        state = torch.load(f, weights_only=True)
        assert not nonfinite(named_tensors(state["model"])), f


# ---------------------------------------------------------------------------------------------
# Divergence


@pytest.mark.timeout(60)
def test_divergence_is_caught_at_the_next_log_point(tmp_path, monkeypatch, capsys):
    """An infinite lr from step 7 on: the log check at step 9 (interval 3) stops the run, the
    checkpoint of step 5 stays, and no results file is written."""
    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, **kw: math.inf if step >= 6 else lr_at(step, **kw))
    ck = tmp_path / "ck"
    with pytest.raises(SystemExit) as stop:
        train.main(MNIST, ["--dataset", "synthetic", "--log-interval", "3", "--max-steps", "20",
                           "--checkpoint-dir", str(ck), "--checkpoint-every", "5",
                           "--logdir", str(tmp_path / "tb"), "--results", str(tmp_path / "r.json")])
    assert stop.value.code == 3
    err = capsys.readouterr().err
    assert err.count("training diverged") == 1, err
    assert "training diverged: step 9: train loss (steps 7-9) nan" in err, err
    assert "non-finite weights on rank 0" in err and str(ck / "step_000000005") in err, err
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000000005"]
    _load_finite(ck / "step_000000005")
    assert not (tmp_path / "r.json").exists()
    assert not dist.is_initialized()


@pytest.mark.timeout(120)
def test_lr_1e6_stops_once_and_keeps_the_good_checkpoints(tmp_path):
    """Resuming good checkpoints with a diverging lr: exit 3 after one attempt, both good steps
    still on disk and loadable (before: trained to the end, and the NaN steps replaced them)."""
    common = ["--dataset", "synthetic", "--checkpoint-dir", str(tmp_path / "ck"),
              "--checkpoint-every", "3", "--log-interval", "2"]
    rc, out, _ = run_launcher(_recipe(tmp_path, *common, "--max-steps", "6"), timeout=100)
    assert rc == 0, out[-3000:]
    rc, out, _ = run_launcher(_recipe(tmp_path, *common, "--lr", "1e6",
                                             "--results", str(tmp_path / "r.json")), timeout=100)
    assert rc == 3, out[-3000:]
    assert out.count("error: training diverged") == 1, out
    assert out.count("hyper-parameters:") == 1, out  # one attempt: no restart
    assert "the 3 remaining restart(s) are not used" in out, out
    assert "resumed at step 6" in out and "Traceback" not in out, out
    step = int(out.split("training diverged: step ")[1].split(":")[0])
    assert step > 6, out
    assert sorted(p.name for p in (tmp_path / "ck").glob("step_*")) == ["step_000000003", "step_000000006"]
    for folder in (tmp_path / "ck").glob("step_*"):
        assert json.loads((folder / MARKER).read_text())["finite"] is True
        _load_finite(folder)
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------
# Deterministic errors


@pytest.mark.timeout(90)
@pytest.mark.parametrize("flags,message", [
    (["--period", "0"], "--period is not a hyper-parameter of ssgd"),
    (["--dataset", "synthetic", "--algo", "cpsgd", "--period", "0"], "period must be"),
    (["--dataset", "mnist", "--data-dir", "{tmp}/none"], "MNIST is not available"),
    (["--dataset", "synthetic", "--replica-size", "3"], "must divide the world size 2"),
], ids=["bad-flag", "bad-hparam", "missing-data", "replica-size"])
def test_deterministic_errors_end_once_with_exit_2(tmp_path, flags, message):
    flags = [f.format(tmp=tmp_path) for f in flags]
    rc, out, seconds = run_launcher(_recipe(tmp_path, *flags), timeout=80)
    assert rc == 2, out[-3000:]
    assert out.count(message) == 1, out
    assert "Traceback" not in out, out
    assert "the 3 remaining restart(s) are not used" in out, out
    assert seconds < _quiet_limit(10), (seconds, out[-2000:])


# ---------------------------------------------------------------------------------------------
# Orphans and loopback


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields after "pid (comm) "


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in "ZX"  # a zombie has exited already


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and int(stat[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on (from /proc/net)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                hexaddr = fields[1].split(":")[0]
                raw = b"".join(bytes.fromhex(hexaddr[i:i + 8])[::-1] for i in range(0, len(hexaddr), 8))
                found.append(str(ipaddress.ip_address(raw)))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("target", ["pid", "process-group"])
def test_sigkill_of_the_launcher_leaves_no_worker(tmp_path, target):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    cmd = [sys.executable, "-m", "launch", "--nproc-per-node", "2", "--max-restarts", "0",
           str(REPO / "tests" / "workers" / "tiny_train.py"), "--algo", "ddp",
           "--ckpt-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "out"),
           "--steps", "100000000", "--ckpt-every", "100000000"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until both workers train (their gloo sockets exist)
            workers = _children(launcher.pid)
            if len(workers) == 2 and len(_listening_addresses(workers)) >= 2:
                break
            assert launcher.poll() is None, "the launcher ended before its workers trained"
            time.sleep(0.5)
        else:
            pytest.fail(f"workers did not start in 60 s (children: {workers})")
        listening = _listening_addresses([launcher.pid, *workers])
        assert listening and all(a in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for a in listening), listening
        if target == "pid":
            os.kill(launcher.pid, signal.SIGKILL)
        else:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived the launcher by 5 s"
    finally:
        for pid in [launcher.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# Checkpoints


class _RunsCode:
    """Unpickling this object (weights_only=False) creates the file at `path`: a stand-in for a
    tampered checkpoint that runs code on every rank that loads it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


@pytest.fixture
def uninterrupted_cpsgd(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Final weights of 20 uninterrupted cpsgd steps on 2 ranks (shared with the restart tests)."""
    return reference(tmp_path_factory, "cpsgd")


@pytest.mark.timeout(180)
def test_crafted_truncated_and_incomplete_newest_steps_fall_back_together(
    tmp_path: Path, uninterrupted_cpsgd: list[dict]
) -> None:
    hp = ["--algo", "cpsgd", "--hparams", json.dumps(HPARAMS["cpsgd"]), "--keep", "3"]
    first = launch(tmp_path, "job", *hp, "--steps", "12", restarts=0)
    assert first.returncode == 0, first.log[-4000:]
    ck = tmp_path / "job" / "ckpt"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == [f"step_{s:09d}" for s in (6, 9, 12)]
    marker = tmp_path / "code-ran"
    # Newest: rank 0's file replaced by a pickle that would run code (a valid torch.save file).
    crafted = ck / "step_000000012" / "rank_00000.pt"
    torch.save({"step": 12, "rank": 0, "model": _RunsCode(marker)}, crafted)
    # Next: rank 1's file cut in half (a torn copy, a full disk).
    torn = ck / "step_000000009" / "rank_00001.pt"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    # Newer still: a step whose save never finished.
    (ck / "step_000000015").mkdir()
    (ck / "step_000000015" / "rank_00000.pt").write_bytes(b"partial")

    second = launch(tmp_path, "job", *hp, restarts=0)
    log = second.log
    assert second.returncode == 0, log[-4000:]
    assert "skipping step_000000015: incomplete (no COMPLETE marker" in log, log
    assert ("skipping step_000000012: rank_00000.pt (needed by rank 0): refused by weights-only "
            "loading: it asks for io.open") in log, log
    assert "skipping step_000000009: rank_00001.pt (needed by rank 1): truncated or corrupt" in log, log
    assert "resuming from step_000000006, the newest step every rank can load" in log, log
    assert "[tiny] resumed from step 6 (saved by 2 ranks)" in log, log
    assert not marker.exists(), "the crafted checkpoint ran code"
    assert_same_weights(weights(tmp_path / "job" / "out"), uninterrupted_cpsgd)


class _Step:
    """Enough of an algorithm for the checkpointer (plain SGD, one process)."""

    def consensus(self) -> object:
        import contextlib

        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.mark.timeout(60)
def test_checkpointer_refuses_non_finite_state_and_keeps_the_saved_step(tmp_path):
    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    try:
        rt = init_distributed(seed=0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        ckpt = Checkpointer(tmp_path, rt, keep=1)
        # A newer complete step from another attempt must not push out the step just written.
        ckpt.save(9, model=model, optimizer=opt, algorithm=_Step())
        ckpt.save(3, model=model, optimizer=opt, algorithm=_Step())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000003", "step_000000009"]
        ckpt.save(4, model=model, optimizer=opt, algorithm=_Step())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000004", "step_000000009"]
        # `extra` must load back under weights_only: refused at save time, not at resume.
        with pytest.raises(TypeError, match=r"extra\['when'\]"):
            ckpt.save(5, model=model, optimizer=opt, algorithm=_Step(), extra={"when": object()})
        # A momentum buffer that overflowed: nothing is written, the earlier steps stay.
        opt.state[model.weight]["momentum_buffer"][0, 0] = math.inf
        with pytest.raises(NonFiniteError, match="optimizer.state.0.momentum_buffer"):
            ckpt.save(6, model=model, optimizer=opt, algorithm=_Step())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000004", "step_000000009"]
    finally:
        shutdown()


# ---------------------------------------------------------------------------------------------
# Results


def test_results_json_is_strict(tmp_path):
    path = tmp_path / "r.json"
    report.Reporter(enabled=True, logdir=None, total_steps=1, title="t").results(
        str(path), {"train_loss": math.nan, "hparams": {"high": math.inf, "low": 0.7}, "steps": 3})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"train_loss": None, "hparams": {"high": "inf", "low": 0.7}, "steps": 3}


@pytest.mark.timeout(120)
def test_resumed_and_rerun_results_match_the_uninterrupted_run(tmp_path, capsys):
    """Stopped at step 5 (mid-epoch), resumed to the end: the same train and val figures as an
    uninterrupted run. A rerun of the finished job leaves the results file as it was, or, if
    there is none, writes the same figures again."""
    if dist.is_initialized():
        pytest.skip("a default process group is already initialised in this process")
    base = ["--dataset", "synthetic", "--batch-size", "256", "--epochs", "2",
            "--logdir", str(tmp_path / "tb")]
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "3"]
    keys = ("steps", "train_loss", "train_acc", "val_loss", "val_acc")
    straight = train.main(MNIST, base + ["--results", str(tmp_path / "a.json")])
    train.main(MNIST, base + ck + ["--max-steps", "5"])
    resumed = train.main(MNIST, base + ck + ["--results", str(tmp_path / "b.json")])
    assert straight is not None and resumed is not None  # rank 0 returns the results
    assert [resumed[k] for k in keys] == [straight[k] for k in keys]
    written = (tmp_path / "b.json").read_bytes()
    capsys.readouterr()
    train.main(MNIST, base + ck + ["--results", str(tmp_path / "b.json")])
    assert "already complete at step 16; " in capsys.readouterr().out
    assert (tmp_path / "b.json").read_bytes() == written
    train.main(MNIST, base + ck + ["--results", str(tmp_path / "c.json")])
    again = json.loads((tmp_path / "c.json").read_text(), parse_constant=pytest.fail)
    assert [again[k] for k in keys] == [straight[k] for k in keys]
