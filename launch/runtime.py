"""Start-up and shutdown for training scripts, under torchrun or as one plain process.

    rt = init_distributed(seed=0, config=vars(args))
    ...
    shutdown()

Under torchrun (or `python -m launch`) the process group comes from torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Without it the script runs as a single process
with a world-size-1 group over an in-memory store, so collectives, DDP and `commhooks.build`
work unchanged.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, get_error_handler, record

import commhooks

from .tether import die_with_parent

__all__ = ["Runtime", "init_distributed", "shutdown", "seed_everything", "record"]


@dataclass(kw_only=True)
class Runtime:
    """Where this process stands in the job.

    Args:
        rank: global rank.
        world_size: number of ranks in this attempt (may change across elastic restarts).
        local_rank: rank on this node (picks the GPU).
        device: the device this rank computes on.
        backend: "nccl" with CUDA (gloo serves CPU tensors alongside), "gloo" otherwise.
        restart_count: TORCHELASTIC_RESTART_COUNT, 0 on the first attempt and without torchrun.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    restart_count: int

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints, logs and writes shared files."""
        return self.rank == 0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators.

    Args:
        seed: the seed; the same on every rank, so that model initialisations agree.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


class _ErrorRecordingHook:
    """A `sys.excepthook` that writes the exception to torchrun's error file, then calls the
    hook it replaced."""

    def __init__(self, handler: ErrorHandler, previous: Callable[[type[BaseException], BaseException, TracebackType | None], Any]) -> None:
        self.handler = handler
        self.previous = previous

    def __call__(self, kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            try:
                # record_exception formats the *current* exception (traceback.format_exc), which
                # is empty inside an excepthook; re-raising makes it current again.
                raise exc.with_traceback(tb)
            except BaseException as current:  # noqa: BLE001 - re-raised exception
                self.handler.record_exception(current)
            exc.__traceback__ = tb  # show the user's traceback, without this hook's frame
        self.previous(kind, exc, tb)


def _install_error_recorder() -> None:
    """Write uncaught exceptions to torchrun's error file, as `@record` on main would.

    The agent then shows the failing rank's real exception in its summary instead of just an exit
    code. Scripts that already decorate their main with `record` get the same file twice; harmless.
    """
    if isinstance(sys.excepthook, _ErrorRecordingHook):
        return  # already installed by an earlier init_distributed in this process
    handler = get_error_handler()
    handler.initialize()  # faulthandler: tracebacks of all threads on a fatal signal
    sys.excepthook = _ErrorRecordingHook(handler, sys.excepthook)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """The process group's TCP store, listening on loopback only, when MASTER_ADDR is loopback.

    env:// would start rank 0's store on every interface whatever MASTER_ADDR says; a one-node
    job (the launcher's default) needs none of them. None: use env:// as usual (other nodes, or
    workers told to share the agent's store).
    """
    host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not (_is_loopback(host) and port) or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    listen_fd = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        server = socket.create_server((address, int(port)), family=family, backlog=128)
        listen_fd = server.detach()  # the store owns the listening socket from here on
    return dist.TCPStore(host, int(port), world_size=world_size, is_master=rank == 0,
                         timeout=timeout, master_listen_fd=listen_fd)


def init_distributed(
    *,
    seed: int,
    config: Mapping[str, object] | None = None,
    device: str | None = None,
    timeout_s: float = 300.0,
) -> Runtime:
    """Initialise the default process group, pick the device, seed, and check the configuration.

    Args:
        seed: seed for Python, NumPy and torch, the same on every rank (identical model
            initialisation; per-rank data comes from the sampler).
        config: the run's configuration (e.g. `vars(args)` minus per-rank keys). Its values are
            hashed and compared across ranks; any difference raises RuntimeError on every rank
            naming the keys, instead of a later hang or silent divergence.
        device: "cpu", "cuda", "cuda:N"; None means cuda:LOCAL_RANK when CUDA is available,
            else cpu. A bare "cuda" also means cuda:LOCAL_RANK.
        timeout_s: timeout of every collective of the default group (gloo's default is 30
            minutes, NCCL's 10): a dead or diverged peer turns into an error, not a hang.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    restart_count = _env_int("TORCHELASTIC_RESTART_COUNT", 0)

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"

    if under_torchrun:
        _install_error_recorder()
        if "TORCHELASTIC_RUN_ID" in os.environ:
            die_with_parent()  # already done by `python -m launch`'s workers; plain torchrun's too

    if not dist.is_initialized():
        # With CUDA, gloo serves CPU tensors beside NCCL (small CPU-side collectives such as the
        # config check, or CPU state in a checkpoint) instead of failing on them.
        pg_backend = "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if under_torchrun:
            dist.init_process_group(
                pg_backend,
                store=_loopback_store(rank, world_size, timeout),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=dev if dev.type == "cuda" else None,
            )
        else:
            # A single process needs no rendezvous: an in-memory store, no port to collide on.
            dist.init_process_group(
                pg_backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )

    seed_everything(seed)
    rt = Runtime(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=dev,
        backend=backend,
        restart_count=restart_count,
    )
    fields: dict[str, object] = {"seed": seed, **(dict(config) if config is not None else {})}
    commhooks.check_same_across_ranks(fields, device=dev)
    return rt


def shutdown() -> None:
    """Destroy the default process group (if any) so the process exits without gloo/NCCL noise."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
