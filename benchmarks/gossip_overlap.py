"""How much of the DPSGD weight exchange hides behind backward (issue: commhooks core, part 2).

    torchrun --standalone --nproc_per_node=2 -m benchmarks.gossip_overlap

Three step times, measured side by side in one run on the same model and data:
  local     — no weight exchange at all (DPSGD's step without mixing: local SGD, no averaging);
  overlap   — DPSGD as shipped: the exchange starts from the comm hook at the first gradient
              bucket and completes in step();
  blocking  — compute, then the same exchange started and waited for inside step().
hidden = (blocking - overlap) / (blocking - local): the fraction of the exchange's cost hidden.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks

from .common import init, say, timed
from .sync_cost import make_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "mlp"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    rank, world = init()
    x = torch.randn(args.batch, 3, 32, 32) if args.model == "resnet18" else torch.randn(args.batch, 1024)

    def setup(name: str, **hp: object):
        ddp = DDP(make_model(args.model), **commhooks.ddp_buffer_sync_kwargs(False))
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
    blocking_algo.ctx.grad_state.on_first_bucket = None  # step() starts it, then waits at once

    rounds = {"local": [], "overlap": [], "blocking": []}
    for _ in range(3):  # interleaved rounds: machine drift hits all three alike
        for label, fn in (("local", local), ("overlap", overlap), ("blocking", blocking)):
            rounds[label].append(timed(fn, args.repeats))
    t = {k: min(v) for k, v in rounds.items()}
    nbytes = sum(s.numel() * s.element_size() for s in blocking_algo.ctx.weights.comm_segments())
    say(f"model {args.model}, batch {args.batch}/rank, {world} gloo ranks, exchange {nbytes / 1e6:.1f} MB each way")
    for label in ("local", "overlap", "blocking"):
        say(f"{label:<10}{t[label]:>9.4f} s/step")
    exchange = t["blocking"] - t["local"]
    hidden = (t["blocking"] - t["overlap"]) / exchange if exchange > 0 else float("nan")
    say(f"exchange cost when blocking: {exchange:.4f} s; hidden by overlap: {100 * hidden:.0f}%")


if __name__ == "__main__":
    main()
