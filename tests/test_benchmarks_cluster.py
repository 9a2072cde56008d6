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
from typing import Any

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
    with pytest.raises(KeyError), Cluster(3, rate_mbit=50, prefix="chtc") as net:
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
        assert proc.stdout is not None and proc.stderr is not None
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


# ---------------------------------------------------------------------------------------------
# benchmarks.cluster: summaries (no namespaces needed) and the smoke run


def _run(label: str, train_s: float, reach: float | None, rnd: int = 0, **kw: Any):
    from benchmarks.cluster import RunResult

    evals = [{"step": 1, "epoch": 1.0, "seconds": train_s / 2, "val_acc": 0.5},
             {"step": 2, "epoch": 2.0, "seconds": reach if reach else train_s, "val_acc": 0.99 if reach else 0.9}]
    return RunResult(label=label, algo=label.split()[0], nodes=2, ranks_per_node=1, rate_mbit=100.0,
                     round=rnd, command="", train_s=train_s, val_acc=evals[-1]["val_acc"], steps=2,
                     evals=evals, time_to_target_s=reach, **kw)


def test_time_to_target_is_the_first_evaluation_reaching_it() -> None:
    from benchmarks.cluster import time_to_target

    evals = [{"seconds": 1.0, "val_acc": 0.9}, {"seconds": 2.0, "val_acc": 0.985},
             {"seconds": 3.0, "val_acc": 0.97}, {"seconds": 4.0, "val_acc": 0.99}]
    assert time_to_target(evals, 0.98) == 2.0
    assert time_to_target(evals, 0.995) is None


def test_summary_takes_medians_and_speedups_over_ssgd() -> None:
    from benchmarks.cluster import markdown, summarize

    runs = [_run("ssgd", 40.0, 30.0, 0), _run("ssgd", 44.0, 34.0, 1), _run("ssgd", 60.0, 50.0, 2),
            _run("cpsgd", 10.0, 8.0, 0), _run("cpsgd", 12.0, 9.0, 1), _run("cpsgd", 11.0, None, 2),
            _run("dpsgd", 80.0, 70.0, 0, error="agents exited with [1, 1]")]
    rows = {r["label"]: r for r in summarize(runs)}
    assert rows["ssgd"]["train_s"] == 44.0 and rows["ssgd"]["time_to_target_s"] == 34.0
    assert rows["cpsgd"]["train_s"] == 11.0
    assert rows["cpsgd"]["speedup_same_epochs"] == pytest.approx(4.0)
    # one round never reached the target: no median time to it, no speed-up to it
    assert rows["cpsgd"]["time_to_target_s"] is None and rows["cpsgd"]["speedup_to_target"] is None
    assert rows["ssgd"]["speedup_to_target"] == 1.0
    assert rows["dpsgd"]["failed"] == 1 and rows["dpsgd"]["train_s"] is None
    meta = {"workload": "w", "target": 0.98, "rounds": 3, "date": "d", "command": "c"}
    text = markdown(list(rows.values()), meta)
    assert "| 2 | 100 | cpsgd | 0.9900 | 11.0 | - | 4.00 | - |" in text
    assert "| dpsgd |" in text and "failed" in text


def test_refuses_with_one_line_where_namespaces_cannot_be_made(monkeypatch, capsys) -> None:
    from benchmarks import cluster, netns

    monkeypatch.setattr(netns, "why_unavailable", lambda: "network namespaces need root (test)")
    assert cluster.main(["--quick", "--out", "unused"]) == cluster.EXIT_UNAVAILABLE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["benchmarks.cluster: cannot run: network namespaces need root (test)"]


@pytest.mark.timeout(120)
def test_quick_run_end_to_end(netns_ok: None, tmp_path: Path) -> None:
    """`python -m benchmarks.cluster --quick`: 2 nodes, 2 algorithms, a few steps each.

    About 35 s on two idle cores, nearly all of it eight Python processes importing torch (two
    agents and two workers per run); the limit leaves room for a loaded machine.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = set(leftovers("chb"))  # another run's, if any
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cluster", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    doc = json.loads((tmp_path / "results.json").read_text())
    rows = {r["label"]: r for r in doc["summary"]}
    assert set(rows) == {"ssgd", "cpsgd"}
    S = doc["meta"]["model_bytes"]
    for r in rows.values():
        assert r["steps"] == 12 and r["val_acc"] is not None and r["evals"]
        # what the veth counters saw is at least what the ranks handed to collectives
        assert r["wire_tx_bytes_per_node"] >= r["comm_bytes"] > 0
    assert rows["ssgd"]["comm_bytes"] == 12 * S  # one gradient all-reduce of S per step
    assert rows["cpsgd"]["comm_bytes"] < rows["ssgd"]["comm_bytes"]
    assert (tmp_path / "results.md").read_text().count("\n| 2 |") == 2
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert set(leftovers("chb")) <= before  # the run removed its namespaces
    print(f"quick run: {time.monotonic() - start:.1f} s")
