"""Network partitions between two "nodes" (network namespaces, benchmarks.netns), gloo on CPU.

One launcher per namespace, c10d rendezvous on node 0, one tiny worker per node with a short
collective timeout. Node 1's link is cut after the checkpoint of step 6:

- it stays down: both launchers end, in bounded time (collective timeout + join_timeout +
  shutdown), each with one line saying why;
- it comes back: the restart resumes from step 6 and the run ends with exactly the weights of
  an uninterrupted run.

Needs root, `ip` and `tc`; skips otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.netns import Cluster, why_unavailable

from test_launch_restart import EVERY, HPARAMS, REPO, STEPS, WORKER, assert_same_weights, reference, weights

NAME = "cpsgd"
PORT = 29400
TIMEOUT_S = 3  # the workers' collective timeout (--timeout)
JOIN_S = 15  # --rdzv-conf join_timeout: rendezvous wait, and how long store reads may hang
SHUTDOWN_S = 30  # stopping workers, closing the rendezvous, interpreter exit (generous: shared CPUs)


def _agent(net: Cluster, node: int, tmp: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    env["GLOO_SOCKET_IFNAME"] = net.ifname
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "5"
    conf = ("is_host=1," if node == 0 else "") + f"join_timeout={JOIN_S}"
    cmd = [
        sys.executable, "-m", "launch", "--nnodes", "2:2", "--nproc-per-node", "1",
        "--max-restarts", "2", "--rdzv-endpoint", f"{net.addrs[0]}:{PORT}", "--rdzv-id", "cut",
        "--rdzv-conf", conf, "--local-addr", net.addrs[node],
        str(WORKER), "--algo", NAME, "--hparams", json.dumps(HPARAMS[NAME]),
        "--ckpt-dir", str(tmp / "ckpt"), "--out", str(tmp / "out"), "--steps", str(STEPS),
        "--ckpt-every", str(EVERY), "--timeout", str(TIMEOUT_S), "--step-sleep", "0.3",
    ]
    return net.popen(node, cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _cut_after_step_6(net: Cluster, tmp: Path, agents: list[subprocess.Popen]) -> float:
    """Wait for the checkpoint of step 6, cut node 1's link; return the time of the cut."""
    marker = tmp / "ckpt" / "step_000000006" / "COMPLETE"
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert all(a.poll() is None for a in agents), "a launcher ended before step 6"
        assert time.monotonic() < deadline, "no checkpoint of step 6 in 90 s"
        time.sleep(0.05)
    net.set_link(1, up=False)
    return time.monotonic()


def _logs(paths: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in paths)


@pytest.fixture
def two_nodes():
    why = why_unavailable()
    if why is not None:
        pytest.skip(why)
    with Cluster(2, prefix="chpt") as net:  # kills the agents' sessions, then removes everything
        yield net


@pytest.mark.timeout(150)
def test_link_down_for_good_fails_both_nodes_in_bounded_time(two_nodes: Cluster, tmp_path: Path) -> None:
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [_agent(two_nodes, i, tmp_path, logs[i]) for i in range(2)]
    cut = _cut_after_step_6(two_nodes, tmp_path, agents)
    bound = TIMEOUT_S + JOIN_S + SHUTDOWN_S
    for agent in agents:
        agent.wait(timeout=max(1.0, cut + bound - time.monotonic()))
    elapsed = time.monotonic() - cut
    text = _logs(logs)
    assert [a.returncode for a in agents] == [1, 1], text
    assert elapsed <= bound, (elapsed, text)
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in text, text  # the workers' collective timeout
    node0, node1 = (p.read_text() for p in logs)
    assert f"the other node(s) did not join within join_timeout {JOIN_S} s" in node0, text
    assert f"lost the rendezvous store at {two_nodes.addrs[0]}:{PORT}" in node1, text
    assert (tmp_path / "ckpt" / "step_000000006" / "COMPLETE").exists()


@pytest.mark.timeout(180)
def test_link_back_after_the_timeout_resumes_to_the_same_weights(
    two_nodes: Cluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = reference(tmp_path_factory, NAME)  # before the cluster's clock starts
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    agents = [_agent(two_nodes, i, tmp_path, logs[i]) for i in range(2)]
    cut = _cut_after_step_6(two_nodes, tmp_path, agents)
    time.sleep(max(0.0, cut + TIMEOUT_S + 5 - time.monotonic()))  # past the collective timeout
    two_nodes.set_link(1, up=True)
    for agent in agents:
        agent.wait(timeout=120)
    text = _logs(logs)
    assert [a.returncode for a in agents] == [0, 0], text
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in text, text  # the partition was noticed
    assert "resumed from step 6 (saved by 2 ranks)" in text, text
    assert f"done at step {STEPS}, world size 2" in text, text
    assert_same_weights(weights(tmp_path / "out"), expected)
