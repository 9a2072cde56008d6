"""The launcher's torchelastic agent: restart policy, bounded store reads, loopback rendezvous.

`python -m launch` runs `torch.distributed.run` in-process; two things are added, both through
torchelastic's own extension points rather than a launcher of our own:

- `FinalExitAgent`, a `LocalElasticAgent` whose worker monitor ends the job (no restart) when a
  worker exits with a code of `launch.exitcodes.NO_RESTART` (usage error, missing data,
  divergence). torchrun builds its agent inside `launch_agent` with no factory argument, so
  `final_exit_agent()` swaps the class in `torch.distributed.launcher.api` for the duration of the
  run. Crashes, signals and lost peers still use the restarts.
- the agent's connections to a remote rendezvous store give up after a bounded time without an
  answer (TCP user timeout and keep-alive probes, Linux). Without that, a non-host agent whose
  link goes down blocks in a store read that has no timeout (measured: 15 minutes and more,
  until the kernel drops the connection) instead of failing or restarting.
- the `c10d-loopback` rendezvous backend: the c10d rendezvous with its TCP store listening on
  127.0.0.1 only (a `TCPStore` binds every interface whatever host it is given, so the store gets
  a socket already bound to loopback). One-node jobs use it instead of `--standalone`'s c10d.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, cast

import torch.distributed.launcher.api as launcher_api
from torch.distributed import TCPStore
from torch.distributed.elastic.agent.server.api import (
    RunResult,
    WorkerGroup,
    WorkerState,
)
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
    C10dRendezvousBackend,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from .exitcodes import NO_RESTART

__all__ = [
    "LOOPBACK_BACKEND",
    "FinalExitAgent",
    "final_exit_agent",
    "final_failure",
    "register_loopback_rendezvous",
]

LOOPBACK_BACKEND = "c10d-loopback"
LOOPBACK_HOST = "127.0.0.1"


def final_failure(failures: Mapping[int, ProcessFailure]) -> tuple[int, int] | None:
    """(rank, exit code) of the lowest rank that exited with a no-restart code, else None."""
    for rank in sorted(failures):
        if failures[rank].exitcode in NO_RESTART:
            return rank, failures[rank].exitcode
    return None


def bound_connections_to(host: str, port: int, seconds: float) -> int:
    """Make this process's open TCP connections to `host:port` fail after `seconds` unanswered.

    TCP_USER_TIMEOUT ends a connection whose sent data stays unacknowledged that long (a request
    into a partition); keep-alive probes end an idle one whose peer vanished (a reply that never
    comes). A blocked read then raises instead of waiting for the kernel's retransmission limit.
    Linux only; elsewhere (and for sockets it cannot inspect) nothing changes.

    Returns:
        how many connections were set.
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        # AF_INET/AF_INET6 socket addresses start with the address as text
        peers = {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return 0
    peers |= {f"::ffff:{a}" for a in peers if ":" not in a}  # IPv4 seen through an IPv6 socket
    probes = 5
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.getpeername()[:2] not in {(p, port) for p in peers}:
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probes)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probes)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, math.ceil(seconds / probes)))
                count += 1
            except OSError:
                continue
    return count


class FinalExitAgent(LocalElasticAgent):
    """A `LocalElasticAgent` that does not restart workers after a deterministic failure.

    Class attributes (set by `final_exit_agent`): `store_endpoint`, the remote rendezvous store
    as (host, port) or None, and `store_give_up_s`, how long its connections may go unanswered.
    """

    store_endpoint: tuple[str, int] | None = None
    store_give_up_s: float = 300.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # torchrun's own arguments, passed through
        super().__init__(*args, **kwargs)
        # The rendezvous handler (and so its store connection) exists by now.
        if self.store_endpoint is not None:
            bound_connections_to(*self.store_endpoint, self.store_give_up_s)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result: RunResult = super()._monitor_workers(worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            final = final_failure(result.failures)
            if final is not None and self._remaining_restarts > 0:
                rank, code = final
                print(f"[launch] rank {rank} exited with code {code}: {NO_RESTART[code]}; a restart "
                      f"would fail the same way, so the {self._remaining_restarts} remaining "
                      "restart(s) are not used", file=sys.stderr, flush=True)
                # The base class's loop then stops the workers and returns the failure.
                self._remaining_restarts = 0
        return result


@contextmanager
def final_exit_agent(
    store_endpoint: tuple[str, int] | None = None, store_give_up_s: float = 300.0
) -> Iterator[None]:
    """Within the block, torchrun's `launch_agent` builds a `FinalExitAgent`.

    Args:
        store_endpoint: (host, port) of a rendezvous store on another node, or None.
        store_give_up_s: how long the agent's connections to it may stay unanswered.
    """
    agent = cast("type[FinalExitAgent]", type("FinalExitAgent", (FinalExitAgent,),
                                              {"store_endpoint": store_endpoint, "store_give_up_s": store_give_up_s}))
    original = launcher_api.LocalElasticAgent
    # mypy forbids assigning to a class name ("Cannot assign to a type"); swapping torchrun's
    # agent class is the point here (launch_agent takes no factory).
    launcher_api.LocalElasticAgent = agent  # type: ignore[misc]
    try:
        yield
    finally:
        launcher_api.LocalElasticAgent = original  # type: ignore[misc]  # as above


class _LoopbackC10dBackend(C10dRendezvousBackend):
    """The c10d rendezvous backend under its own name (torchelastic checks that it matches)."""

    @property
    def name(self) -> str:
        return LOOPBACK_BACKEND


def _create_loopback_handler(params: RendezvousParameters) -> RendezvousHandler:
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=0)
    # The socket is bound and listening before the store takes it over (master_listen_fd).
    server = socket.create_server((host, port), backlog=128)
    read_timeout = params.get_as_int("read_timeout", 60)
    assert read_timeout is not None  # None only without a default
    store = TCPStore(
        host, server.getsockname()[1], is_master=True, wait_for_workers=False,
        timeout=timedelta(seconds=read_timeout), master_listen_fd=server.detach(),
    )
    return create_handler(store, _LoopbackC10dBackend(store, params.run_id), params)


def register_loopback_rendezvous() -> None:
    """Make `--rdzv-backend c10d-loopback` (endpoint 127.0.0.1:PORT, 0 = any) available."""
    rendezvous_handler_registry.register(LOOPBACK_BACKEND, _create_loopback_handler)
