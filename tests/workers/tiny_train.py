"""A tiny float64 training run for the launcher's tests (run by path under `python -m launch`).

It trains a small MLP on a synthetic regression set with a commhooks algorithm, checkpoints every
few steps, can SIGKILL itself (at a step, or in the middle of a checkpoint write) on the first
attempt, and writes each rank's final weights to OUT/rank_<r>.pt for the test to compare.
`--algo ddp` uses plain DDP through a minimal stand-in, to test the launcher without commhooks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import launch.checkpoint as ckpt_mod
from launch.checkpoint import Checkpointer
from launch.runtime import init_distributed, shutdown

if TYPE_CHECKING:
    import commhooks


class PlainDDP:
    """The part of commhooks' algorithm interface the checkpointer uses, for plain DDP."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()

    def consensus(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--algo", default="ssgd")
    p.add_argument("--hparams", default="{}", help="JSON dict for commhooks.build")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--keep", type=int, default=2, help="complete checkpoints kept")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--kill-at", type=int, default=-1, help="SIGKILL after this step (attempt 0)")
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--kill-in-save", type=int, default=-1,
                   help="SIGKILL after writing this step's own checkpoint file (attempt 0)")
    p.add_argument("--skew-config", action="store_true", help="rank 1 uses another --lr")
    p.add_argument("--dump-start", default="", help="write the weights each rank starts from")
    p.add_argument("--timeout", type=float, default=30.0, help="collective timeout, seconds")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of sleep per step")
    return p.parse_args()


def main() -> None:
    args = parse()
    rank = int(os.environ.get("RANK", "0"))
    lr = args.lr * 2 if args.skew_config and rank == 1 else args.lr
    per_run = {"out", "dump_start", "kill_at", "kill_rank", "kill_in_save", "step_sleep"}
    config = {k: v for k, v in vars(args).items() if k not in per_run} | {"lr": lr}
    rt = init_distributed(seed=args.seed, config=config, timeout_s=args.timeout)
    first_attempt = rt.restart_count == 0

    g = torch.Generator().manual_seed(1234)  # the data set is the same on every rank and run
    x = torch.randn(args.samples, 6, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    sampler: DistributedSampler = DistributedSampler(TensorDataset(x, y), seed=args.seed, drop_last=True)
    # A loader generator keeps the loader's per-epoch seed draw off the global torch RNG, which
    # the training below uses (input noise) and a resume restores.
    loader = StatefulDataLoader(
        TensorDataset(x, y), batch_size=args.batch, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )

    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).to(torch.float64)
    ddp = DDP(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9, nesterov=True)
    ckpt = Checkpointer(args.ckpt_dir, rt, keep=args.keep)
    resume = ckpt.latest()
    if resume is not None:
        resume.load_model(ddp.module)
    algo: PlainDDP | commhooks.Algorithm
    if args.algo == "ddp":
        algo = PlainDDP(optimizer)
    else:
        import commhooks  # here: --algo ddp runs without it

        algo = commhooks.build(args.algo, ddp, optimizer, timeout=timedelta(seconds=args.timeout),
                               **json.loads(args.hparams))
    step, epoch = 0, 0
    if resume is not None:
        resume.load_training(optimizer=optimizer, algorithm=algo, loader=loader)
        step, epoch = resume.step, resume.extra["epoch"]
        if resume.resized:
            epoch += 1  # the loader starts afresh: take the next epoch's order
        if rt.is_main:
            print(f"[tiny] resumed from step {step} (saved by {resume.saved_world_size} ranks)",
                  flush=True)
    if args.dump_start:
        Path(args.dump_start).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(args.dump_start) / f"rank_{rt.rank}.pt")

    if args.kill_in_save >= 0 and first_attempt and rt.rank == args.kill_rank:
        original = ckpt_mod._atomic_save

        def save_then_die(obj: object, path: Path) -> None:
            original(obj, path)
            if path.parent == ckpt.step_dir(args.kill_in_save) and path.name.startswith("rank_"):
                print(f"[tiny] rank {rt.rank} killing itself inside save {args.kill_in_save}",
                      flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt_mod._atomic_save = save_then_die

    while step < args.steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            xb = xb + 0.01 * torch.randn_like(xb)  # global RNG: a resume must restore it
            loss = torch.nn.functional.mse_loss(ddp(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            algo.step()
            step += 1
            if args.step_sleep:
                time.sleep(args.step_sleep)  # a slower run: time to cut a link in the middle
            if step == args.kill_at and first_attempt and rt.rank == args.kill_rank:
                print(f"[tiny] rank {rt.rank} killing itself after step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if step % args.ckpt_every == 0:
                ckpt.save(step, model=ddp, optimizer=optimizer, algorithm=algo, loader=loader,
                          extra={"epoch": epoch})
            if step >= args.steps:
                break
        else:
            epoch += 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / f"rank_{rt.rank}.pt")
    if rt.is_main:
        print(f"[tiny] done at step {step}, world size {rt.world_size}, "
              f"attempt {rt.restart_count}", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
