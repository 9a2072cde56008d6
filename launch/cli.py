"""`python -m launch`: torchrun with defaults for elastic, communication-efficient training.

Everything is parsed by torchrun's own argument parser and executed by
`torch.distributed.run.run`, so every torchrun option keeps its meaning; only defaults differ:

- one node by default, with `--standalone` semantics (a private c10d store on a free port);
- `--nproc-per-node auto` (GPUs if present, else the usable CPU cores, at most 8);
- `--max-restarts 3` (torchrun's CLI default is 0: one crash ends the job);
- a `--rdzv-endpoint` without a `--rdzv-backend` means c10d (multi-node, elastic `--nnodes MIN:MAX`);
- `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` for the workers unless already set;
- multi-node: `--rdzv-conf join_timeout=300` (torchrun: 600), which also bounds how long an agent
  waits for an answer from the rendezvous store on another node.

And three safeguards (agent.py, tether.py, exitcodes.py):

- a worker that exits with a code of `launch.exitcodes.NO_RESTART` (2: usage, configuration or
  data error; 3: divergence) ends the job at once, and the launcher exits with that code;
- every worker dies with the launcher (SIGKILL within about a second on Linux), whatever signal
  ended the launcher;
- one-node jobs keep their rendezvous store, `MASTER_ADDR` and gloo on loopback (127.0.0.1).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import uuid
from collections.abc import Sequence

import torch
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousTimeoutError,
)
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from .agent import (
    LOOPBACK_BACKEND,
    LOOPBACK_HOST,
    final_exit_agent,
    final_failure,
    register_loopback_rendezvous,
)
from .exitcodes import EXIT_USAGE, NO_RESTART
from .tether import AGENT_PID_ENV

DEFAULT_MAX_RESTARTS = 3
# How long agents wait for each other (at start and at every restart), and how long an agent's
# connection to a store on another node may go unanswered. A partition shorter than this minus
# the workers' collective timeout is survived (the restart resumes from the last checkpoint); a
# longer one ends every node within about the collective timeout plus this.
DEFAULT_JOIN_TIMEOUT_S = 300
C10D_DEFAULT_PORT = 29400
# More CPU ranks on one machine mostly add all-reduce traffic and memory; beyond this, ask
# explicitly with --nproc-per-node N.
MAX_AUTO_CPU_WORKERS = 8


def usable_cpu_count() -> int:
    """Count the CPU cores this process may run on (affinity mask and cgroup v2 quota)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def auto_nproc_per_node() -> int:
    """Return the worker count `--nproc-per-node auto` means on this machine."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.accelerator.device_count()
    return min(usable_cpu_count(), MAX_AUTO_CPU_WORKERS)


def get_parser() -> argparse.ArgumentParser:
    """Return torchrun's parser with this launcher's defaults."""
    parser = torchrun.get_args_parser()
    parser.prog = "python -m launch"
    parser.description = (
        "torchrun with elastic defaults: one node (--standalone) unless --rdzv-endpoint is given, "
        "--nproc-per-node auto, --max-restarts 3. Every torchrun option is accepted."
    )
    defaults = {"nproc_per_node": "auto", "max_restarts": DEFAULT_MAX_RESTARTS}
    for action in parser._actions:
        # torchrun's options also read PET_<NAME> from the environment (already folded into the
        # action's default); a user's PET_ variable wins over our default, as it does in torchrun.
        if action.dest in defaults and f"PET_{action.dest.upper()}" not in os.environ:
            action.default = defaults[action.dest]
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a launcher command line into torchrun's namespace, with our defaults applied.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.
    """
    args = get_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.nproc_per_node == "auto":
        args.nproc_per_node = str(auto_nproc_per_node())
    min_nodes, max_nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    if args.rdzv_endpoint and args.rdzv_backend == "static" and not args.standalone:
        # An endpoint with torchrun's default static backend is almost always meant as c10d
        # (elastic membership, restarts across nodes); static would ignore --nnodes MIN:MAX.
        args.rdzv_backend = "c10d"
    if not args.rdzv_endpoint and args.rdzv_backend == "static" and args.master_port is None:
        if max_nodes > 1:
            raise ValueError(
                f"--nnodes {args.nnodes} allows more than one node: pass --rdzv-endpoint HOST:PORT "
                "(c10d rendezvous; the same on every node)"
            )
        args.standalone = True
    if args.rdzv_backend == "c10d" and not args.standalone:
        conf = _rdzv_conf(args.rdzv_conf)
        conf.setdefault("join_timeout", str(DEFAULT_JOIN_TIMEOUT_S))
        args.rdzv_conf = ",".join(f"{k}={v}" for k, v in conf.items())
    return args


def _rdzv_conf(text: str) -> dict[str, str]:
    """`--rdzv-conf k1=v1,k2=v2` as a dict (order kept)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    return {k.strip(): v.strip() for k, v in (p if len(p) == 2 else (p[0], "") for p in pairs)}


def _set_worker_environment() -> None:
    """Set environment variables the agent and its workers need; the user's values win."""
    # Since torch 2.4 the c10d rendezvous shares its TCP store with the workers. After a restart a
    # gloo rank often reads the previous attempt's address from that store and fails with
    # "Gloo connectFullMesh failed" (refused or timed out), wasting the restart. Measured on one
    # machine with two network-namespace nodes, one worker SIGKILLed per run: without this, 3 of
    # 7 runs wasted restarts and one of them spent all 3 and failed; with it, 7 of 7 needed just
    # the one restart (earlier: 4 of 6 failed vs 8 of 8 passed). With it every attempt gets a
    # fresh MASTER_PORT. Upstream: pytorch/pytorch#135712, #167288. The agent reads it in this
    # process, so it must be in os.environ before the agent starts.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # The workers' tether (tether.py) compares its parent with this pid: the agent runs here.
    os.environ[AGENT_PID_ENV] = str(os.getpid())


def _use_loopback_rendezvous(args: argparse.Namespace) -> None:
    """`--standalone`, with the rendezvous store, MASTER_ADDR (and gloo on Linux) on 127.0.0.1.

    torchrun's standalone c10d store listens on every interface; on one node nothing needs to.
    """
    register_loopback_rendezvous()
    args.standalone = False
    args.rdzv_backend = LOOPBACK_BACKEND
    args.rdzv_endpoint = f"{LOOPBACK_HOST}:0"
    args.rdzv_id = str(uuid.uuid4())
    if args.local_addr is None:
        args.local_addr = LOOPBACK_HOST  # becomes the workers' MASTER_ADDR
    if sys.platform.startswith("linux") and "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _start_workers_tethered(args: argparse.Namespace) -> None:
    """Start every worker through `python -m launch.tether`, which ties it to this process.

    Not with `--no-python` or `--run-path` (no Python command line to prefix): those workers are
    tied to their parent by `init_distributed`, once their process group starts.
    """
    if args.no_python or args.run_path:
        return
    target = (["-m"] if args.module else []) + [args.training_script]
    args.training_script_args = target + list(args.training_script_args)
    args.training_script = "launch.tether"
    args.module = True


@record
def run(args: argparse.Namespace) -> None:
    """Start the elastic agent for parsed arguments; raises ChildFailedError when the job fails.

    Args:
        args: a namespace from `parse_args`.
    """
    _set_worker_environment()
    if "OMP_NUM_THREADS" not in os.environ and torchrun.determine_local_world_size(args.nproc_per_node) > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # what torchrun sets then, without its warning banner
    where = (
        "standalone (one node, loopback)"
        if args.standalone
        else f"{args.rdzv_backend} rendezvous at {args.rdzv_endpoint or args.master_addr}, "
        f"nnodes {args.nnodes}"
    )
    print(
        f"[launch] {args.nproc_per_node} worker(s) per node, {where}, "
        f"max restarts {args.max_restarts}",
        file=sys.stderr,
        flush=True,
    )
    store, give_up = None, float(DEFAULT_JOIN_TIMEOUT_S)
    if args.standalone:
        _use_loopback_rendezvous(args)
    elif args.rdzv_backend == "c10d" and args.rdzv_endpoint:
        store = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=C10D_DEFAULT_PORT)
        give_up = float(_rdzv_conf(args.rdzv_conf).get("join_timeout", give_up))
    _start_workers_tethered(args)
    with final_exit_agent(store, give_up):
        torchrun.run(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`commhooks-launch`, `python -m launch`).

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.
    """
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"python -m launch: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    try:
        run(args)
    except ChildFailedError as e:
        final = final_failure(e.failures)
        if final is not None:
            # The worker printed the error itself; torchrun's failure table would only repeat it.
            rank, code = final
            print(f"[launch] stopped: rank {rank} exited with code {code}: {NO_RESTART[code]}",
                  file=sys.stderr, flush=True)
            raise SystemExit(code) from None
        print(e.format_msg(), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except RendezvousError as e:
        print(f"[launch] giving up: {_rendezvous_failure(args, e)}; checkpoints are kept: run the "
              "same command on every node to resume", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _rendezvous_failure(args: argparse.Namespace, error: RendezvousError) -> str:
    """What a rendezvous error means for the user, in one line."""
    conf = _rdzv_conf(args.rdzv_conf)
    if isinstance(error, RendezvousTimeoutError):
        return (f"the other node(s) did not join within join_timeout "
                f"{conf.get('join_timeout', '?')} s (a network partition, or a node that stopped)")
    if isinstance(error, RendezvousConnectionError):
        return (f"lost the rendezvous store at {args.rdzv_endpoint} (no answer within join_timeout "
                f"{conf.get('join_timeout', '?')} s: a network partition, or the host node stopped)")
    if isinstance(error, RendezvousClosedError):
        return "another node ended the job (see its output)"
    return f"rendezvous failed: {error}"
