"""What each algorithm adds to a training step besides communication: time and memory.

    python -m benchmarks.step_overhead                          # 1 rank: no communication
    python -m benchmarks.step_overhead --base /tmp/perf-base    # side by side with another checkout
    torchrun --standalone --nproc_per_node=2 -m benchmarks.step_overhead --no-timing  # 2 replicas

Every algorithm runs the same model (ResNet-18 of ``recipes.models``, 44.7 MB of parameters, or
an MLP of 46 MB) on the same batch, beside a plain DDP + ``optimizer.step()`` loop, in interleaved
rounds (a drift of the machine hits all alike); the median round counts. With one rank every
collective is the identity, so what is left is each algorithm's local work. Printed per
algorithm:

- step time and its ratio to the plain loop (aim: at most 1.10), and the time of the call that
  replaces ``optimizer.step()`` with its excess over the plain loop's (the local work, timed
  where it happens: steadier than the ratio on a busy machine);
- memory held beyond the model and the optimizer, in units of ``S`` (the model's parameter
  bytes; aim: Parle/Entropy-SGD 3 S, others 1 S at most);
- the largest tensor allocated inside ``algo.step()`` and all bytes allocated there per step,
  in ``S`` (aim: no model-size transient), recorded by a dispatch mode with the user's optimizer
  step left out (``benchmarks.common.AllocationRecorder``).

With ``--base DIR`` the ``commhooks`` package of another checkout (for instance the main branch
at /tmp/perf-base) is loaded beside this one under another name and measured in the same rounds.
With one rank, the algorithms that keep several replicas hold what a single replica needs (no
gossip inbox, for example): run under torchrun with 2 ranks for their multi-replica memory.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import commhooks

from .common import AllocationRecorder, ddp_without_buffer_sync, held_bytes, init, model_bytes, say

STEPS_PER_EPOCH = 100
# The recipes' defaults (recipes.cli.algo_defaults) at 100 steps per epoch, with L = 5 and
# log_every = 5 so that an outer step and a measurement fall inside every recorded window.
HPARAMS: dict[str, dict[str, Any]] = {
    "ssgd": {},
    "ssgd-noise": {"noise_std": 0.01},
    "cpsgd": {"period": 8},
    "adpsgd": {"p_init": 4, "sample_steps": 25, "warmup_steps": 0},
    "dpsgd": {"topology": "random-pair", "log_every": 5},
    "easgd": {"rho": 1.0, "steps_per_epoch": STEPS_PER_EPOCH},
    "entropysgd": {"L": 5, "alpha": 0.75, "steps_per_epoch": STEPS_PER_EPOCH},
    "parle": {"L": 5, "alpha": 0.75, "rho": 1.0, "steps_per_epoch": STEPS_PER_EPOCH},
}


def load_commhooks(checkout: str, name: str) -> ModuleType:
    """Import ``checkout/commhooks`` as package ``name`` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location(
        name, f"{checkout}/commhooks/__init__.py", submodule_search_locations=[f"{checkout}/commhooks"]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        from recipes.models import build_model

        return build_model("resnet18", 3, 10)
    return torch.nn.Sequential(torch.nn.Linear(1024, 5632), torch.nn.ReLU(), torch.nn.Linear(5632, 1024))


class Runner:
    """One DDP model with its optimizer, stepped by an algorithm or by ``optimizer.step()``."""

    def __init__(self, label: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 impl: ModuleType | None, name: str | None) -> None:
        self.label, self.x, self.y = label, x, y
        self.ddp = ddp_without_buffer_sync(model)
        self.opt = torch.optim.SGD(self.ddp.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.algo = None
        if impl is not None and name is not None:
            world = dist.get_world_size()
            replica_size = world if name == "entropysgd" else 1
            self.algo = impl.build(name, self.ddp, self.opt, replica_size, **HPARAMS[name])
        self.samples: list[tuple[float, float]] = []  # (whole step, the step() call), seconds

    def backward(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.ddp(self.x)
        loss = F.cross_entropy(out, self.y) if out.shape[-1] == 10 else out.square().mean()
        loss.backward()

    def step(self) -> None:
        self.backward()
        (self.algo.step if self.algo is not None else self.opt.step)()

    def timed_round(self, steps: int) -> None:
        dist.barrier()
        for _ in range(steps):
            start = time.perf_counter()
            self.backward()
            middle = time.perf_counter()
            (self.algo.step if self.algo is not None else self.opt.step)()
            end = time.perf_counter()
            self.samples.append((end - start, end - middle))

    def median(self, which: int) -> float:
        return statistics.median(s[which] for s in self.samples) if self.samples else float("nan")

    def memory(self, steps: int, size: int) -> tuple[float, float, float]:
        """(held, largest allocation, allocated per step), in units of ``size``."""
        if self.algo is None:
            return 0.0, 0.0, 0.0
        recorder = AllocationRecorder()
        for _ in range(steps):
            self.backward()
            with recorder, recorder.exclude_optimizer(self.opt):
                self.algo.step()
        return held_bytes(self.algo) / size, recorder.largest / size, recorder.total / size / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "mlp"])
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    parser.add_argument("--steps", type=int, default=3, help="steps per round and runner (default 3)")
    parser.add_argument("--memory-steps", type=int, default=10,
                        help="steps recorded for the allocation figures (default 10: one outer step, one measurement)")
    parser.add_argument("--algos", nargs="+", default=list(HPARAMS), choices=list(HPARAMS))
    parser.add_argument("--base", help="another checkout whose commhooks is measured beside this one")
    parser.add_argument("--no-timing", action="store_true", help="memory figures only")
    args = parser.parse_args()
    rank, world = init()
    impls: list[tuple[str, ModuleType]] = [("", commhooks)]
    if args.base:
        impls.append(("base ", load_commhooks(args.base, "commhooks_base")))

    template = make_model(args.model)
    size = model_bytes(template)
    gen = torch.Generator().manual_seed(rank)
    if args.model == "resnet18":
        x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    else:
        x = torch.randn(args.batch, 1024, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    runners = [Runner("plain optimizer.step()", copy.deepcopy(template), x, y, None, None)]
    for name in args.algos:
        for prefix, impl in impls:
            runners.append(Runner(f"{prefix}{name}", copy.deepcopy(template), x, y, impl, name))

    comm = "no communication" if world == 1 else f"{world} gloo ranks, communication on"
    say(f"model {args.model}: S = {size / 1e6:.1f} MB of parameters; batch {args.batch}; {world} rank(s), "
        f"{comm}; {torch.get_num_threads()} thread(s)")
    if not args.no_timing:
        for r in runners:  # warm-up: lazy state (momentum buffers), first-iteration work
            r.timed_round(2)
            r.samples.clear()
        for _ in range(args.rounds):
            for r in runners:
                r.timed_round(args.steps)
    memory = {r.label: r.memory(args.memory_steps, size) for r in runners}

    plain, plain_call = runners[0].median(0), runners[0].median(1)
    say(f"{'algorithm':<24}{'ms/step':>9}{'x plain':>9}{'step() ms':>11}{'+ms':>8}"
        f"{'held S':>9}{'largest S':>11}{'alloc S/step':>14}")
    for r in runners:
        t, call = r.median(0), r.median(1)
        held, largest, per_step = memory[r.label]
        say(f"{r.label:<24}{1e3 * t:>9.1f}{t / plain:>9.3f}{1e3 * call:>11.1f}{1e3 * (call - plain_call):>8.1f}"
            f"{held:>9.2f}{largest:>11.3f}{per_step:>14.3f}")
    say(f"medians over {args.rounds} interleaved rounds x {args.steps} steps; 'step() ms' is the call "
        "that replaces optimizer.step() (+ms: beyond the plain loop's); memory over "
        f"{args.memory_steps} steps, the optimizer's own allocations excluded")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
