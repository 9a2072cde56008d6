"""Runs compare at a glance: the recipes log against images and seconds, print plain progress
off a terminal, and ``benchmarks.compare`` turns three short digits runs into a PNG and a table."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from benchmarks import compare
from recipes import report

from spawn import run_ranks


def _scalars(logdir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_reporter_axes_progress_lines_and_no_hparam_charts(tmp_path, monkeypatch):
    from rich.console import Console

    out = io.StringIO()
    monkeypatch.setattr("rich.console.Console", lambda: Console(file=out, force_terminal=False))
    rep = report.Reporter(enabled=True, logdir=str(tmp_path), total_steps=10, title="t",
                          images_per_step=64, elapsed=100.0, line_every=0.0)
    rep.scalars(3, {"val/acc": 0.5, "lr": 0.1})
    rep.progress(4, "loss 1.0")
    rep.hparams({"algo": "cpsgd", "lr": 0.1}, {"val/acc": 0.5})
    rep.close()
    tags = _scalars(tmp_path)
    assert set(tags) == {"val/acc", "lr", "by_images/val/acc", "by_time/val/acc"}  # no hparam/*
    assert tags["by_images/val/acc"][0].step == 3 * 64
    assert tags["by_time/val/acc"][0].step >= 100  # the run's clock includes the earlier attempt
    assert len({e.wall_time for t in tags.values() for e in t}) == 1  # one wall time per call
    assert re.search(r"step 4/10 \(40%\) loss 1\.0 \| 0:01:4\d elapsed, \S+ left", out.getvalue()), out.getvalue()
    assert len(os.listdir(tmp_path)) == 1  # one event file, no hparams subdirectory


def test_run_figures_carry_lr_consensus_and_coefficients():
    stats = {"comm_bytes": 2e6, "syncs": 3.0, "consensus_distance": 0.25, "gamma": 0.01, "rho": 1.5}
    line = report.format_figures(report.run_figures("parle", stats, 0.1))
    assert line == "lr 0.1 consensus 0.25 gamma 0.01 rho 1.5 syncs 3 comm MB 2"
    nan = report.format_figures(report.run_figures("dpsgd", {"consensus_distance": float("nan")}, 0.1))
    assert "consensus n/a" in nan


def _train(rank: int, world_size: int, argv: list[str]):
    """One rank of a recipe run inside a spawn.run_ranks process (its group is already up)."""
    import recipes.train as train
    from recipes.mnist import RECIPE

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    train.shutdown = lambda: None  # run_ranks owns the process group and tears it down
    return train.main(RECIPE, argv)


@pytest.mark.timeout(150)
def test_compare_three_digits_runs_writes_a_png_and_a_table(tmp_path):
    """Three short runs on 2 ranks (~10-20 s each on an idle 2-core machine), then the comparison."""
    pytest.importorskip("matplotlib")
    runs = {}
    for algo in ("ssgd", "cpsgd", "parle"):
        logdir = tmp_path / f"digits-{algo}"
        argv = ["--dataset", "digits", "--algo", algo, "--epochs", "1", "--max-steps", "12",
                "--log-interval", "4", "--logdir", str(logdir)]
        if algo == "cpsgd":
            argv += ["--period", "4"]
        runs[algo] = (logdir, run_ranks(_train, 2, argv, timeout=120)[0])
    png = tmp_path / "cmp.png"
    md = png.with_suffix(".md")  # the table beside the picture
    assert compare.main([str(d) for d, _ in runs.values()] + ["--out", str(png), "--table", str(md)]) == 0

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    height, width = imread(str(png)).shape[:2]
    assert width > 1000 and height > 400  # two panels side by side
    rows = [r for r in md.read_text().splitlines() if r.startswith("| digits-")]
    assert len(rows) == 3
    for row, (logdir, results) in zip(rows, runs.values(), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == logdir.name
        assert float(cells[1]) == pytest.approx(results["val_acc"], abs=5e-5)
        assert float(cells[4]) == pytest.approx(results["comm_bytes"] / 1e6, abs=0.05)
        assert int(cells[5]) == results["syncs"] and int(cells[6]) == results["steps"] == 12
        assert cells[7] == f"{12 * 32 * 2:,}"  # images: steps x batch x ranks
    # the byte counts are what tell the algorithms apart
    sent = {algo: res["comm_bytes"] for algo, (_, res) in runs.items()}
    assert sent["ssgd"] > sent["parle"] > 0 and sent["ssgd"] > sent["cpsgd"] > 0
