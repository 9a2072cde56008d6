"""Recipes: CLI, loader, models, data sets (in-process, fast) and whole runs (subprocesses).

The multi-process runs go through ``python -m launch`` (or ``torchrun``) with gloo on CPU and
the offline data sets only: scikit-learn's digits, synthetic data, and a CIFAR-10 folder the
test writes in torchvision's on-disk format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import commhooks
from recipes import cli, data, models, report
from recipes.cifar import RECIPE as CIFAR
from recipes.mnist import RECIPE as MNIST

from fixtures import write_cifar10_folder

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"algo", "world_size", "replica_size", "epochs", "steps", "val_acc", "val_loss",
               "train_loss", "comm_bytes", "syncs", "wall_seconds", "hparams"}
BASE_TAGS = {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "comm/bytes", "comm/syncs",
             "comm/seconds", "consensus/distance"}
EXTRA_TAGS = {"adpsgd": {"adpsgd/period"}, "parle": {"parle/gamma", "parle/rho"},
              "entropysgd": {"entropysgd/gamma"}}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OMP_NUM_THREADS", None)
    return env


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _tags(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]) | set(tags.get("tensors", []))


# ---------------------------------------------------------------------------------------------
# CLI


def test_every_hparam_is_a_flag():
    parser = cli.build_parser(MNIST)
    flags = {s for a in cli.options(parser) for s in a.option_strings}
    for algo in commhooks.ALGORITHMS:
        for f in dataclasses.fields(commhooks.config_class(algo)):
            if f.name != "seed":  # the recipes' --seed is also the algorithms' seed
                assert "--" + f.name.replace("_", "-") in flags, (algo, f.name)
    assert {"--noise-std", "--L", "--p-max", "--scoping", "--no-scoping", "--grad-compression"} <= flags


def test_cli_types_and_foreign_flags(capsys):
    a = cli.parse_args(MNIST, ["--dataset", "digits", "--algo", "adpsgd", "--p-max", "none",
                               "--high", "inf", "--sample-steps", "7"])
    assert a.p_max is None and a.high == float("inf") and a.sample_steps == 7
    a = cli.parse_args(MNIST, ["--dataset", "digits", "--algo", "parle", "--no-scoping", "--L", "3"])
    assert a.scoping is False and a.L == 3 and a.data_policy == "replica"
    with pytest.raises(SystemExit):
        cli.parse_args(MNIST, ["--dataset", "digits", "--algo", "cpsgd", "--rho", "1"])
    assert "--rho is not a hyper-parameter of cpsgd" in capsys.readouterr().err


def test_recipe_defaults_are_run_derived_and_adapt():
    """The recipe passes only values derived from the run; the papers' settings are the library's."""
    d, notes = cli.algo_defaults("parle", steps_per_epoch=469, total_steps=469 * 10, seed=0)
    assert d == {"steps_per_epoch": 469} and notes == {}  # L, alpha, rho: the library's
    d, notes = cli.algo_defaults("parle", steps_per_epoch=44, total_steps=220, seed=0)
    assert d == {"steps_per_epoch": 44, "L": 5} and list(notes) == ["L"] and notes["L"].startswith("L 25 -> 5: ")
    d, notes = cli.algo_defaults("adpsgd", steps_per_epoch=100, total_steps=4000, seed=0)
    assert d == {"warmup_steps": 100, "sample_steps": 1000} and notes == {}
    d, notes = cli.algo_defaults("adpsgd", steps_per_epoch=100, total_steps=150, seed=0)
    assert d == {"warmup_steps": 15, "sample_steps": 37} and list(notes) == ["warmup_steps"]
    d, _ = cli.algo_defaults("cpsgd", steps_per_epoch=100, total_steps=4000, seed=0)
    assert d == {"log_every": 10}  # no warm-up: that rule is ADPSGD's
    d, _ = cli.algo_defaults("cpsgd", steps_per_epoch=100, total_steps=4000, seed=0, log_interval=7)
    assert d == {"log_every": 7}
    assert cli.algo_defaults("easgd", steps_per_epoch=100, total_steps=4000, seed=3)[0] == {"steps_per_epoch": 100}
    assert cli.algo_defaults("dpsgd", steps_per_epoch=100, total_steps=4000, seed=3)[0] == {"seed": 3, "log_every": 10}
    assert cli.algo_defaults("ssgd-noise", steps_per_epoch=100, total_steps=4000, seed=3)[0] == {"seed": 3}
    for name in ("diloco", "slowmo"):  # cpsgd's period: theirs exceed whole runs on small data sets
        assert cli.algo_defaults(name, steps_per_epoch=100, total_steps=4000, seed=3)[0] == {"log_every": 10, "period": 8}
    # the papers' values the recipe used to restate are the library's defaults
    library = {name: {d.name: d.default for d in commhooks.config.hparam_docs(name)} for name in ("cpsgd", "ssgd-noise")}
    assert library["cpsgd"]["period"] == 8 and library["ssgd-noise"]["noise_std"] == 0.01
    # a user's flag wins over the recipe default, and the note of that field goes away
    args = cli.parse_args(MNIST, ["--dataset", "digits", "--algo", "parle", "--L", "25"])
    passed, effective, notes = cli.resolve_hparams(args, steps_per_epoch=44, total_steps=220)
    assert passed == {"L": 25, "steps_per_epoch": 44} and effective["gamma"] == 0.01 and notes == {}
    args = cli.parse_args(MNIST, ["--dataset", "digits", "--algo", "adpsgd", "--p-init", "5"])
    passed, _, notes = cli.resolve_hparams(args, steps_per_epoch=100, total_steps=150)
    assert passed == {"p_init": 5, "warmup_steps": 15, "sample_steps": 37} and list(notes) == ["warmup_steps"]
    args = cli.parse_args(MNIST, ["--dataset", "digits", "--algo", "adpsgd", "--warmup-steps", "3"])
    passed, _, notes = cli.resolve_hparams(args, steps_per_epoch=100, total_steps=150)
    assert passed == {"warmup_steps": 3, "sample_steps": 37} and notes == {}


def test_a_new_algorithm_gets_the_run_derived_values_by_field_name(monkeypatch):
    """The rules go by config field, not by algorithm: a config with such fields gets them
    without an edit in recipes/cli.py (ADPSGD's warm-up rule excepted: it is ADPSGD's own)."""

    @dataclasses.dataclass(kw_only=True)
    class ToyConfig:
        steps_per_epoch: int | None = None
        log_every: int = 0
        L: int = 40
        warmup_steps: int = 0
        seed: int = 0
        rho: float = 1.0

    library = commhooks.config_class
    monkeypatch.setattr(commhooks, "config_class", lambda name: ToyConfig if name == "toy" else library(name))
    d, notes = cli.algo_defaults("toy", steps_per_epoch=100, total_steps=1000, seed=7, log_interval=9)
    assert d == {"steps_per_epoch": 100, "log_every": 9, "L": 5, "seed": 7}  # 100 < 4 x 40 steps: small-data L
    assert list(notes) == ["L"] and notes["L"].startswith("L 40 -> 5: ")
    assert cli.algo_defaults("toy", steps_per_epoch=200, total_steps=1000, seed=7)[0]["log_every"] == 20


# ---------------------------------------------------------------------------------------------
# Loader


def _toy(n: int = 103, augment: bool = False) -> data.Dataset:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return data.make_dataset("toy", x, torch.arange(n), x[:10], torch.arange(10), 10, augment, "")


def _epoch(loader: data.TensorLoader) -> list[int]:
    return [int(i) for _, y in loader for i in y]


@pytest.mark.parametrize("policy", ["shard", "replica", "split"])
def test_loader_policies(policy):
    ds, W, m = _toy(), 4, 2
    loaders = [data.TensorLoader(ds, batch_size=5, rank=r, world_size=W, replica_size=m,
                                 policy=policy, seed=1) for r in range(W)]
    assert len({len(ld) for ld in loaders}) == 1  # same steps on every rank: no hang
    seen = [_epoch(ld) for ld in loaders]
    if policy == "shard":
        flat = sum(seen, [])
        assert len(flat) == len(set(flat)) == 4 * len(loaders[0]) * 5
    else:
        for a in range(W // m):  # the ranks of a replica never overlap
            assert not set(seen[a * m]) & set(seen[a * m + 1])
        if policy == "replica":  # each replica covers (almost) the whole set
            assert len(set(seen[0]) | set(seen[1])) == 100
            assert seen[0] != seen[2]
        else:  # split: replicas see disjoint parts, in every epoch
            second = [_epoch(ld) for ld in loaders]
            assert not (set(seen[0] + seen[1] + second[0] + second[1])
                        & set(seen[2] + seen[3] + second[2] + second[3]))


def test_loader_resume_replays_the_rest_of_the_epoch():
    ds = _toy(augment=True)
    a = data.TensorLoader(ds, batch_size=4, rank=1, world_size=2, seed=5)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    sd = a.state_dict()
    rest = [(x.clone(), y.clone()) for x, y in it]
    b = data.TensorLoader(ds, batch_size=4, rank=1, world_size=2, seed=5)
    b.load_state_dict(sd)
    again = list(b)
    assert len(again) == len(rest) == len(a) - 3
    for (x1, y1), (x2, y2) in zip(rest, again, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    assert a.epoch == b.epoch == 1
    first = [int(i) for _, y in head + rest for i in y]  # the labels are the examples' indices
    following = _epoch(a)
    assert len(following) == len(first) and following != first  # next epoch, new order


def test_augment_is_crop_and_flip():
    x = torch.randn(6, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = data.augment_batch(x, gen, pad=0)  # no padding: identity or a mirror image
    for i in range(6):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = data.augment_batch(x, torch.Generator().manual_seed(1), pad=4)
    assert out.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Models and data sets


@pytest.mark.parametrize("name,shape,params", [
    ("lenet", (2, 1, 28, 28), (420_000, 440_000)),
    ("resnet18", (2, 3, 32, 32), (11_000_000, 11_300_000)),
    ("wrn-16-4", (2, 3, 32, 32), (2_700_000, 2_800_000)),
    ("wrn-28-10", (2, 3, 32, 32), (36_400_000, 36_600_000)),
    ("allcnn", (2, 3, 32, 32), (1_300_000, 1_400_000)),
])
def test_models(name, shape, params):
    torch.manual_seed(0)
    net = models.build_model(name, shape[1], 10)
    n = sum(p.numel() for p in net.parameters())
    assert params[0] <= n <= params[1], n
    if name != "wrn-28-10":  # its forward is slow on CPU; the architecture is WRN-16-4's
        assert net(torch.randn(*shape)).shape == (2, 10)


def test_digits_offline():
    d = data.load_digits()
    assert d.train_x.shape[1:] == (1, 28, 28) and len(d.train_x) + len(d.val_x) == 1797
    assert set(d.val_y.tolist()) == set(range(10))


def test_cifar_folder_in_torchvision_format(tmp_path):
    write_cifar10_folder(str(tmp_path), images_per_batch=6)
    d = data.load_cifar("cifar10", str(tmp_path), download=False, verify=False)
    assert d.train_x.shape == (30, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.val_x.shape == (6, 3, 32, 32) and d.augment
    with pytest.raises(data.DatasetUnavailable, match="--data-dir"):  # md5s are checked by default
        data.load_cifar("cifar10", str(tmp_path), download=False)


def test_stat_tags():
    assert report.stat_tag("adpsgd", "period") == "adpsgd/period"
    assert report.stat_tag("parle", "rho") == "parle/rho"
    assert report.stat_tag("easgd", "rho") == "easgd/rho"
    assert report.stat_tag("dpsgd", "comm_bytes") == "comm/bytes"


# ---------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.timeout(60)
def test_missing_dataset_is_one_clear_message(tmp_path):
    r = _run([sys.executable, "-m", "recipes.mnist", "--dataset", "mnist", "--data-dir",
              str(tmp_path / "none")], timeout=50)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for word in ("--data-dir", "--download", "digits", "synthetic"):
        assert word in r.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo", commhooks.ALGORITHMS)
def test_digits_reaches_90_percent(algo, tmp_path):
    """Every algorithm, the recipe's defaults, 5 epochs on 4 ranks: >= 90% validation accuracy."""
    logdir, results = tmp_path / "tb", tmp_path / "results.json"
    r = _run([sys.executable, "-m", "launch", "--nproc-per-node", "4", "--max-restarts", "0",
              "-m", "recipes.mnist", "--dataset", "digits", "--algo", algo, "--epochs", "5",
              "--logdir", str(logdir), "--results", str(results)], timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(results.read_text())
    assert RESULT_KEYS <= set(res), RESULT_KEYS - set(res)
    assert res["algo"] == algo and res["world_size"] == 4 and res["epochs"] == 5
    assert res["val_acc"] >= 0.90, (algo, res["val_acc"], r.stdout[-2000:])
    assert f"{algo} hyper-parameters:" in r.stdout  # the defaults are printed at start
    # not a terminal: no redrawn bar, a few lines per epoch, and only rank 0 prints
    assert "\r" not in r.stdout and r.stdout.count("\n") < 60, r.stdout
    assert r.stdout.count("hyper-parameters:") == 1
    tags = _tags(logdir)
    assert BASE_TAGS | EXTRA_TAGS.get(algo, set()) <= tags, sorted(tags)


@pytest.mark.timeout(120)
def test_cifar_synthetic_smoke_with_torchrun(tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    r = _run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "recipes.cifar", "--dataset",
              "synthetic", "--algo", "dpsgd", "--logdir", str(tmp_path / "tb"),
              "--results", str(tmp_path / "r.json")], timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["world_size"] == 2 and res["algo"] == "dpsgd" and res["steps"] == 2 * 32
    assert res["val_acc"] > 0.5  # noisy class templates: learnable in two short epochs


@pytest.mark.timeout(120)
def test_cifar_reads_torchvision_folder_and_resumes(tmp_path, capsys):
    """recipes.cifar on a CIFAR-10 folder on disk (one process, in this one: no start-up cost):
    a run interrupted after a checkpoint resumes to exactly the uninterrupted result."""
    from recipes.train import main

    write_cifar10_folder(str(tmp_path / "data"), images_per_batch=8)
    base = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--no-verify",
            "--model", "allcnn", "--width", "0.125", "--batch-size", "8", "--epochs", "2",
            "--algo", "cpsgd", "--logdir", str(tmp_path / "tb")]
    straight = main(CIFAR, base)
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "3"]
    first = main(CIFAR, base + ck + ["--max-steps", "7"])
    assert straight is not None and first is not None and first["steps"] == 7
    capsys.readouterr()
    second = main(CIFAR, base + ck + ["--results", str(tmp_path / "b.json")])
    assert "resumed at step 7" in capsys.readouterr().out  # the end of a run is saved too
    assert second is not None
    assert straight["steps"] == second["steps"] == 10
    assert straight["val_loss"] == second["val_loss"]  # bit-identical continuation
    assert json.loads((tmp_path / "b.json").read_text())["val_loss"] == second["val_loss"]


@pytest.mark.timeout(150)
def test_parle_two_ranks_resumes_bit_identically(tmp_path):
    """Stopped mid-epoch and mid inner loop (17 = 3 * L + 2), resumed: the same final model as
    an uninterrupted run (per-rank loader position, algorithm and RNG states, replica policy)."""
    base = [sys.executable, "-m", "launch", "--nproc-per-node", "2", "--max-restarts", "0",
            "-m", "recipes.mnist", "--dataset", "digits", "--algo", "parle", "--epochs", "1",
            "--logdir", str(tmp_path / "tb")]
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "10"]
    runs = [base + ["--results", str(tmp_path / "a.json")], base + ck + ["--max-steps", "17"],
            base + ck + ["--results", str(tmp_path / "b.json")]]
    outs = [_run(cmd, timeout=45) for cmd in runs]
    for r in outs:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed at step 17" in outs[2].stdout
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["steps"] == b["steps"] == 44 and a["syncs"] == b["syncs"]
    assert a["val_loss"] == b["val_loss"] and a["train_loss"] != 0
