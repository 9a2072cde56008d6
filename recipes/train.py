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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import commhooks
from commhooks import rank_min
from launch.checkpoint import Checkpointer, Resume
from launch.exitcodes import EXIT_DIVERGED, EXIT_USAGE
from launch.finite import NonFiniteError, named_tensors, nonfinite
from launch.runtime import Runtime, init_distributed, shutdown
from recipes.cli import Recipe, parse_args, resolve_hparams, run_logdir, train_log_every
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

    def merge(self, other: Meter) -> None:
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


def _fail(rt: Runtime | None, message: str) -> NoReturn:
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
    wait_group: dist.ProcessGroup | None = None
    if args.download and dist.is_initialized() and rt.world_size > 1:
        group = dist.new_group(backend="gloo", timeout=_DOWNLOAD_WAIT)
        assert isinstance(group, dist.ProcessGroup)  # every rank is a member
        wait_group = group
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
        run = setup(recipe, args, rt)
        train_loop(run)
        return finish(run)
    except NonFiniteError as e:
        # Every rank raised it together; a restart would diverge again (the launcher does not).
        if rt.is_main:
            print(f"error: training diverged: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    finally:
        shutdown()


@dataclass(kw_only=True)
class Run:
    """One training run: what :func:`setup` builds, and the state the loop and :func:`finish` share.

    The figures and counters continue a resumed run's: ``step`` is the global step, ``before``
    holds the earlier attempts' totals, ``steps_this_run`` counts this attempt's steps only.
    """

    recipe: Recipe
    args: argparse.Namespace
    rt: Runtime
    bf16: bool
    t_start: float  # this attempt's start (perf_counter)
    data: Dataset
    loader: TensorLoader
    replica_size: int
    steps_per_epoch: int  # B
    total_steps: int
    effective: dict[str, Any]  # every hyper-parameter's value in use
    notes: dict[str, str]  # field -> why the recipe adapted its default to this run
    ddp: DDP
    opt: torch.optim.Optimizer
    algo: commhooks.Algorithm
    ckpt: Checkpointer | None
    resume: Resume | None
    log_every: int
    report: Reporter = field(init=False)  # made last in setup: it may start a live progress bar
    step: int = 0
    window: Meter = field(default_factory=Meter)  # since the last train log
    epoch_meter: Meter = field(default_factory=Meter)  # since the last train figures
    train_loss: float = math.nan
    train_acc: float = math.nan
    val_loss: float = math.nan
    val_acc: float = math.nan
    before: dict[str, float] = field(  # totals of earlier attempts of this job
        default_factory=lambda: {"wall_seconds": 0.0, "train_seconds": 0.0, "trained_images": 0})
    evals: list[dict[str, float]] = field(default_factory=list)  # accuracy against training time
    t_train: float = 0.0  # the loop's start (perf_counter)
    steps_this_run: int = 0
    t_log: float = 0.0  # the last train log (perf_counter), for the throughput
    images_since_log: int = 0  # this rank's
    end_meters: dict[str, torch.Tensor | None] | None = None  # the sums at the last step

    def say(self, *parts: Any) -> None:
        """Print on rank 0 only."""
        if self.rt.is_main:
            print(*parts, flush=True)

    def meters(self) -> dict[str, torch.Tensor | None]:
        """The figures' running sums, for a checkpoint."""
        return {"window": self.window.state(), "epoch": self.epoch_meter.state()}

    def close_train_figures(self) -> None:
        """Train loss and accuracy over the steps since the last ones (collective)."""
        self.epoch_meter.merge(self.window)
        self.window = Meter()
        self.train_loss, self.train_acc = self.epoch_meter.reduce(self.rt.device)
        self.epoch_meter = Meter()

    def totals(self) -> dict[str, float]:
        """Wall and training time and images trained, over every attempt of this job."""
        now = time.perf_counter()
        return {"wall_seconds": self.before["wall_seconds"] + now - self.t_start,
                "train_seconds": self.before["train_seconds"] + now - self.t_train,
                "trained_images": self.before["trained_images"]
                + self.steps_this_run * self.args.batch_size * self.rt.world_size}


def setup(recipe: Recipe, args: argparse.Namespace, rt: Runtime) -> Run:
    """Data, loader, model, DDP, optimizer and algorithm (restored from the latest checkpoint,
    if any), the start banner and the reporter. A bad flag value ends every rank with one message."""
    _set_threads(rt)
    bf16 = args.bf16 if args.bf16 is not None else rt.device.type == "cuda"
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    t_start = time.perf_counter()

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

    run = Run(recipe=recipe, args=args, rt=rt, bf16=bf16, t_start=t_start, data=data, loader=loader,
              replica_size=replica_size, steps_per_epoch=B, total_steps=total_steps, effective=effective,
              notes=notes, ddp=ddp, opt=opt, algo=algo, ckpt=ckpt, resume=resume,
              log_every=train_log_every(args.log_interval, B))
    if resume:
        _restore(run, resume)
    logdir, logdir_warning = run_logdir(args, recipe.name, resuming=bool(resume)) if rt.is_main else (None, None)
    _banner(run, logdir, logdir_warning)
    # after the banner: on a terminal the reporter starts a live progress bar
    run.report = Reporter(enabled=rt.is_main, logdir=logdir, total_steps=total_steps, title=f"{args.algo}",
                          start_step=run.step, images_per_step=args.batch_size * rt.world_size,
                          elapsed=run.before["wall_seconds"] + time.perf_counter() - t_start)
    return run


def _restore(run: Run, resume: Resume) -> None:
    """Continue from a checkpoint: the step, the earlier attempts' totals and the figures' sums."""
    resume.load_training(optimizer=run.opt, algorithm=run.algo, loader=run.loader)
    run.step = resume.step
    saved = resume.extra
    run.before = {k: saved.get(k, v) for k, v in run.before.items()}
    if resume.resized:
        # the loader's position is per world size: restart the interrupted epoch
        run.loader.epoch, run.loader.position = int(saved.get("epoch", 0)), 0
        run.step = run.loader.epoch * run.steps_per_epoch
        run.say(f"resized resume: restarting epoch {run.loader.epoch} at step {run.step}")
    else:  # the figures of the interrupted epoch continue where they were
        meters = saved.get("meters", {})
        run.window = Meter.restored(meters.get("window"), run.rt.device)
        run.epoch_meter = Meter.restored(meters.get("epoch"), run.rt.device)
        run.train_loss, run.train_acc = saved.get("train", (math.nan, math.nan))


def _banner(run: Run, logdir: str | None, logdir_warning: str | None) -> None:
    """What this run trains, and how (rank 0)."""
    args, rt, say = run.args, run.rt, run.say
    n_replicas = rt.world_size // run.replica_size
    say(f"{run.recipe.name}: {run.data.note}")
    say(f"model {args.model} (width {args.width}, {sum(p.numel() for p in run.ddp.module.parameters()):,} "
        f"parameters) on {rt.device}, {rt.world_size} ranks = {n_replicas} replicas x "
        f"{run.replica_size}, data policy {args.data_policy}, {run.steps_per_epoch} steps per epoch, "
        f"{run.total_steps} steps")
    say(f"optimizer SGD lr {args.lr} momentum {args.momentum} nesterov {args.nesterov} "
        f"weight decay {args.weight_decay}; lr x{args.lr_decay} at epochs {args.lr_milestones}; "
        f"batch {args.batch_size} per rank; bf16 autocast {'on' if run.bf16 else 'off'}")
    say(f"{args.algo} hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in run.effective.items()))
    for note in run.notes.values():
        say(f"{args.algo}: adapted default: {note}")
    if run.resume:
        say(f"resumed at step {run.step} (epoch {run.loader.epoch}, batch {run.loader.position})")
    if logdir:  # rank 0
        say(f"logdir {logdir} (view: tensorboard --logdir {os.path.dirname(logdir) or logdir})")
    if logdir_warning:
        say(f"warning: {logdir_warning}")


def train_loop(run: Run) -> None:
    """Train to ``run.total_steps``: log the train figures every ``log_every`` steps, checkpoint
    every ``--checkpoint-every``, evaluate every ``--eval-every`` epochs and at the end. Every
    collective here happens at the same step on every rank."""
    args, rt, ddp, opt, algo = run.args, run.rt, run.ddp, run.opt, run.algo
    lr_kw = {"base": args.lr, "milestones": args.lr_milestones, "decay": args.lr_decay,
             "steps_per_epoch": run.steps_per_epoch}
    run.t_train = time.perf_counter()
    run.t_log = time.perf_counter()
    ddp.train()
    done = run.step >= run.total_steps
    while not done:
        epoch = run.loader.epoch
        for x, y in run.loader:
            lr = lr_at(run.step, **lr_kw)
            for group in opt.param_groups:
                group["lr"] = lr
            with _autocast(rt, run.bf16):
                logits = ddp(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            algo.step()
            run.step += 1
            run.steps_this_run += 1
            run.window.add(loss, logits.detach(), y)
            run.images_since_log += y.numel()
            if run.step % run.log_every == 0:
                _log_train(run, lr)
            if run.ckpt and args.checkpoint_every and run.step % args.checkpoint_every == 0:
                _save(run)
            if run.step >= run.total_steps:
                done = True
                break
        epoch_end = run.loader.position == 0  # the loader rolled over (not cut by --max-steps)
        if done:  # the final checkpoint keeps the sums, so a longer rerun continues the epoch
            run.end_meters = run.meters()
        if done or (epoch_end and (epoch + 1) % args.eval_every == 0):
            run.close_train_figures()
            _validate(run, f"epoch {epoch + 1}/{args.epochs} step {run.step}: train loss "
                           f"{run.train_loss:.4f} acc {run.train_acc:.4f} | ")


def _log_train(run: Run, lr: float) -> None:
    """The train figures since the last log (collective: every rank, same steps)."""
    wl, wa = run.window.reduce(run.rt.device)
    _check_finite(run.step, run.rt, run.ddp.module, run.ckpt,
                  {f"train loss (steps {run.step - run.log_every + 1}-{run.step})": wl})
    run.epoch_meter.merge(run.window)
    run.window = Meter()
    now = time.perf_counter()
    throughput = run.images_since_log * run.rt.world_size / max(now - run.t_log, 1e-9)
    run.t_log, run.images_since_log = now, 0
    run.report.scalars(run.step, {"train/loss": wl, "train/acc": wa, "lr": lr,
                                  "throughput/images_per_s": throughput})
    run.report.stats(run.step, run.args.algo, run.algo.stats())
    run.report.progress(run.step, f"loss {wl:.3f} acc {wa:.3f} {throughput:,.0f} img/s")


def _validate(run: Run, prefix: str) -> None:
    """Evaluate the consensus model (collective), log it, print one line on rank 0."""
    seconds = time.perf_counter() - run.t_train  # training time so far (earlier evals included)
    with run.algo.consensus():
        run.val_loss, run.val_acc = evaluate(run.ddp.module, run.data, run.rt, max(256, run.args.batch_size), run.bf16)
    _check_finite(run.step, run.rt, run.ddp.module, run.ckpt, {"val loss": run.val_loss})
    run.evals.append({"step": run.step, "epoch": run.step / run.steps_per_epoch, "seconds": seconds,
                      "val_acc": run.val_acc})
    stats = run.algo.stats()
    run.report.scalars(run.step, {"val/loss": run.val_loss, "val/acc": run.val_acc})
    run.report.stats(run.step, run.args.algo, stats)
    run.report.line(f"{prefix}val loss {run.val_loss:.4f} acc {run.val_acc:.4f} | "
                    + format_figures(run_figures(run.args.algo, stats, run.opt.param_groups[0]["lr"])))


def _save(run: Run, meters: dict[str, torch.Tensor | None] | None = None) -> None:
    """Checkpoint this step; ``meters``: the figures' sums to save, if not the current ones."""
    assert run.ckpt is not None
    extra = {"epoch": run.loader.epoch, "meters": run.meters() if meters is None else meters,
             "train": (run.train_loss, run.train_acc), **run.totals()}
    try:
        run.ckpt.save(run.step, model=run.ddp.module, optimizer=run.opt, algorithm=run.algo,
                      loader=run.loader, extra=extra)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}{_good_checkpoint(run.ckpt, run.rt)}") from None


def finish(run: Run) -> dict[str, Any] | None:
    """The final evaluation (if the loop did not end with one) and checkpoint, the TensorBoard
    hyper-parameters, the summary table and the results file; the results on rank 0, else None."""
    args, rt = run.args, run.rt
    if math.isnan(run.val_acc):  # resumed at the end, or nothing trained: still report the model
        if run.epoch_meter.sums is not None or run.window.sums is not None:
            # saved at the last step before the final figures: compute them as the run did
            run.close_train_figures()
        _validate(run, f"step {run.step}: ")
    if run.ckpt and args.checkpoint_every and run.step % args.checkpoint_every and run.steps_this_run:
        # the end is a checkpoint too: a rerun of the same command finds the run complete
        _save(run, run.end_meters)

    totals, stats = run.totals(), run.algo.stats()
    results = _results(run, totals, stats)
    report = run.report
    # A rerun of a finished job trains nothing: its results file, if any, stays as it was.
    rerun = run.resume is not None and run.steps_this_run == 0
    if rerun:
        run.say(f"the run was already complete at step {run.step}"
                + (f"; {args.results} left as it is" if args.results and os.path.exists(args.results) else ""))
    else:
        report.hparams({"algo": args.algo, "world_size": rt.world_size, "replica_size": run.replica_size,
                        **results["training"], **{f"{args.algo}.{k}": v for k, v in run.effective.items()}},
                       {"val/acc": run.val_acc, "val/loss": run.val_loss})
    report.summary(f"{run.recipe.name} {args.dataset} {args.algo}", {
        "val acc": run.val_acc, "val loss": run.val_loss, "train loss": run.train_loss, "steps": run.step,
        **run_figures(args.algo, stats, run.opt.param_groups[0]["lr"]),
        "comm s": results["comm_seconds"], "images/s": results["images_per_second"],
        "wall s": totals["wall_seconds"]})
    if not (rerun and args.results and os.path.exists(args.results)):
        report.results(args.results, results)
    report.close()
    return results if rt.is_main else None


def _results(run: Run, totals: dict[str, float], stats: dict[str, Any]) -> dict[str, Any]:
    """The run's results file: final figures, communication, times, and every setting."""
    args = run.args
    return {
        "recipe": run.recipe.name, "dataset": args.dataset, "model": args.model, "algo": args.algo,
        "world_size": run.rt.world_size, "replica_size": run.replica_size, "data_policy": args.data_policy,
        "epochs": args.epochs, "steps": run.step, "steps_per_epoch": run.steps_per_epoch,
        "val_acc": run.val_acc, "val_loss": run.val_loss, "train_loss": run.train_loss, "train_acc": run.train_acc,
        "comm_bytes": stats.get("comm_bytes"), "syncs": stats.get("syncs"),
        "comm_seconds": stats.get("comm_seconds"), "consensus_distance": stats.get("consensus_distance"),
        # over every attempt of the job (a resumed run continues the figures of the earlier ones)
        "wall_seconds": totals["wall_seconds"], "train_seconds": totals["train_seconds"],
        "images_per_second": totals["trained_images"] / max(totals["train_seconds"], 1e-9),
        "hparams": run.effective, "adapted": list(run.notes.values()), "evals": run.evals,
        "training": {"batch_size": args.batch_size, "lr": args.lr, "lr_milestones": args.lr_milestones,
                     "lr_decay": args.lr_decay, "momentum": args.momentum, "nesterov": args.nesterov,
                     "weight_decay": args.weight_decay, "seed": args.seed, "width": args.width,
                     "bf16": run.bf16},
    }
