"""How much weight traffic hides behind computation: DPSGD's exchange, Elastic-SGD's reference.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.gossip_overlap

Measured side by side in one run, interleaved rounds, the same model and data on every row:
  local           — local SGD, no weight traffic (CPSGD that never averages);
  dpsgd           — as shipped: the exchange (receives posted before sends) starts from the comm
                    hook at the first gradient bucket and completes in step();
  dpsgd blocking  — compute, then the same exchange started and waited for inside step();
  easgd           — as shipped: the reference all-reduce starts with the step, runs during
                    forward and backward, and is waited for in step();
  exchange, receives first / sends first — one raw pairwise exchange of the weights with the
                    ring neighbours, posted in either order (gloo serialises the two directions
                    of an exchange whose send is posted before the peer's receive: on a shaped
                    link that halves its speed; on loopback the difference is small);
  all-reduce      — one raw all-reduce of the weights.
hidden = 1 - (overlapped - local) / (cost when blocking): the fraction of the traffic's cost hidden
(for Elastic-SGD the blocking cost is the raw all-reduce of the same bytes).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import commhooks

from .common import ddp_without_buffer_sync, init, say, timed
from .sync_cost import make_model


def raw_exchange(tensor: torch.Tensor, inbox: list[torch.Tensor], receives_first: bool) -> Callable[[], None]:
    """One pairwise exchange of ``tensor`` with the ring neighbours, posted in the given order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    peers = sorted({(rank - 1) % world, (rank + 1) % world} - {rank})

    def run() -> None:
        recvs = [(dist.irecv, box, p) for box, p in zip(inbox, peers, strict=True)]
        sends = [(dist.isend, tensor, p) for p in peers]
        ops = recvs + sends if receives_first else sends + recvs
        for work in [op(t, p) for op, t, p in ops]:
            assert work is not None  # None only on a rank outside the group
            work.wait()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "mlp"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rank, world = init()
    x = torch.randn(args.batch, 3, 32, 32) if args.model == "resnet18" else torch.randn(args.batch, 1024)

    def setup(name: str, **hp: Any) -> tuple[commhooks.Algorithm, Callable[[], None]]:
        ddp = ddp_without_buffer_sync(make_model(args.model))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        algo = commhooks.build(name, ddp, opt, **hp)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            ddp(x).float().pow(2).mean().backward()
            algo.step()
        return algo, run

    _, local = setup("cpsgd", period=10**9)       # local steps, never averaged
    _, overlap = setup("dpsgd", topology="ring")  # exchange from the hook, during backward
    blocking_algo, blocking = setup("dpsgd", topology="ring")
    gossip = next(c for c in blocking_algo.components if isinstance(c, commhooks.GossipMixing))
    gossip.overlap_backward = False  # step() starts the exchange, then waits at once
    _, easgd = setup("easgd", rho=0.1, scoping=False)
    flat = torch.cat([s.reshape(-1) for s in blocking_algo.ctx.weights.comm_segments()])
    inbox = [torch.empty_like(flat) for _ in range(min(2, world - 1))]
    runs = {
        "local": local,
        "dpsgd": overlap,
        "dpsgd blocking": blocking,
        "easgd": easgd,
        "exchange, receives first": raw_exchange(flat, inbox, receives_first=True),
        "exchange, sends first": raw_exchange(flat, inbox, receives_first=False),
        "all-reduce": lambda: dist.all_reduce(flat),
    }

    best = {label: float("inf") for label in runs}
    for _ in range(args.rounds):  # interleaved rounds: machine drift hits all alike
        for label, fn in runs.items():
            best[label] = min(best[label], timed(fn, args.repeats))
    say(f"model {args.model}, batch {args.batch}/rank, {world} gloo ranks, "
        f"{flat.numel() * flat.element_size() / 1e6:.1f} MB of weights")
    for label, t in best.items():
        say(f"{label:<28}{t:>9.4f} s")
    exchange = best["dpsgd blocking"] - best["local"]
    hidden = 1 - (best["dpsgd"] - best["local"]) / exchange if exchange > 0 else float("nan")
    say(f"dpsgd: exchange cost when blocking {exchange:.4f} s; hidden by overlap: {100 * hidden:.0f}%")
    ar = best["all-reduce"]
    hidden = 1 - (best["easgd"] - best["local"]) / ar if ar > 0 else float("nan")
    say(f"easgd: reference all-reduce {ar:.4f} s; hidden by overlap: {100 * hidden:.0f}% "
        "(its in-place pull arithmetic counts against it)")
    ratio = best["exchange, sends first"] / best["exchange, receives first"]
    say(f"raw exchange: sends first takes {ratio:.2f}x the time of receives first")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
