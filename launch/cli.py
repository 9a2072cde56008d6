"""`python -m launch`: torchrun with defaults for elastic, communication-efficient training.

Everything is parsed by torchrun's own argument parser and executed by
`torch.distributed.run.run`, so every torchrun option keeps its meaning; only defaults differ:

- one node by default, with `--standalone` semantics (a private c10d store on a free port);
- `--nproc-per-node auto` (GPUs if present, else the usable CPU cores, at most 8);
- `--max-restarts 3` (torchrun's CLI default is 0: one crash ends the job);
- a `--rdzv-endpoint` without a `--rdzv-backend` means c10d (multi-node, elastic `--nnodes MIN:MAX`);
- `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` for the workers unless already set.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import record

DEFAULT_MAX_RESTARTS = 3
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
    return args


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
        "standalone (one node)"
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
        raise SystemExit(2) from None
    run(args)
