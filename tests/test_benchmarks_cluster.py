"""The emulated cluster (benchmarks.netns) and its benchmark (benchmarks.cluster).

Needs root, `ip` and `tc`; every test skips with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.netns import Cluster, leftovers, why_unavailable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def netns_ok() -> None:
    why = why_unavailable()
    if why is not None:
        pytest.skip(why)


def _reachable(net: Cluster, src: int, dst: int) -> bool:
    """Whether node src can open a TCP connection to node dst (a listener there, 2 s at most)."""
    server = net.popen(dst, [sys.executable, "-c", (
        "import socket; s = socket.socket(); s.bind(('0.0.0.0', 5701)); s.listen(1);"
        "s.settimeout(3); c, _ = s.accept()")], stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    client = net.popen(src, [sys.executable, "-c", (
        f"import socket; socket.create_connection(('{net.addrs[dst]}', 5701), timeout=2)")],
        stderr=subprocess.DEVNULL)
    ok = client.wait(timeout=10) == 0
    server.wait(timeout=10)
    return ok


@pytest.mark.timeout(60)
def test_cluster_connects_counts_and_partitions(netns_ok: None) -> None:
    with Cluster(2, prefix="chtc") as net:
        before = net.counters(1)["rx_bytes"]
        assert _reachable(net, 0, 1)
        assert net.counters(1)["rx_bytes"] > before  # the connection went over node 1's link
        net.set_link(1, up=False)
        assert not _reachable(net, 0, 1)
        net.set_link(1, up=True)
        assert _reachable(net, 0, 1)
        prefix = net.tag
    assert leftovers(prefix) == []


@pytest.mark.timeout(60)
def test_cluster_removes_everything_after_an_exception(netns_ok: None) -> None:
    with pytest.raises(KeyError):
        with Cluster(3, rate_mbit=50, prefix="chtc") as net:
            prefix = net.tag
            assert len(leftovers(prefix)) == 4  # hub + 3 nodes
            sleeper = net.popen(2, ["sleep", "60"])
            raise KeyError("boom")
    assert leftovers(prefix) == []
    assert sleeper.poll() is not None  # the process it started is gone with it


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cluster_removes_everything_on_a_signal(netns_ok: None, sig: signal.Signals) -> None:
    script = (
        "import sys, time\n"
        "from benchmarks.netns import Cluster\n"
        "with Cluster(2, prefix='chts') as net:\n"
        "    print(net.tag, flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            prefix = proc.stdout.readline().strip()
            assert prefix.startswith("chts"), proc.stderr.read()
            assert len(leftovers(prefix)) == 3
            proc.send_signal(sig)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode != 0
    assert leftovers(prefix) == []
