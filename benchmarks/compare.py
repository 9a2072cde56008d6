"""Several recipe runs at a glance: validation accuracy against wall time and against bytes sent.

    python -m benchmarks.compare runs/mnist-digits-ssgd-1 runs/mnist-digits-parle-1 ...
    python -m benchmarks.compare runs/* --out compare.png --table compare.md

Reads each run directory's TensorBoard events (what ``recipes.*`` writes under ``--logdir``)
and writes one PNG with two panels (accuracy vs seconds, accuracy vs MB this rank sent) and a
Markdown table (final accuracy, time, MB, syncs, steps, images), also printed. Time is the
``by_time/val/acc`` axis: seconds since the run started, earlier attempts of a resumed run
included. Bytes are ``comm/bytes`` at the step of each evaluation: the algorithm's own traffic
from one rank, cumulative (docs/metrics.md). Plotting needs matplotlib:
``pip install 'commhooks[bench]'``.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from recipes.report import BY_IMAGES, BY_TIME

VAL_ACC = "val/acc"


@dataclass(kw_only=True)
class Run:
    """One run's curves, read from its event files.

    Args:
        name: the label (the run directory's name).
        steps: optimizer steps of each evaluation.
        acc: validation accuracy at each evaluation.
        seconds: seconds since the run started, at each evaluation.
        megabytes: MB this rank had sent by each evaluation.
        syncs: weight synchronisations by the last evaluation.
        images: images processed by all ranks by the last evaluation.
    """

    name: str
    steps: list[int]
    acc: list[float]
    seconds: list[float]
    megabytes: list[float]
    syncs: float
    images: int | None


def _series(acc, tag: str) -> list:
    return list(acc.Scalars(tag)) if tag in acc.Tags()["scalars"] else []


def _at(events: list, step: int) -> float:
    """The value logged at ``step``, or the last one before it (0 when none)."""
    i = bisect.bisect_right([e.step for e in events], step)
    return events[i - 1].value if i else 0.0


def read_run(path: str) -> Run:
    """Load one run directory's curves; ValueError when it holds no validation accuracy."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    val = _series(acc, VAL_ACC)
    if not val:
        raise ValueError(f"{path}: no {VAL_ACC} scalars (is it a recipe's --logdir?)")
    timed = _series(acc, BY_TIME + VAL_ACC)
    if len(timed) == len(val):
        seconds = [float(e.step) for e in timed]
    else:  # written before the by_time axis existed: wall clock since the first event
        start = min(e.wall_time for e in val)
        seconds = [e.wall_time - start for e in val]
    sent, syncs = _series(acc, "comm/bytes"), _series(acc, "comm/syncs")
    by_images = _series(acc, BY_IMAGES + VAL_ACC)
    return Run(
        name=os.path.basename(os.path.normpath(path)),
        steps=[e.step for e in val],
        acc=[e.value for e in val],
        seconds=seconds,
        megabytes=[_at(sent, e.step) / 1e6 for e in val],
        syncs=_at(syncs, val[-1].step),
        images=by_images[-1].step if by_images else None,
    )


def table(runs: Sequence[Run]) -> str:
    """A Markdown table of the runs' final figures."""
    rows = ["| run | final val acc | best val acc | seconds | MB sent | syncs | steps | images |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        images = "" if r.images is None else f"{r.images:,}"
        rows.append(f"| {r.name} | {r.acc[-1]:.4f} | {max(r.acc):.4f} | {r.seconds[-1]:.1f} | "
                    f"{r.megabytes[-1]:.1f} | {int(r.syncs)} | {r.steps[-1]} | {images} |")
    return "\n".join(rows) + "\n"


def plot(runs: Sequence[Run], out: str) -> None:
    """Write the two-panel PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (by_time, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in runs:
        by_time.plot(r.seconds, r.acc, marker="o", label=r.name)
        by_bytes.plot(r.megabytes, r.acc, marker="o", label=r.name)
    by_time.set(xlabel="wall time since start (s)", ylabel="validation accuracy",
                title="accuracy against time")
    by_bytes.set(xlabel="MB sent by one rank (algorithm traffic)", title="accuracy against communication")
    spread = [m for r in runs for m in r.megabytes if m > 0]
    if spread and max(spread) / min(spread) > 30:  # SSGD next to Parle: orders of magnitude
        by_bytes.set_xscale("symlog", linthresh=min(spread))
    for ax in (by_time, by_bytes):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Compare recipe runs: validation accuracy against wall time and bytes sent.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a recipe's --logdir (runs/...)")
    parser.add_argument("--out", default="compare.png", help="the PNG to write (default compare.png)")
    parser.add_argument("--table", default=None, metavar="FILE.md",
                        help="also write the Markdown table there (default: beside --out, .md)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in args.runs]
    except ValueError as e:
        parser.error(str(e))
    text = table(runs)
    table_path = args.table or os.path.splitext(args.out)[0] + ".md"
    with open(table_path, "w") as f:
        f.write(text)
    print(text, end="")
    try:
        plot(runs, args.out)
    except ImportError:
        print(f"table written to {table_path}; the plot needs matplotlib: pip install 'commhooks[bench]'",
              file=sys.stderr)
        return 2
    print(f"wrote {args.out} and {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
