"""Two "nodes" on one machine: network namespaces joined by veth pairs and a bridge.

One launcher (our `python -m launch`, i.e. a torchrun agent) per namespace, c10d rendezvous on
node A's address, one worker per node. A worker is SIGKILLed on its first attempt; both agents
restart their workers and the run must finish with exactly the weights of an uninterrupted
single-node run (same seed, same world size). Needs root and `ip`; skips otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_launch_restart import (
    EVERY, HPARAMS, REPO, STEPS, WORKER, _check_buildable, assert_same_weights, reference, weights,
)

SUBNET = "10.213.7"  # a private /24 that exists only inside the namespaces created here
IFNAME = "cveth0"  # the same interface name in both namespaces, so one GLOO_SOCKET_IFNAME fits
PORT = 29400


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


class TwoNodes:
    """Create (and later delete) two namespaces on a bridge, addresses SUBNET.1 and SUBNET.2."""

    def __init__(self) -> None:
        tag = f"ch{os.getpid() % 100000}"  # interface names are limited to 15 characters
        self.bridge = f"{tag}br"
        self.names = [f"{tag}a", f"{tag}b"]
        self.addrs = [f"{SUBNET}.1", f"{SUBNET}.2"]

    def create(self) -> str | None:
        """Set the network up; return why not (for a skip) or None."""
        steps = [("link", "add", self.bridge, "type", "bridge"), ("link", "set", self.bridge, "up")]
        for ns, addr in zip(self.names, self.addrs):
            peer = f"{ns}p"
            steps += [
                ("netns", "add", ns),
                ("link", "add", ns, "type", "veth", "peer", "name", peer),
                ("link", "set", ns, "netns", ns),
                ("link", "set", peer, "master", self.bridge, "up"),
                ("-n", ns, "link", "set", ns, "name", IFNAME),
                ("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME),
                ("-n", ns, "link", "set", IFNAME, "up"),
                ("-n", ns, "link", "set", "lo", "up"),
            ]
        for step in steps:
            proc = _ip(*step)
            if proc.returncode != 0:
                return f"`ip {' '.join(step)}` failed: {proc.stderr.strip()}"
        return None

    def delete(self) -> None:
        # Deleting a namespace destroys its veth end and with it the peer on the bridge.
        for ns in self.names:
            _ip("netns", "del", ns)
        _ip("link", "del", self.bridge)


def _agent(ns: str, addr: str, host: bool, tmp: Path, name: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    # Without it gloo picks the interface of the (shared) hostname: loopback, unreachable.
    env["GLOO_SOCKET_IFNAME"] = IFNAME
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "5"
    cmd = [
        "ip", "netns", "exec", ns, sys.executable, "-m", "launch",
        "--nnodes", "2:2", "--nproc-per-node", "1", "--max-restarts", "2",
        "--rdzv-endpoint", f"{SUBNET}.1:{PORT}", "--rdzv-id", "two-nodes",
        # Host detection compares host-level addresses and misses a namespace's own.
        *(["--rdzv-conf", "is_host=1"] if host else []),
        # Both namespaces share one hostname: each agent must announce its own address.
        "--local-addr", addr,
        str(WORKER), "--algo", name, "--hparams", json.dumps(HPARAMS[name]),
        "--ckpt-dir", str(tmp / "ckpt"), "--out", str(tmp / "out"),
        "--steps", str(STEPS), "--ckpt-every", str(EVERY), "--kill-at", "8", "--kill-rank", "1",
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.timeout(150)
def test_two_nodes_kill_a_worker_and_finish(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    name = "cpsgd"
    _check_buildable(name)
    nodes = TwoNodes()
    agents: list[subprocess.Popen] = []
    try:
        why = nodes.create()
        if why is not None:
            pytest.skip(f"cannot create network namespaces here: {why}")
        logs = [tmp_path / "node_a.log", tmp_path / "node_b.log"]
        for i, (ns, addr) in enumerate(zip(nodes.names, nodes.addrs)):
            agents.append(_agent(ns, addr, i == 0, tmp_path, name, logs[i]))
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
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)  # the session this test started
                agent.wait(timeout=10)
        nodes.delete()
