"""One command line for every recipe: training flags, and each algorithm's hyper-parameters.

The hyper-parameter flags are generated from ``commhooks.config_class(name)`` (dataclass
fields), so a field added to the library is a flag here with no edit: ``noise_std`` is
``--noise-std``, ``L`` is ``--L``. A flag that the chosen ``--algo`` does not take is an error.
All of them default to ``None`` = "the recipe's default (:func:`algo_defaults`), else the
library's", so the run can say which values it chose and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import commhooks

from recipes.data import POLICIES, Dataset

# Flags the recipe owns that an algorithm field of the same name reuses instead of shadowing.
_SHARED = {"seed"}


@dataclass(kw_only=True)
class DatasetDefaults:
    """A recipe's training defaults for one data set (the papers' settings, scaled to its size)."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[float, ...]  # lr drops, as fractions of --epochs (so short runs decay too)
    lr_decay: float
    weight_decay: float
    momentum: float = 0.9
    width: float = 1.0


@dataclass(kw_only=True)
class Recipe:
    """What distinguishes ``recipes.cifar`` from ``recipes.mnist``: data sets and models."""

    name: str
    datasets: dict[str, DatasetDefaults]
    default_dataset: str
    models: tuple[str, ...]
    load: Callable[[argparse.Namespace], Dataset]
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Hyper-parameter flags from the library's config dataclasses


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else str), optional
    return tp, False


def _converter(tp: Any, default: Any) -> tuple[Callable[[str], Any], tuple | None]:
    """A string -> value function for a field type, and the choices of a Literal."""
    inner, optional = _unwrap(tp)
    choices = None
    if typing.get_origin(inner) is Literal:
        choices = tuple(typing.get_args(inner))
        base = type(choices[0])
    elif isinstance(inner, type):
        base = inner
    else:  # an annotation we cannot resolve: fall back on the default's type
        base = type(default) if default not in (None, dataclasses.MISSING) else str

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if base is float and text.lower() in ("inf", "infinity"):
            return math.inf
        value = base(text)
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"choose from {choices}")
        return value

    convert.__name__ = getattr(base, "__name__", "value")  # argparse names it in errors
    return convert, choices


def hparam_fields() -> dict[str, list[tuple[str, dataclasses.Field, Any]]]:
    """field name -> [(algorithm, field, resolved type)] over every algorithm."""
    out: dict[str, list] = {}
    for algo in commhooks.ALGORITHMS:
        cls = commhooks.config_class(algo)
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # unresolvable forward references: use the raw annotations
            hints = {}
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append((algo, f, hints.get(f.name, f.type)))
    return out


def _add_hparam_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "algorithm hyper-parameters (ALGORITHMS.md; default: the recipe's, printed at start)")
    for name, uses in sorted(hparam_fields().items(), key=lambda kv: kv[0].lower()):
        if name in _SHARED:
            continue
        _, f, tp = uses[0]
        libs = {a: ("required" if g.default is dataclasses.MISSING else f"{g.default}") for a, g, _ in uses}
        if len(set(libs.values())) == 1:
            algos = ", ".join(libs) + f"; library default {next(iter(libs.values()))}"
        else:
            algos = "library defaults: " + ", ".join(f"{a} {v}" for a, v in libs.items())
        flag = "--" + name.replace("_", "-")
        inner, _ = _unwrap(tp)
        if inner is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"({algos})")
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            conv, choices = _converter(tp, default)
            group.add_argument(flag, dest=name, type=conv, default=None,
                               metavar="|".join(map(str, choices)) if choices else None,
                               help=f"({algos})")


# ---------------------------------------------------------------------------------------------
# The parser


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m recipes.{recipe.name}", description=recipe.description,
        epilog="data set defaults: " + "; ".join(
            f"{name}: {d.model} x{d.width}, {d.epochs} epochs, batch {d.batch_size}, lr {d.lr}, "
            f"wd {d.weight_decay}" for name, d in recipe.datasets.items()))
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=sorted(recipe.datasets), default=recipe.default_dataset)
    g.add_argument("--data-dir", default="./data", help="where torchvision data sets live (./data)")
    g.add_argument("--download", action="store_true", help="download the data set if missing")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="accept a data folder whose files do not match torchvision's md5 sums")
    g.add_argument("--model", choices=recipe.models, default=None, help="default: per data set")
    g.add_argument("--width", type=float, default=None, help="channel multiplier (1 = the paper's)")
    g.add_argument("--data-policy", choices=POLICIES, default=None,
                   help="shard | replica | split (ALGORITHMS.md); default: replica for easgd and "
                        "parle (the Parle paper's setting), shard otherwise")

    t = p.add_argument_group("training")
    t.add_argument("--algo", choices=commhooks.ALGORITHMS, default="ssgd", help="(ssgd)")
    t.add_argument("--epochs", type=int, default=None, help="default: per data set, as below")
    t.add_argument("--batch-size", type=int, default=None, help="per rank")
    t.add_argument("--lr", type=float, default=None, help="initial learning rate")
    t.add_argument("--lr-milestones", type=_int_list, default=None,
                   help="epochs at which the lr is multiplied by --lr-decay, e.g. 60,120,160 "
                        "(default: the data set's, as fractions of --epochs)")
    t.add_argument("--lr-decay", type=float, default=None)
    t.add_argument("--momentum", type=float, default=None)
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--replica-size", type=int, default=None,
                   help="ranks per replica; default 1 (entropysgd: the world size, one replica)")
    t.add_argument("--seed", type=int, default=0, help="also the algorithms' own seed (0)")
    t.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for forward/backward (default: on with CUDA, off on CPU)")
    t.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")

    o = p.add_argument_group("output")
    o.add_argument("--logdir", default=None, help="TensorBoard directory (default: runs/<recipe>-<algo>)")
    o.add_argument("--results", default=None, metavar="FILE.json", help="summary written by rank 0")
    o.add_argument("--checkpoint-dir", default=None)
    o.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS", help="0 = never")
    o.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS", help="(1)")
    o.add_argument("--log-interval", type=int, default=None, metavar="STEPS",
                   help="train scalars (default: about 10 per epoch)")
    _add_hparam_flags(p)
    return p


def parse_args(recipe: Recipe, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, fill the data set's defaults, and reject hyper-parameters the algorithm lacks."""
    parser = build_parser(recipe)
    args = parser.parse_args(argv)
    d = recipe.datasets[args.dataset]
    for key, value in (("model", d.model), ("epochs", d.epochs), ("batch_size", d.batch_size),
                       ("lr", d.lr), ("lr_decay", d.lr_decay), ("weight_decay", d.weight_decay),
                       ("momentum", d.momentum), ("width", d.width)):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr_milestones is None:
        args.lr_milestones = sorted({max(1, round(f * args.epochs)) for f in d.milestones})
    if args.nesterov and args.momentum == 0:
        parser.error("--nesterov needs --momentum > 0 (or pass --no-nesterov)")
    if args.data_policy is None:
        args.data_policy = "replica" if args.algo in ("easgd", "parle") else "shard"
    takes = {f.name for f in dataclasses.fields(commhooks.config_class(args.algo))}
    foreign = [n for n, uses in hparam_fields().items()
               if n not in _SHARED and n not in takes and getattr(args, n, None) is not None]
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        mine = ", ".join("--" + n.replace("_", "-") for n in sorted(takes - _SHARED))
        parser.error(f"{flags} is not a hyper-parameter of {args.algo} (it takes: {mine})")
    return args


# ---------------------------------------------------------------------------------------------
# Per-algorithm defaults


# Parle's runs take 16-19 outer steps per epoch (MNIST: B = 469, CIFAR: B = 391 at L = 25). A
# small data set (digits: 11-44 steps per epoch) would take a handful of outer steps in a whole
# run at L = 25; below 4 outer steps per epoch the recipe uses a short inner loop instead.
_PARLE_L = 25
_SMALL_L = 5
_MIN_OUTER_PER_EPOCH = 4


def algo_defaults(algo: str, *, steps_per_epoch: int, total_steps: int, seed: int,
                  log_interval: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """The recipe's defaults for ``algo`` (the papers'), and notes on those adapted to the run.

    - ssgd-noise: ``noise_std = 0.01``, the DPSGD paper's best-converging SSGD* (Section 4.3);
    - cpsgd: ``period = 8``, the constant period the ADPSGD paper compares against, and the
      consensus distance estimated at the first sync after every train log (``log_every``);
    - adpsgd: warm-up of one epoch and ``sample_steps`` a quarter of the run (ADPSGD, Section III);
    - dpsgd: the consensus distance estimated at every train log (``log_every``; a few
      kilobytes then, counted in ``measure_bytes``, not ``comm_bytes``) so that TensorBoard
      shows how far the gossiping replicas drift apart;
    - easgd: ``steps_per_epoch`` = this run's B (the scoping of Parle eq. 9);
    - entropysgd/parle: ``L = 25``, ``alpha = 0.75`` (Parle, Section 3), ``steps_per_epoch`` = B;
      ``L`` becomes 5 on small data sets (< 4 outer steps per epoch at L = 25).
    """
    B, notes = steps_per_epoch, []
    d: dict[str, Any] = {}
    if algo == "ssgd-noise":
        d = {"noise_std": 0.01}
    elif algo == "cpsgd":
        d = {"period": 8, "log_every": log_interval or max(1, B // 10)}
    elif algo == "adpsgd":
        d = {"warmup_steps": B, "p_init": 4, "sample_steps": max(1, total_steps // 4)}
        if B >= total_steps // 2:
            d["warmup_steps"] = max(1, total_steps // 10)
            notes.append(f"warmup_steps {B} (one epoch) -> {d['warmup_steps']}: the run has only "
                         f"{total_steps} steps, one epoch of SSGD would be half of it")
    elif algo == "dpsgd":
        d = {"topology": "random-pair", "log_every": log_interval or max(1, B // 10)}
    elif algo == "easgd":
        d = {"rho": 1.0, "steps_per_epoch": B}
    elif algo in ("entropysgd", "parle"):
        d = {"L": _PARLE_L, "alpha": 0.75, "steps_per_epoch": B}
        if algo == "parle":
            d["rho"] = 1.0
        if B < _MIN_OUTER_PER_EPOCH * _PARLE_L:
            d["L"] = min(_SMALL_L, B)
            notes.append(f"L {_PARLE_L} -> {d['L']}: {B} steps per epoch would give {B / _PARLE_L:.1f} "
                         f"outer steps per epoch (the paper's MNIST and CIFAR runs have 16-19)")
    takes = {f.name for f in dataclasses.fields(commhooks.config_class(algo))}
    if "seed" in takes:
        d["seed"] = seed
    return {k: v for k, v in d.items() if k in takes}, notes


def resolve_hparams(args: argparse.Namespace, *, steps_per_epoch: int, total_steps: int
                    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(hparams passed to commhooks.build, every field's effective value, notes)."""
    cls = commhooks.config_class(args.algo)
    defaults, notes = algo_defaults(args.algo, steps_per_epoch=steps_per_epoch,
                                    total_steps=total_steps, seed=args.seed,
                                    log_interval=args.log_interval)
    passed: dict[str, Any] = {}
    effective: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None) if f.name not in _SHARED else None
        if given is not None:
            passed[f.name] = given
            notes = [n for n in notes if not n.startswith(f.name + " ")]
        elif f.name in defaults:
            passed[f.name] = defaults[f.name]
        if f.name in passed:
            effective[f.name] = passed[f.name]
        elif f.default is not dataclasses.MISSING:
            effective[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            effective[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            effective[f.name] = None
    return passed, effective, notes
