"""What a run shows: TensorBoard scalars, a rich progress bar and summary table, a results JSON.

Only rank 0 builds a :class:`Reporter` that writes; the others get a silent one, so the
training loop calls it unconditionally. The progress bar is live only on a terminal; otherwise
(CI, tests, ``> log``) a plain progress line is printed every few seconds and one line per
evaluation, instead of a redrawn bar.

TensorBoard x axes (docs/metrics.md): every tag is logged against the optimizer step; the key
curves are also logged under ``by_images/`` (step = images processed by all ranks together) and
``by_time/`` (step = seconds since the run started, resumes included), because algorithms and
data policies take different numbers of steps for the same epoch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

# ``algo.stats()`` keys every algorithm reports -> TensorBoard tags; a key of the algorithm's own
# components (ADPSGD's period, Parle's gamma and rho) is filed under the algorithm's name.
_STAT_TAGS = {
    "comm_bytes": "comm/bytes",
    "syncs": "comm/syncs",
    "comm_seconds": "comm/seconds",
    "consensus_distance": "consensus/distance",
}


# Curves also logged against images seen and seconds, so that runs of different algorithms line up.
AXIS_TAGS = ("val/acc", "val/loss", "train/loss")
BY_IMAGES = "by_images/"  # step = images processed by all ranks together
BY_TIME = "by_time/"  # step = whole seconds since the run started (resumes included)


def stat_tag(algo: str, key: str) -> str:
    """The TensorBoard tag of ``algo.stats()[key]``: shared figures under ``comm/`` and
    ``consensus/``, the algorithm's own under ``{algo}/``."""
    return _STAT_TAGS.get(key, f"{algo}/{key}")


def run_figures(algo: str, stats: dict[str, Any], lr: float) -> dict[str, Any]:
    """What an evaluation line and the summary show beside accuracy: the learning rate, the
    consensus distance, the algorithm's own coefficients (ADPSGD's period, gamma and rho),
    syncs and MB sent (see docs/metrics.md)."""
    out: dict[str, Any] = {"lr": lr, "consensus": stats.get("consensus_distance")}
    for key in ("period", "gamma", "rho"):
        if key in stats:
            out[key] = stats[key]
    out["syncs"] = int(stats.get("syncs", 0))
    out["comm MB"] = stats.get("comm_bytes", 0) / 1e6
    return out


def format_figures(figures: dict[str, Any]) -> str:
    return " ".join(f"{k} {_fmt(v)}" for k, v in figures.items())


def _scalar(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Reporter:
    """Rank 0's TensorBoard writer, console output and results file (a no-op elsewhere).

    Args:
        enabled: True on rank 0 only.
        logdir: TensorBoard directory, or None for none.
        total_steps: length of the progress bar.
        title: shown on the bar and the table.
        start_step: the step the run starts (or resumes) at.
        images_per_step: images all ranks process in one step (the ``by_images/`` axis).
        elapsed: seconds the run has already taken (an earlier attempt's, when resuming, plus
            this one's start-up): the ``by_time/`` axis continues from there.
        line_every: seconds between plain progress lines when not on a terminal.
    """

    def __init__(self, *, enabled: bool, logdir: str | None, total_steps: int, title: str,
                 start_step: int = 0, images_per_step: int = 0, elapsed: float = 0.0,
                 line_every: float = 10.0) -> None:
        self.enabled = enabled
        self.writer = None
        self._progress = None
        self.console = None
        self.total_steps, self.images_per_step, self.line_every = total_steps, images_per_step, line_every
        self._t0 = time.perf_counter() - elapsed  # the run's clock, resumes included
        self._since = (time.perf_counter(), start_step)  # this attempt's start, for the rate
        self._last_line = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console

        self.console = Console()
        if logdir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=logdir)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(title, total=total_steps, completed=start_step,
                                                 info="")

    # -- console -----------------------------------------------------------------------------

    def print(self, *lines: str) -> None:
        if self.console is not None:  # rank 0 only
            for line in lines:
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def seconds(self) -> float:
        """Seconds since the run started (earlier attempts included)."""
        return time.perf_counter() - self._t0

    def progress(self, step: int, info: str) -> None:
        """Advance the bar on a terminal; elsewhere print a plain line every ``line_every`` s."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
            return
        now = time.perf_counter()
        if not self.enabled or now - self._last_line < self.line_every:
            return
        self._last_line = now
        t_start, s_start = self._since
        rate = (step - s_start) / max(now - t_start, 1e-9)
        left = (self.total_steps - step) / rate if rate > 0 else math.nan
        self.line(f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%) "
                  f"{info} | {_clock(self.seconds())} elapsed, {_clock(left)} left")

    def line(self, text: str) -> None:
        """A periodic status line: above the live bar on a terminal, plain text elsewhere."""
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # -- TensorBoard -------------------------------------------------------------------------

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """Log ``values`` at ``step``; the :data:`AXIS_TAGS` also against images and seconds."""
        if self.writer is None:
            return
        walltime = time.time()  # one time for the whole call: the tags of a step line up
        seconds = int(self.seconds())
        for tag, v in values.items():
            f = _scalar(v)
            if f is None:
                continue
            self.writer.add_scalar(tag, f, step, walltime=walltime)
            if tag in AXIS_TAGS:
                self.writer.add_scalar(BY_IMAGES + tag, f, step * self.images_per_step, walltime=walltime)
                self.writer.add_scalar(BY_TIME + tag, f, seconds, walltime=walltime)

    def stats(self, step: int, algo: str, stats: dict[str, Any]) -> None:
        # the algorithm's own step counter is the x axis already
        self.scalars(step, {stat_tag(algo, k): v for k, v in stats.items() if k != "step"})

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record the run's configuration: a text summary, and TensorBoard's HPARAMS plugin.

        ``metrics`` name scalar tags already logged (``val/acc``): the HPARAMS table shows
        their last values. Unlike ``SummaryWriter.add_hparams`` this writes no extra scalars
        (no ``hparam/*`` charts) and no second event file.
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        table = "| name | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in clean.items())
        self.writer.add_text("hparams", table, 0)
        file_writer = self.writer.file_writer  # created by add_text above
        for summary in hparams_summary(clean, dict(metrics)):
            if file_writer is not None:
                file_writer.add_summary(summary)

    # -- the end -----------------------------------------------------------------------------

    def summary(self, title: str, rows: dict[str, Any]) -> None:
        if self.console is None:
            return
        if self._progress is not None:
            self._progress.stop()
        from rich.table import Table

        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in rows.items():
            table.add_row(k, _fmt(v))
        self.console.print(table)

    def results(self, path: str | None, results: dict[str, Any]) -> None:
        """Write the results as strict JSON (a missing figure is null, never a bare NaN)."""
        if not (self.enabled and path):
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(strict_json(results), f, indent=2, allow_nan=False)
        os.replace(tmp, path)  # a reader never sees half a file

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.enabled:
            sys.stdout.flush()


def strict_json(value: Any) -> Any:
    """`value` with what strict JSON cannot hold replaced: NaN -> None (a figure that was not
    measured), +-inf -> "inf"/"-inf" (a legitimate setting, e.g. an unbounded ADPSGD ``high``),
    other objects -> their ``str``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
