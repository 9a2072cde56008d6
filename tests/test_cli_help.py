"""The recipes' command line explains itself: every algorithm flag's meaning, valid values and
choices in ``--help`` (from the config fields), honest defaults, short errors, a fresh run
directory per run; and the launcher sets the thread count without torchrun's banner."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import commhooks
from commhooks import config
from launch import cli as launch_cli
from recipes import cli
from recipes.mnist import RECIPE as MNIST

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="100")
    return subprocess.run([sys.executable, "-m", "recipes.mnist", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=50)


@pytest.fixture(scope="module")
def help_text() -> str:
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    text: str = r.stdout
    return text


def _entry(help_text: str, flag: str) -> str:
    """The help block of ``flag`` in ``--help``, whitespace removed (the text wraps anywhere)."""
    m = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -|^\S|\Z)", help_text, re.MULTILINE | re.DOTALL)
    assert m, f"{flag} is not in --help"
    return re.sub(r"\s+", "", m.group(1))


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.timeout(60)
def test_every_algorithm_flag_has_its_meaning_and_choices(help_text):
    for name, uses in cli.hparam_fields().items():
        if name == "seed":  # the recipes' --seed, shared with the algorithms
            continue
        block = _entry(help_text, "--" + name.replace("_", "-"))
        for algo, field, _ in uses:
            if algo not in commhooks.ALGORITHMS:  # registered in this process only (tests/toy_algorithm.py)
                continue
            assert _squash(field.metadata["help"]) in block, (name, algo)
            assert _squash(field.metadata["valid"]) in block, (name, algo)
            assert algo in block or "everyalgorithm" in block, (name, algo)
            for choice in field.metadata.get("choices") or ():
                assert ("none" if choice is None else choice) in block, (name, choice)
        assert "default" in block, name
    # the fixed sets are also in the usage line, as argparse shows choices
    for choices in (config.TOPOLOGIES, config.BUFFER_POLICIES):
        assert "{" + ",".join(choices) + "}" in help_text


@pytest.mark.timeout(60)
def test_training_flags_show_real_defaults(help_text):
    assert "defaultmnist(itsfilesmustbein--data-dir:pass--downloadthefirsttime)" in _entry(help_text, "--dataset")
    assert "digits,synthetic:offline" in _entry(help_text, "--dataset")
    assert "runs/mnist-DATASET-ALGO-N" in _entry(help_text, "--logdir")
    assert "Defaultssgd" in _entry(help_text, "--algo")
    for algo in commhooks.ALGORITHMS:  # listed, each with its one-line meaning
        assert re.search(rf"^  {re.escape(algo)}\s+\S", help_text, re.MULTILINE), algo
    assert "docs/README.md" in help_text
    # every flag says something
    for action in cli.options(cli.build_parser(MNIST)):
        assert action.help, action.option_strings


def test_recipe_defaults_are_described_and_keyed_by_field():
    """Every value algo_defaults passes comes from a RECIPE_DEFAULTS rule of that field (shown in
    --help and docs/), never a restated library default; every rule names a real field."""
    fields = {d.name for algo in commhooks.ALGORITHMS for d in config.hparam_docs(algo)}
    assert set(cli.RECIPE_DEFAULTS) <= fields
    for B, total in ((44, 220), (469, 46900), (10, 15)):
        for algo in commhooks.ALGORITHMS:
            defaults, notes = cli.algo_defaults(algo, steps_per_epoch=B, total_steps=total, seed=0)
            for key in defaults:
                assert cli.recipe_default(algo, key) is not None, (algo, key)
            assert set(notes) <= set(defaults), (algo, notes)


def test_choices_are_available_and_still_validated():
    docs = {d.name: d for d in config.hparam_docs("dpsgd")}
    assert docs["topology"].choices == config.TOPOLOGIES == ("random-pair", "ring", "all")
    assert docs["buffers"].choices == config.BUFFER_POLICIES
    assert docs["grad_compression"].choices == config.GRAD_COMPRESSIONS == (None, "fp16", "bf16", "qsgd")
    assert all(d.help and d.valid for a in commhooks.ALGORITHMS for d in config.hparam_docs(a))
    with pytest.raises(ValueError, match=r"topology must be one of \('random-pair', 'ring', 'all'\), got 'star'"):
        config.make_config("dpsgd", {"topology": "star"})
    with pytest.raises(ValueError, match='buffers must be "average" or "local", got'):
        config.make_config("ssgd", {"buffers": "both"})


@pytest.mark.timeout(60)
def test_a_bad_flag_gets_a_short_answer():
    r = _run("--datset", "digits")
    assert r.returncode == 2
    assert "error: unrecognized arguments: --datset digits (did you mean --dataset?)" in r.stderr
    assert "usage:" not in r.stderr and len(r.stderr.splitlines()) <= 3, r.stderr
    r = _run("--dataset", "digits", "--algo", "dpsgd", "--topology", "star")
    assert r.returncode == 2 and "--topology: choose from random-pair, ring, all" in r.stderr


def _args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    return cli.parse_args(MNIST, ["--dataset", "digits", "--algo", "parle", *argv])


def test_every_run_gets_a_fresh_logdir_and_a_resume_keeps_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, warn = cli.run_logdir(_args(tmp_path), "mnist", resuming=False)
    second, _ = cli.run_logdir(_args(tmp_path), "mnist", resuming=False)
    assert (first, second, warn) == ("runs/mnist-digits-parle-1", "runs/mnist-digits-parle-2", None)
    assert os.path.isdir(second)
    # with checkpoints: a new run records its directory, a resumed one reads it back
    ck = tmp_path / "ck"
    ck.mkdir()
    new, _ = cli.run_logdir(_args(tmp_path, "--checkpoint-dir", str(ck)), "mnist", resuming=False)
    assert new == "runs/mnist-digits-parle-3"
    again, _ = cli.run_logdir(_args(tmp_path, "--checkpoint-dir", str(ck)), "mnist", resuming=True)
    assert again == new
    # an explicit --logdir is honoured; reusing one that holds events says so
    mine = tmp_path / "mine"
    assert cli.run_logdir(_args(tmp_path, "--logdir", str(mine)), "mnist", resuming=False) == (str(mine), None)
    mine.mkdir()
    (mine / "events.out.tfevents.1.host").write_bytes(b"")
    logdir, warn = cli.run_logdir(_args(tmp_path, "--logdir", str(mine)), "mnist", resuming=False)
    assert logdir == str(mine) and warn is not None and "already holds another run" in warn


@pytest.mark.parametrize("nproc,expected", [("2", "1"), ("1", None)])
def test_launch_sets_the_thread_count_itself(monkeypatch, nproc, expected):
    """torchrun prints a banner when it sets OMP_NUM_THREADS; the launcher sets it first."""
    for name in ("OMP_NUM_THREADS", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "LAUNCH_AGENT_PID", "GLOO_SOCKET_IFNAME"):  # restored afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(launch_cli.torchrun, "run", lambda args: None)
    launch_cli.run(launch_cli.parse_args(["--nproc-per-node", nproc, "-m", "recipes.mnist"]))
    assert os.environ.get("OMP_NUM_THREADS") == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's setting wins
    launch_cli.run(launch_cli.parse_args(["--nproc-per-node", nproc, "-m", "recipes.mnist"]))
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_under_torchrun_only_rank_0_prints_help_and_errors(monkeypatch, capsys):
    monkeypatch.setattr(cli, "QUIET_RANK_DELAY_S", 0.0)
    for rank, speaks in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        for argv in (["--help"], ["--datset", "digits"]):
            with pytest.raises(SystemExit):
                cli.parse_args(MNIST, argv)
            out = capsys.readouterr()
            assert bool(out.out + out.err) == speaks, (rank, argv)
