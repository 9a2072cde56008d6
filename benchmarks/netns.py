"""An emulated cluster on one Linux host: network namespaces joined by veth pairs and a bridge.

    with Cluster(2, rate_mbit=100) as net:       # two "nodes", each link shaped to 100 Mbit/s
        agent = net.popen(0, ["python", "-m", "launch", ...], env={"GLOO_SOCKET_IFNAME": net.ifname})
        net.set_link(1, up=False)                # partition node 1 (and heal it with up=True)
        net.counters(0)                          # bytes node 0 sent / received on its link

Layout: one *hub* namespace holds a bridge; every node namespace holds one end of a veth pair,
named ``ifname`` in every node (so one ``GLOO_SOCKET_IFNAME`` fits all), whose peer is a port of
the bridge in the hub. Nothing but the namespaces and their links is created: the addresses
(a private /24) exist only inside the node namespaces and the host's own network is not touched.
The rate is a ``tbf`` qdisc on both ends of each node's veth pair, so a node's upload and
download are both limited (this kernel has ``tbf`` but no ``netem``: no delay emulation).

Everything is removed on every exit path: ``__exit__`` (also on exceptions), an ``atexit`` hook,
and SIGINT/SIGTERM handlers that clean up before the previous handler runs. Processes started
with :meth:`Cluster.popen` are killed (their whole session) before the namespaces go, since a
namespace with a live process in it outlives ``ip netns del``.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

IFNAME = "cveth0"  # the node side of each veth pair, the same name in every node namespace
DEFAULT_PREFIX = "chn"  # names: prefix + pid + random tag + role; interface names <= 15 chars
_IP_TIMEOUT_S = 20


class NetnsUnavailable(RuntimeError):
    """Namespaces, veth pairs or tbf cannot be set up here; the message is one line saying why."""


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False)


def _must(argv: Sequence[str]) -> None:
    proc = _run(argv)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")


def tbf_args(rate_mbit: float) -> list[str]:
    """``tc`` arguments of a token bucket at ``rate_mbit`` Mbit/s.

    The bucket holds about 1 ms of traffic (at least 10 full frames): small enough that a burst
    cannot beat the rate by much over a transfer of a model, large enough that the kernel's timer
    granularity does not cut the throughput. Up to 50 ms of traffic may wait in the queue.
    """
    if not rate_mbit > 0:
        raise ValueError(f"rate_mbit must be > 0, got {rate_mbit}")
    bytes_per_s = rate_mbit * 1e6 / 8
    burst = max(15_000, int(bytes_per_s * 1e-3))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"]


_why_cache: list[str | None] = []


def why_unavailable() -> str | None:
    """One line saying why an emulated cluster cannot be made here, or None when it can.

    Checks root, ``ip`` and ``tc``, then actually creates a probe namespace with a veth pair and
    a ``tbf`` qdisc (and removes it): containers often have the tools but not the permissions.
    """
    if _why_cache:
        return _why_cache[0]
    why: str | None = None
    if os.geteuid() != 0:
        why = "network namespaces need root (this process is not root)"
    elif shutil.which("ip") is None:
        why = "no `ip` command (install iproute2)"
    elif shutil.which("tc") is None:
        why = "no `tc` command (install iproute2)"
    else:
        probe = f"{DEFAULT_PREFIX}{_base36(os.getpid())}{secrets.token_hex(2)}q"
        try:
            _must(["ip", "netns", "add", probe])
            _must(["ip", "-n", probe, "link", "add", "qa", "type", "veth", "peer", "name", "qb"])
            _must(["tc", "-n", probe, "qdisc", "add", "dev", "qa", "root", *tbf_args(100)])
        except NetnsUnavailable as err:
            why = f"cannot create network namespaces here: {err}"
        except (OSError, subprocess.TimeoutExpired) as err:
            why = f"cannot create network namespaces here: {err}"
        finally:
            _run(["ip", "netns", "del", probe])
    _why_cache.append(why)
    return why


EXIT_UNAVAILABLE = 2  # a benchmark's exit status where it cannot make its cluster


def check_available(program: str) -> int | None:
    """None where a cluster can be made; otherwise print one line saying why, return exit status 2."""
    why = why_unavailable()
    if why is None:
        return None
    print(f"{program}: cannot run: {why}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def leftovers(prefix: str) -> list[str]:
    """Namespaces whose name starts with ``prefix`` (a test checks a run left none behind)."""
    proc = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in proc.stdout.splitlines() if line.startswith(prefix)]


def _base36(x: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        x, r = divmod(x, 36)
        out = digits[r] + out
        if x == 0:
            return out


class Cluster:
    """``n`` node namespaces on one bridge, node i at ``addrs[i]``; a context manager.

    Args:
        n: number of nodes (1 to 99).
        rate_mbit: the ``tbf`` rate of every node's link, both directions; None = unshaped.
        prefix: start of every name created (at most 4 characters); the run adds its pid and a random
            tag, so concurrent runs and a crashed earlier run never collide.
        subnet: the first three octets of the nodes' /24 (private; it exists only in the nodes).
    """

    def __init__(self, n: int, *, rate_mbit: float | None = None, prefix: str = DEFAULT_PREFIX,
                 subnet: str = "10.213.7") -> None:
        if not 1 <= n <= 99:
            raise ValueError(f"n must be in 1..99, got {n}")
        if rate_mbit is not None:
            tbf_args(rate_mbit)  # validates
        self.n = n
        self.rate_mbit = rate_mbit
        self.tag = f"{prefix}{_base36(os.getpid())}{secrets.token_hex(2)[:3]}"
        if len(self.tag) + 3 > 15:
            raise ValueError(f"prefix {prefix!r} is too long for 15-character interface names")
        self.hub = f"{self.tag}h"
        self.names = [f"{self.tag}n{i}" for i in range(n)]
        self.hub_ports = [f"{self.tag}p{i}" for i in range(n)]
        self.addrs = [f"{subnet}.{i + 1}" for i in range(n)]
        self.ifname = IFNAME
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._created: list[str] = []  # namespaces made so far, removed in reverse order
        self._old_handlers: dict[int, Any] = {}
        self._closed = False
        self._closing = False
        self._pending_signal: int | None = None

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        why = why_unavailable()
        if why is not None:
            raise NetnsUnavailable(why)
        atexit.register(self.close)
        self._install_signal_handlers()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        self._add_netns(self.hub)
        _must(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _must(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for ns, port, addr in zip(self.names, self.hub_ports, self.addrs, strict=True):
            self._add_netns(ns)
            _must(["ip", "-n", self.hub, "link", "add", port, "type", "veth",
                   "peer", "name", self.ifname, "netns", ns])
            _must(["ip", "-n", self.hub, "link", "set", port, "master", "br0", "up"])
            _must(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", self.ifname])
            _must(["ip", "-n", ns, "link", "set", self.ifname, "up"])
            _must(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.rate_mbit is not None:
                # Upload: the node's own end; download: the bridge's port towards the node.
                _must(["tc", "-n", ns, "qdisc", "add", "dev", self.ifname, "root",
                       *tbf_args(self.rate_mbit)])
                _must(["tc", "-n", self.hub, "qdisc", "add", "dev", port, "root",
                       *tbf_args(self.rate_mbit)])

    def _add_netns(self, name: str) -> None:
        _must(["ip", "netns", "add", name])
        self._created.append(name)

    def close(self) -> None:
        """Kill the processes started here, delete every namespace (and so every link). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
            for proc in self._procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # its own session, started here
                    except ProcessLookupError:
                        pass
            for proc in self._procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            # Deleting a node namespace destroys its veth end and with it the bridge's port.
            for name in reversed(self._created):
                _run(["ip", "netns", "del", name])
            self._created.clear()
            self._restore_signal_handlers()
            atexit.unregister(self.close)
            self._closing = False
        if self._pending_signal is not None:  # arrived while cleaning up: deliver it now
            os.kill(os.getpid(), self._pending_signal)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit still applies
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._closing:  # interrupting the clean-up would leave namespaces behind
            self._pending_signal = signum
            return
        previous = self._old_handlers.get(signum, signal.SIG_DFL)
        self.close()  # also puts the previous handler back
        if callable(previous):
            previous(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # SIG_IGN: the process had chosen to ignore it; cleaning up was all we owed.

    # -- use -------------------------------------------------------------------------------
    def popen(self, node: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside node ``node``'s namespace, in a session of its own.

        Keyword arguments go to :class:`subprocess.Popen`; the process (and its children) is
        killed when the cluster closes, if it is still running.
        """
        self._check_open()
        kwargs.setdefault("start_new_session", True)
        if not kwargs["start_new_session"]:
            raise ValueError("start_new_session must stay True: close() kills the whole session")
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[node], *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def set_link(self, node: int, *, up: bool) -> None:
        """Cut (``up=False``) or restore node ``node``'s link: its bridge port goes down/up."""
        self._check_open()
        _must(["ip", "-n", self.hub, "link", "set", self.hub_ports[node], "up" if up else "down"])

    def counters(self, node: int) -> dict[str, int]:
        """Bytes and packets node ``node`` sent (tx) and received (rx) on its link, since creation.

        Frame bytes as the kernel counts them: payload plus TCP/IP and Ethernet headers.
        """
        self._check_open()
        proc = _run(["ip", "-n", self.names[node], "-j", "-s", "link", "show", "dev", self.ifname])
        if proc.returncode != 0:
            raise RuntimeError(f"cannot read counters of node {node}: {proc.stderr.strip()}")
        stats = json.loads(proc.stdout)[0]["stats64"]
        return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]}

    def _check_open(self) -> None:
        if self._closed or not self._created:
            raise RuntimeError("the cluster is not set up (use it inside `with Cluster(...)`)")
