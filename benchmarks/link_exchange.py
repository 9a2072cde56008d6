"""One pairwise gossip exchange against the link's bound, on a shaped two-node link.

    python -m benchmarks.link_exchange                       # 2 and 16 MB at 100 and 1000 Mbit/s
    python -m benchmarks.link_exchange --sizes-mb 46 --rates 1000 --repeats 3

Two nodes (:class:`benchmarks.netns.Cluster`, each link shaped by ``tbf`` to B), one rank each,
joined through ``python -m launch`` (c10d rendezvous). For S bytes the ranks time, as the median
of ``--repeats`` (the slowest rank's):

  gossip       DPSGD's exchange done by the library: ``commhooks.build("dpsgd",
               topology="random-pair")`` on a model of S bytes, ``algo.step()`` with no gradients,
               which starts the pairwise exchange, waits for it and mixes (each replica sends its
               S bytes to its partner and receives the partner's, concurrently);
  recv-first   raw ``irecv`` then ``isend`` of S bytes each way, then wait both;
  send-first   raw ``isend`` then ``irecv`` (the order that serialises the two directions);
  all-reduce   a raw ``all_reduce`` of S bytes (with two ranks a ring moves S bytes each way).

Each time is printed as a ratio to S/B, the time the link needs for S bytes in one direction:
1.0 is the bound (headers make about 1.05 the best reachable). Aim for the gossip exchange: at
most 1.15.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .netns import EXIT_UNAVAILABLE, Cluster, NetnsUnavailable, check_available

METHODS = ("gossip", "recv-first", "send-first", "all-reduce")
TARGET_RATIO = 1.15


def _float_list(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------------------------------
# The ranks (under torchrun)


def _measure(numel: int, repeats: int) -> dict[str, float]:
    """Seconds of each method for ``numel`` float32 values (the slowest rank's median)."""
    import torch
    import torch.distributed as dist

    import commhooks

    from .common import ddp_without_buffer_sync, timed

    rank = dist.get_rank()
    peer = 1 - rank

    class Flat(torch.nn.Module):  # one parameter of S bytes: the exchange is all there is
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(numel))

    ddp = ddp_without_buffer_sync(Flat())
    # lr 0 and no gradients: the optimizer step changes nothing; step() is the exchange + mix.
    algo = commhooks.build("dpsgd", ddp, torch.optim.SGD(ddp.parameters(), lr=0.0),
                           topology="random-pair", log_every=0, seed=0)
    send, recv = torch.full((numel,), float(rank)), torch.empty(numel)

    def post(recv_first: bool) -> None:
        if recv_first:
            works = [dist.irecv(recv, peer), dist.isend(send, peer)]
        else:
            works = [dist.isend(send, peer), dist.irecv(recv, peer)]
        for w in works:
            assert w is not None  # None only on a rank outside the group
            w.wait()

    fns = {"gossip": algo.step, "recv-first": lambda: post(True), "send-first": lambda: post(False),
           "all-reduce": lambda: dist.all_reduce(send)}
    return {name: timed(fns[name], repeats, warmup=1) for name in METHODS}


def worker(sizes_mb: list[float], repeats: int, out: str) -> None:
    import torch.distributed as dist

    from .common import init, say

    rank, world = init()
    if world != 2:
        raise SystemExit(f"link_exchange runs on exactly 2 ranks, got {world}")
    results = []
    for mb in sizes_mb:
        numel = max(1, int(mb * 1e6) // 4)
        row = {"bytes": numel * 4, **_measure(numel, repeats)}
        say(f"{row['bytes'] / 1e6:.2f} MB: " + ", ".join(f"{m} {row[m]:.4f} s" for m in METHODS))
        results.append(row)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The driver (root, outside the namespaces)


def ratios(row: dict[str, float], rate_mbit: float) -> dict[str, float]:
    """Each method's time over S/B, S the row's bytes and B the rate in bytes per second."""
    bound = row["bytes"] / (rate_mbit * 1e6 / 8)
    return {m: row[m] / bound for m in METHODS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.link_exchange", description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=_float_list, default=[2.0, 16.0], help="S in MB (2,16)")
    p.add_argument("--rates", type=_float_list, default=[100.0, 1000.0], help="B in Mbit/s (100,1000)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per method, median (5)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per rate (600)")
    p.add_argument("--out", default="benchmarks-out/link_exchange", help="results folder")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.sizes_mb, args.repeats, args.worker_out)
        return 0
    if args.repeats < 1 or not args.sizes_mb or min(args.sizes_mb) <= 0 or not args.rates or min(args.rates) <= 0:
        p.error("--repeats, --sizes-mb and --rates must be positive")
    refused = check_available("benchmarks.link_exchange")
    if refused is not None:
        return refused

    from rich.console import Console
    from rich.table import Table

    from .cluster import run_job

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"time / (S/B) on a 2-node tbf link, median of {args.repeats} (target for "
                        f"gossip <= {TARGET_RATIO})")
    for col in ("Mbit/s", "MB", "S/B s", *METHODS):
        table.add_column(col, justify="right")
    summary = []
    try:
        for i, rate in enumerate(args.rates):
            with Cluster(2, rate_mbit=rate, prefix="chl") as net:
                rows_path = out / f"rows_{rate:g}mbit.json"
                rows_path.unlink(missing_ok=True)
                program = ["-m", "benchmarks.link_exchange", "--worker", "--worker-out", str(rows_path.resolve()),
                           "--sizes-mb", ",".join(map(str, args.sizes_mb)), "--repeats", str(args.repeats)]
                job = run_job(net, program, ranks_per_node=1, threads=None, timeout=args.timeout,
                              index=i, log_dir=out / f"{rate:g}mbit")
                if job.error is not None:
                    print(f"benchmarks.link_exchange: {rate:g} Mbit/s failed: {job.error}", file=sys.stderr)
                    return 1
                for row in json.loads(rows_path.read_text()):
                    r = ratios(row, rate)
                    summary.append({"rate_mbit": rate, **row, "ratio": r})
                    table.add_row(f"{rate:g}", f"{row['bytes'] / 1e6:.2f}",
                                  f"{row['bytes'] / (rate * 1e6 / 8):.3f}",
                                  *(f"{r[m]:.2f}" for m in METHODS))
    except NetnsUnavailable as err:
        print(f"benchmarks.link_exchange: cannot run: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print("benchmarks.link_exchange: interrupted; namespaces removed", file=sys.stderr)
        return 130
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    worst = max(s["ratio"]["gossip"] for s in summary)
    print(f"gossip exchange, worst ratio {worst:.2f} (target <= {TARGET_RATIO}): "
          f"{'met' if worst <= TARGET_RATIO else 'MISSED'}; wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
