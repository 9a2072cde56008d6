"""What a weight synchronisation costs, side by side in one run (README.md, "Benchmarks").

    torchrun --standalone --nproc_per_node=2 -m benchmarks.sync_cost --model resnet18

Compares, on the same bytes: a raw all-reduce of one flat tensor; commhooks' bare mean (the
parameters live in a flat buffer: one in-place all-reduce); commhooks' CPSGD sync (that mean and
the integer buffers' max, nothing else); its ADPSGD sync (plus one device copy and the exact
consensus distance with its scalar all-reduce, which only ADPSGD's controller needs); PyTorch's
``PeriodicModelAverager``. Then the SSGD hook against plain DDP on a full training step.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from commhooks import replica_mean_, synchronize_weights

from .common import ddp_without_buffer_sync, init, say, timed


def make_model(name: str) -> torch.nn.Module:
    if name == "resnet18":
        import torchvision

        resnet: torch.nn.Module = torchvision.models.resnet18(num_classes=10)
        return resnet
    return torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "mlp"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rank, world = init()

    model = make_model(args.model)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    say(f"model {args.model}: {nbytes / 1e6:.1f} MB of parameters, {world} gloo ranks, best of 3 interleaved medians of {args.repeats}")

    raw = torch.randn(nbytes // 4)
    torch_model = make_model(args.model)
    for p in torch_model.parameters():  # it skips parameters without a gradient
        p.grad = torch.zeros_like(p)
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    world_group = dist.group.WORLD
    assert world_group is not None  # init() made the default group

    ddp = ddp_without_buffer_sync(make_model(args.model))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    algo = commhooks.build("cpsgd", ddp, opt, period=1, buffers="local")
    ctx = algo.ctx
    scratch = [torch.empty_like(s) for s in ctx.weights.param_segments()]
    syncs = {
        "raw all-reduce of one flat tensor": lambda: dist.all_reduce(raw),
        "commhooks mean (flat, in place)": lambda: replica_mean_(ctx.weights.comm_segments(), ctx.topo, ctx.meter),
        "commhooks CPSGD sync": lambda: synchronize_weights(ctx),
        "commhooks ADPSGD sync (+copy, +exact S)": lambda: synchronize_weights(ctx, scratch),
        "torch PeriodicModelAverager (average_parameters)":
            lambda: average_parameters(iter(torch_model.parameters()), world_group),
    }
    # Interleaved rounds so that drifts of the machine hit all alike; the best round counts.
    best_sync = {label: float("inf") for label in syncs}
    for _ in range(3):
        for label, fn in syncs.items():
            best_sync[label] = min(best_sync[label], timed(fn, args.repeats))
    t_raw = best_sync["raw all-reduce of one flat tensor"]
    say(f"{'what':<46}{'seconds':>10}{'x raw':>8}")
    for label, t in best_sync.items():
        say(f"{label:<46}{t:>10.4f}{t / t_raw:>8.2f}")

    # SSGD through our hook against plain DDP, a whole training step each.
    x = torch.randn(args.batch, 3, 32, 32) if args.model == "resnet18" else torch.randn(args.batch, 1024)

    def step_fn(model: DDP, step: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(x).float().pow(2).mean().backward()
            step()
        return run

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    plain = ddp_without_buffer_sync(make_model(args.model))
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    torch_hooked = ddp_without_buffer_sync(make_model(args.model))
    torch_hooked.register_comm_hook(None, allreduce_hook)
    torch_opt = torch.optim.SGD(torch_hooked.parameters(), lr=0.01)
    ours = ddp_without_buffer_sync(make_model(args.model))
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.01)
    ssgd = commhooks.build("ssgd", ours, ours_opt)
    runs = {
        "plain DDP step (no hook)": step_fn(plain, plain_opt.step),
        "torch allreduce_hook step": step_fn(torch_hooked, torch_opt.step),
        "commhooks ssgd step": step_fn(ours, ssgd.step),
    }
    # Interleaved rounds so that drifts of the machine hit all alike; the best round counts.
    best = {label: float("inf") for label in runs}
    for _ in range(5):
        for label, fn in runs.items():
            best[label] = min(best[label], timed(fn, max(3, args.repeats // 2)))
    base = best["plain DDP step (no hook)"]
    for label, t in best.items():
        say(f"{label:<46}{t:>10.4f}{t / base:>8.3f} x plain DDP")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
