"""The training loop every recipe shares: data on the device, DDP + a commhooks algorithm,
evaluation of the consensus model, checkpoints, TensorBoard, a results file.

A recipe (``recipes.cifar``, ``recipes.mnist``) is a :class:`recipes.cli.Recipe` — its data
sets and models — handed to :func:`main`. Run it under ``torchrun`` / ``python -m launch`` or as
a single process.
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import sys
import time
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from commhooks import rank_min
from launch.checkpoint import Checkpointer
from launch.exitcodes import EXIT_DIVERGED, EXIT_USAGE
from launch.finite import NonFiniteError, named_tensors, nonfinite
from launch.runtime import Runtime, init_distributed, shutdown

from recipes.cli import Recipe, parse_args, resolve_hparams, run_logdir
from recipes.data import Dataset, DatasetUnavailable, TensorLoader, val_batches
from recipes.models import build_model
from recipes.report import Reporter, format_figures, run_figures

def wrap_ddp(model: nn.Module, rt: Runtime, sync_buffers: bool) -> DDP:
    """DDP with forward buffer sync only for synchronous algorithms.

    Otherwise rank 0's BatchNorm statistics would overwrite every replica's at each forward
    (docs/README.md, "Buffers"). torch 2.15 renames ``broadcast_buffers`` to ``forward_sync_buffers``.
    """
    kwargs: dict[str, Any] = commhooks.ddp_buffer_sync_kwargs(sync_buffers)
    if rt.device.type == "cuda":
        kwargs["device_ids"] = [rt.device.index]
    return DDP(model, **kwargs)


def lr_at(step: int, *, base: float, milestones: Sequence[int], decay: float, steps_per_epoch: int) -> float:
    """Step schedule: ``base * decay ** (number of milestone epochs reached)`` (stateless)."""
    return base * decay ** bisect.bisect_right(milestones, step / steps_per_epoch)


class Meter:
    """Sums of loss, correct predictions and examples, kept on the device.

    Accumulating tensors (not ``.item()``) keeps the training loop free of a host-device sync
    per step; :meth:`reduce` syncs once, when the figures are read.
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # [loss sum, correct, count], float64

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = y.numel()
        # new_full is a fill kernel; torch.tensor(n, device=cuda) would be a synchronizing copy
        row = torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
                           y.new_full((), n, dtype=torch.float64)])
        self.sums = row if self.sums is None else self.sums + row

    def state(self) -> torch.Tensor | None:
        """The sums on the CPU, for a checkpoint (a resumed run's figures then match)."""
        return None if self.sums is None else self.sums.cpu()

    @classmethod
    def restored(cls, sums: torch.Tensor | None, device: torch.device) -> Meter:
        m = cls()
        m.sums = None if sums is None else sums.to(device)
        return m

    def merge(self, other: "Meter") -> None:
        if other.sums is not None:
            self.sums = other.sums.clone() if self.sums is None else self.sums + other.sums

    def reduce(self, device: torch.device) -> tuple[float, float]:
        """(mean loss, accuracy) over every rank's examples; collective."""
        t = self.sums.clone() if self.sums is not None else torch.zeros(3, dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        loss, correct, count = t.tolist()
        return (loss / count, correct / count) if count else (math.nan, math.nan)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, rt: Runtime, batch_size: int, bf16: bool = False
             ) -> tuple[float, float]:
    """Loss and accuracy of ``model`` on the validation set; each rank takes a 1/W share.

    Called inside ``algo.consensus()``: every rank then holds the same (averaged) weights, so
    splitting the set among ranks and summing is the consensus model's exact figure.
    """
    was_training = model.training
    model.eval()
    m = Meter()
    for x, y in val_batches(data, rt.rank, rt.world_size, batch_size):
        with _autocast(rt, bf16):
            logits = model(x)
        m.add(F.cross_entropy(logits.float(), y), logits, y)
    model.train(was_training)
    return m.reduce(rt.device)


def _autocast(rt: Runtime, bf16: bool):
    """bf16 autocast (weights, gradients and all communication stay float32)."""
    return torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=bf16)


def _set_threads(rt: Runtime) -> None:
    # Several ranks on one CPU host would each start one thread per core and thrash; torchrun
    # sets OMP_NUM_THREADS=1 for that reason, and we keep an explicit user setting.
    if rt.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _fail(rt: Runtime | None, message: str) -> None:
    if rt is None or rt.is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)
    shutdown()
    sys.exit(EXIT_USAGE)


# A download may take far longer than --timeout; the ranks that wait for it wait this long.
_DOWNLOAD_WAIT = timedelta(hours=2)


def _check_finite(step: int, rt: Runtime, model: nn.Module, ckpt: Checkpointer | None,
                  figures: dict[str, float]) -> None:
    """Stop every rank with one message if a figure or any rank's weights are not finite.

    Collective; called where the figures are already on the host (log and evaluation points),
    so the training steps themselves never wait for this check. The weights' check is one
    ``isfinite`` pass and one small all-reduce. (One function, so that a finiteness check of
    the library can replace the weights' part.)

    Args:
        figures: name -> value, already reduced over ranks (the same on every rank).
    """
    bad_figures = [f"{name} {value}" for name, value in figures.items() if not math.isfinite(value)]
    bad_weights = nonfinite(named_tensors(model.state_dict()))
    if rank_min(int(not bad_weights)) == 1 and not bad_figures:
        return
    per_rank: list[list[str]] = [bad_weights]
    if dist.is_initialized() and rt.world_size > 1:
        per_rank = [[] for _ in range(rt.world_size)]
        dist.all_gather_object(per_rank, bad_weights)
    ranks: dict[tuple[str, ...], list[str]] = {}  # the same tensors on several ranks: one entry
    for r, names in enumerate(per_rank):
        if names:
            ranks.setdefault(tuple(names), []).append(str(r))
    what = bad_figures + [
        f"non-finite weights on rank{'s' if len(rs) > 1 else ''} {', '.join(rs)} ({', '.join(names[:3])}"
        f"{f' and {len(names) - 3} more' if len(names) > 3 else ''})" for names, rs in ranks.items()]
    raise NonFiniteError(f"step {step}: " + "; ".join(what) + _good_checkpoint(ckpt, rt))


def _good_checkpoint(ckpt: Checkpointer | None, rt: Runtime) -> str:
    """Where the last good checkpoint is (rank 0's message only)."""
    if ckpt is None or not rt.is_main:
        return ""
    newest = ckpt.newest_step()
    if newest is None:
        return "; no checkpoint was written before it"
    return (f"; the checkpoints written before it are kept (newest: {ckpt.step_dir(newest)}); "
            "resume from it with a lower --lr")


def _load_data(recipe: Recipe, args: argparse.Namespace, rt: Runtime) -> Dataset:
    """Load the data set on every rank; a missing one ends every rank with one message.

    With ``--download`` the first rank of each node fetches first and the others then read its
    files: concurrent downloads into one folder race.
    """
    data, error = None, None
    wait_group = None
    if args.download and dist.is_initialized() and rt.world_size > 1:
        wait_group = dist.new_group(backend="gloo", timeout=_DOWNLOAD_WAIT)
    for turn in (True, False):
        if (not args.download or rt.local_rank == 0) == turn:
            try:
                data = recipe.load(args)
            except DatasetUnavailable as e:
                error = str(e)
        if not rank_min(int(error is None), wait_group if turn else None) == 1:
            _fail(rt, error or "the data set is unavailable on another rank (see rank 0)")
    assert data is not None
    return data


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Parse the command line, train, and return the results (on rank 0; None elsewhere)."""
    args = parse_args(recipe, argv)
    rt = init_distributed(seed=args.seed, config=vars(args), device=args.device,
                          timeout_s=args.timeout)
    try:
        return _run(recipe, args, rt)
    except NonFiniteError as e:
        # Every rank raised it together; a restart would diverge again (the launcher does not).
        if rt.is_main:
            print(f"error: training diverged: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    finally:
        shutdown()


def _run(recipe: Recipe, args: argparse.Namespace, rt: Runtime) -> dict[str, Any] | None:
    _set_threads(rt)
    bf16 = args.bf16 if args.bf16 is not None else rt.device.type == "cuda"
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    say = (lambda *a: print(*a, flush=True)) if rt.is_main else (lambda *a: None)
    t_start = time.perf_counter()

    # -- data --------------------------------------------------------------------------------
    data = _load_data(recipe, args, rt).to(rt.device)
    # Needed before build (the data policy depends on it): the library's own rule and errors.
    try:
        replica_size = commhooks.resolve_replica_size(args.algo, args.replica_size, rt.world_size)
    except ValueError as e:
        _fail(rt, f"--replica-size: {e}")
    try:
        loader = TensorLoader(data, batch_size=args.batch_size, rank=rt.rank,
                              world_size=rt.world_size, replica_size=replica_size,
                              policy=args.data_policy, seed=args.seed)
    except ValueError as e:
        _fail(rt, str(e))
    B = len(loader)
    total_steps = B * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    passed, effective, notes = resolve_hparams(args, steps_per_epoch=B, total_steps=total_steps)

    # -- model, DDP, optimizer, algorithm ----------------------------------------------------
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP checks too)
    model = build_model(args.model, data.in_channels, data.num_classes, args.width).to(rt.device)
    ddp = wrap_ddp(model, rt, sync_buffers=commhooks.algorithm_spec(args.algo).replicas_identical)
    ckpt = Checkpointer(args.checkpoint_dir, rt, keep=2) if args.checkpoint_dir else None
    resume = ckpt.latest() if ckpt else None
    if resume:
        resume.load_model(ddp.module)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum,
                          nesterov=args.nesterov, weight_decay=args.weight_decay)
    try:
        algo = commhooks.build(args.algo, ddp, opt, replica_size=replica_size,
                               timeout=timedelta(seconds=args.timeout), **passed)
    except ValueError as e:
        _fail(rt, f"{args.algo}: {e}")
    step = 0
    window, epoch_meter = Meter(), Meter()
    train_loss = train_acc = math.nan
    before = {"wall_seconds": 0.0, "train_seconds": 0.0, "trained_images": 0}  # earlier attempts
    if resume:
        resume.load_training(optimizer=opt, algorithm=algo, loader=loader)
        step = resume.step
        saved = resume.extra
        before = {k: saved.get(k, v) for k, v in before.items()}
        if resume.resized:
            # the loader's position is per world size: restart the interrupted epoch
            loader.epoch, loader.position = int(saved.get("epoch", 0)), 0
            step = loader.epoch * B
            say(f"resized resume: restarting epoch {loader.epoch} at step {step}")
        else:  # the figures of the interrupted epoch continue where they were
            meters = saved.get("meters", {})
            window = Meter.restored(meters.get("window"), rt.device)
            epoch_meter = Meter.restored(meters.get("epoch"), rt.device)
            train_loss, train_acc = saved.get("train", (math.nan, math.nan))

    # -- the start banner --------------------------------------------------------------------
    logdir, logdir_warning = run_logdir(args, recipe.name, resuming=bool(resume)) if rt.is_main else (None, None)
    n_replicas = rt.world_size // replica_size
    say(f"{recipe.name}: {data.note}")
    say(f"model {args.model} (width {args.width}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters) on {rt.device}, {rt.world_size} ranks = {n_replicas} replicas x "
        f"{replica_size}, data policy {args.data_policy}, {B} steps per epoch, {total_steps} steps")
    say(f"optimizer SGD lr {args.lr} momentum {args.momentum} nesterov {args.nesterov} "
        f"weight decay {args.weight_decay}; lr x{args.lr_decay} at epochs {args.lr_milestones}; "
        f"batch {args.batch_size} per rank; bf16 autocast {'on' if bf16 else 'off'}")
    say(f"{args.algo} hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in effective.items()))
    for n in notes:
        say(f"{args.algo}: adapted default: {n}")
    if resume:
        say(f"resumed at step {step} (epoch {loader.epoch}, batch {loader.position})")
    if logdir:  # rank 0
        say(f"logdir {logdir} (view: tensorboard --logdir {os.path.dirname(logdir) or logdir})")
    if logdir_warning:
        say(f"warning: {logdir_warning}")

    report = Reporter(enabled=rt.is_main, logdir=logdir, total_steps=total_steps,
                      title=f"{args.algo}", start_step=step, images_per_step=args.batch_size * rt.world_size,
                      elapsed=(resume.extra.get("wall_seconds", 0.0) if resume else 0.0) + time.perf_counter() - t_start)
    log_every = args.log_interval or max(1, B // 10)
    lr_kw = dict(base=args.lr, milestones=args.lr_milestones, decay=args.lr_decay, steps_per_epoch=B)

    evals: list[dict[str, float]] = []  # accuracy against training time, for benchmarks

    def _validate(prefix: str) -> tuple[float, float]:
        """Evaluate the consensus model (collective), log it, print one line on rank 0."""
        seconds = time.perf_counter() - t_train  # training time so far (earlier evals included)
        with algo.consensus():
            vl, va = evaluate(ddp.module, data, rt, max(256, args.batch_size), bf16)
        _check_finite(step, rt, ddp.module, ckpt, {"val loss": vl})
        evals.append({"step": step, "epoch": step / B, "seconds": seconds, "val_acc": va})
        stats = algo.stats()
        report.scalars(step, {"val/loss": vl, "val/acc": va})
        report.stats(step, args.algo, stats)
        report.line(f"{prefix}val loss {vl:.4f} acc {va:.4f} | "
                    + format_figures(run_figures(args.algo, stats, opt.param_groups[0]["lr"])))
        return vl, va

    def _totals() -> dict[str, float]:
        """Wall and training time and images trained, over every attempt of this job."""
        now = time.perf_counter()
        return {"wall_seconds": before["wall_seconds"] + now - t_start,
                "train_seconds": before["train_seconds"] + now - t_train,
                "trained_images": before["trained_images"]
                + steps_this_run * args.batch_size * rt.world_size}

    def _save(meters: dict[str, torch.Tensor | None] | None = None) -> None:
        """Checkpoint this step; `meters`: the figures' sums to save, if not the current ones."""
        assert ckpt is not None
        if meters is None:
            meters = {"window": window.state(), "epoch": epoch_meter.state()}
        extra = {"epoch": loader.epoch, "meters": meters, "train": (train_loss, train_acc),
                 **_totals()}
        try:
            ckpt.save(step, model=ddp.module, optimizer=opt, algorithm=algo, loader=loader, extra=extra)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}{_good_checkpoint(ckpt, rt)}") from None

    # -- the loop ----------------------------------------------------------------------------
    val_loss = val_acc = math.nan
    t_train = time.perf_counter()
    steps_this_run, seen_since = 0, 0
    t_window = time.perf_counter()
    ddp.train()
    done = step >= total_steps
    end_meters: dict[str, torch.Tensor | None] | None = None
    while not done:
        epoch = loader.epoch
        for x, y in loader:
            lr = lr_at(step, **lr_kw)
            for group in opt.param_groups:
                group["lr"] = lr
            with _autocast(rt, bf16):
                logits = ddp(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            algo.step()
            step += 1
            steps_this_run += 1
            window.add(loss, logits.detach(), y)
            seen_since += y.numel()

            if step % log_every == 0:
                wl, wa = window.reduce(rt.device)  # collective: every rank, same steps
                _check_finite(step, rt, ddp.module, ckpt,
                              {f"train loss (steps {step - log_every + 1}-{step})": wl})
                epoch_meter.merge(window)
                window = Meter()
                now = time.perf_counter()
                throughput = seen_since * rt.world_size / max(now - t_window, 1e-9)
                t_window, seen_since = now, 0
                report.scalars(step, {"train/loss": wl, "train/acc": wa, "lr": lr,
                                      "throughput/images_per_s": throughput})
                report.stats(step, args.algo, algo.stats())
                report.progress(step, f"loss {wl:.3f} acc {wa:.3f} {throughput:,.0f} img/s")
            if ckpt and args.checkpoint_every and step % args.checkpoint_every == 0:
                _save()
            if step >= total_steps:
                done = True
                break
        epoch_end = loader.position == 0  # the loader rolled over (not cut by --max-steps)
        if done:  # the final checkpoint keeps the sums, so a longer rerun continues the epoch
            end_meters = {"window": window.state(), "epoch": epoch_meter.state()}
        if done or (epoch_end and (epoch + 1) % args.eval_every == 0):
            epoch_meter.merge(window)
            window = Meter()
            train_loss, train_acc = epoch_meter.reduce(rt.device)
            epoch_meter = Meter()
            val_loss, val_acc = _validate(f"epoch {epoch + 1}/{args.epochs} step {step}: train loss "
                                          f"{train_loss:.4f} acc {train_acc:.4f} | ")
    if math.isnan(val_acc):  # resumed at the end, or nothing trained: still report the model
        if epoch_meter.sums is not None or window.sums is not None:
            # saved at the last step before the final figures: compute them as the run did
            epoch_meter.merge(window)
            window = Meter()
            train_loss, train_acc = epoch_meter.reduce(rt.device)
            epoch_meter = Meter()
        val_loss, val_acc = _validate(f"step {step}: ")
    if ckpt and args.checkpoint_every and step % args.checkpoint_every and steps_this_run:
        # the end is a checkpoint too: a rerun of the same command finds the run complete
        _save(end_meters)

    totals = _totals()
    wall = totals["wall_seconds"]
    stats = algo.stats()
    results: dict[str, Any] = {
        "recipe": recipe.name, "dataset": args.dataset, "model": args.model, "algo": args.algo,
        "world_size": rt.world_size, "replica_size": replica_size, "data_policy": args.data_policy,
        "epochs": args.epochs, "steps": step, "steps_per_epoch": B,
        "val_acc": val_acc, "val_loss": val_loss, "train_loss": train_loss, "train_acc": train_acc,
        "comm_bytes": stats.get("comm_bytes"), "syncs": stats.get("syncs"),
        "comm_seconds": stats.get("comm_seconds"), "consensus_distance": stats.get("consensus_distance"),
        # over every attempt of the job (a resumed run continues the figures of the earlier ones)
        "wall_seconds": wall, "train_seconds": totals["train_seconds"],
        "images_per_second": totals["trained_images"] / max(totals["train_seconds"], 1e-9),
        "hparams": effective, "adapted": notes, "evals": evals,
        "training": {"batch_size": args.batch_size, "lr": args.lr, "lr_milestones": args.lr_milestones,
                     "lr_decay": args.lr_decay, "momentum": args.momentum, "nesterov": args.nesterov,
                     "weight_decay": args.weight_decay, "seed": args.seed, "width": args.width,
                     "bf16": bf16},
    }
    # A rerun of a finished job trains nothing: its results file, if any, stays as it was.
    rerun = resume is not None and steps_this_run == 0
    if rerun:
        say(f"the run was already complete at step {step}"
            + (f"; {args.results} left as it is" if args.results and os.path.exists(args.results) else ""))
    else:
        report.hparams({"algo": args.algo, "world_size": rt.world_size, "replica_size": replica_size,
                        **results["training"], **{f"{args.algo}.{k}": v for k, v in effective.items()}},
                       {"val/acc": val_acc, "val/loss": val_loss})
    report.summary(f"{recipe.name} {args.dataset} {args.algo}", {
        "val acc": val_acc, "val loss": val_loss, "train loss": train_loss, "steps": step,
        **run_figures(args.algo, stats, opt.param_groups[0]["lr"]),
        "comm s": results["comm_seconds"], "images/s": results["images_per_second"],
        "wall s": wall})
    if not (rerun and args.results and os.path.exists(args.results)):
        report.results(args.results, results)
    report.close()
    return results if rt.is_main else None
