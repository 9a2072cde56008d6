"""What a run shows: TensorBoard scalars, a rich progress bar and summary table, a results JSON.

Only rank 0 builds a :class:`Reporter` that writes; the others get a silent one, so the
training loop calls it unconditionally. The progress bar is live only on a terminal; otherwise
(CI, tests, ``> log``) one plain line per evaluation is printed instead of a redrawn bar.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

# ``algo.stats()`` keys -> TensorBoard tags; algorithm-specific keys are filed under the paper
# that defines them (ADPSGD's period, Parle's gamma and rho) and otherwise under the algorithm.
_STAT_TAGS = {
    "comm_bytes": "comm/bytes",
    "syncs": "comm/syncs",
    "comm_seconds": "comm/seconds",
    "consensus_distance": "consensus/distance",
    "period": "adpsgd/period",
    "gamma": "parle/gamma",
}


def stat_tag(algo: str, key: str) -> str:
    if key in _STAT_TAGS and not (key == "period" and algo != "adpsgd"):
        return _STAT_TAGS[key]
    if key == "rho" and algo in ("parle", "entropysgd"):
        return "parle/rho"
    return f"{algo}/{key}"


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
    """

    def __init__(self, *, enabled: bool, logdir: str | None, total_steps: int, title: str,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.writer = None
        self._progress = None
        self.console = None
        if not enabled:
            return
        from rich.console import Console

        self.console = Console()
        if logdir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=logdir)
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(title, total=total_steps, completed=start_step,
                                                 info="")

    # -- console -----------------------------------------------------------------------------

    def print(self, *lines: str) -> None:
        if self.enabled:
            for line in lines:
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def progress(self, step: int, info: str) -> None:
        """Advance the bar (terminal only; elsewhere :meth:`line` reports at evaluations)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)

    def line(self, text: str) -> None:
        """A periodic status line: above the live bar on a terminal, plain text elsewhere."""
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # -- TensorBoard -------------------------------------------------------------------------

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            f = _scalar(v)
            if f is not None:
                self.writer.add_scalar(tag, f, step)

    def stats(self, step: int, algo: str, stats: dict[str, Any]) -> None:
        # the algorithm's own step counter is the x axis already
        self.scalars(step, {stat_tag(algo, k): v for k, v in stats.items() if k != "step"})

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record the run's configuration: a text summary, and TensorBoard's HPARAMS plugin."""
        if self.writer is None:
            return
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        table = "| name | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in clean.items())
        self.writer.add_text("hparams", table, 0)
        # run_name="." keeps the HPARAMS record in this run's directory instead of a new subdir
        self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    # -- the end -----------------------------------------------------------------------------

    def summary(self, title: str, rows: dict[str, Any]) -> None:
        if not self.enabled:
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
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
