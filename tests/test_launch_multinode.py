"""Two "nodes" on one machine: network namespaces joined by veth pairs and a bridge.

One launcher (our `python -m launch`, i.e. a torchrun agent) per namespace, c10d rendezvous on
node A's address, one worker per node. A worker is SIGKILLed on its first attempt; both agents
restart their workers and the run must finish with exactly the weights of an uninterrupted
single-node run (same seed, same world size). Needs root, `ip` and `tc` (benchmarks.netns);
skips otherwise.
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

PORT = 29400


def _agent(net: Cluster, node: int, tmp: Path, name: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    # Without it gloo picks the interface of the (shared) hostname: loopback, unreachable.
    env["GLOO_SOCKET_IFNAME"] = net.ifname
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "5"
    host = node == 0
    cmd = [
        sys.executable, "-m", "launch",
        "--nnodes", "2:2", "--nproc-per-node", "1", "--max-restarts", "2",
        "--rdzv-endpoint", f"{net.addrs[0]}:{PORT}", "--rdzv-id", "two-nodes",
        # Host detection compares host-level addresses and misses a namespace's own.
        *(["--rdzv-conf", "is_host=1"] if host else []),
        # Both namespaces share one hostname: each agent must announce its own address.
        "--local-addr", net.addrs[node],
        str(WORKER), "--algo", name, "--hparams", json.dumps(HPARAMS[name]),
        "--ckpt-dir", str(tmp / "ckpt"), "--out", str(tmp / "out"),
        "--steps", str(STEPS), "--ckpt-every", str(EVERY), "--kill-at", "8", "--kill-rank", "1",
    ]
    return net.popen(node, cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.timeout(150)
def test_two_nodes_kill_a_worker_and_finish(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    why = why_unavailable()
    if why is not None:
        pytest.skip(why)
    name = "cpsgd"
    with Cluster(2, prefix="chtm") as net:  # kills the agents' sessions, then removes everything
        logs = [tmp_path / "node_a.log", tmp_path / "node_b.log"]
        agents = [_agent(net, i, tmp_path, name, logs[i]) for i in range(2)]
        deadline = time.monotonic() + 120
        for agent in agents:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
        text = "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in logs)
        assert [a.returncode for a in agents] == [0, 0], text
        assert "killing itself after step 8" in text, text
        assert "resumed from step 6 (saved by 2 ranks)" in text, text
        assert "done at step 20, world size 2" in text, text
        # Ranks are global: the single-node reference (2 ranks, same seed) is the truth.
        assert_same_weights(weights(tmp_path / "out"), reference(tmp_path_factory, name))
