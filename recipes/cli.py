"""One command line for every recipe: training flags, and each algorithm's hyper-parameters.

The hyper-parameter flags are generated from ``commhooks.config_class(name)`` (dataclass
fields), so a field added to the library is a flag here with no edit: ``noise_std`` is
``--noise-std``, ``L`` is ``--L``. Their help text, valid values and choices come from the
fields' own documentation (``commhooks.config.hparam_docs``), the same source as ``docs/``.
A flag that the chosen ``--algo`` does not take is an error. All of them default to ``None`` =
"the recipe's default (:func:`algo_defaults`, described by :data:`RECIPE_DEFAULTS`), else the
library's", so the run can say which values it chose and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import math
import os
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import commhooks
from commhooks.config import CommonConfig, HParamDoc, describe, hparam_docs
from launch.exitcodes import EXIT_USAGE
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
    offline: bool = False  # needs no files in --data-dir (generated or shipped with a package)


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


def _show_choices(choices: Sequence[Any]) -> str:
    return ", ".join("none" if c is None else str(c) for c in choices)


def _converter(tp: Any, default: Any, choices: tuple | None = None
               ) -> tuple[Callable[[str], Any], tuple | None]:
    """A string -> value function for a field type, and its choices (given, or a Literal's)."""
    inner, optional = _unwrap(tp)
    if typing.get_origin(inner) is Literal:
        choices = tuple(typing.get_args(inner))
    if choices is not None:
        base = type(next(c for c in choices if c is not None))
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
            raise argparse.ArgumentTypeError(f"choose from {_show_choices(choices)}")
        return value

    convert.__name__ = getattr(base, "__name__", "value")  # argparse names it in errors
    return convert, choices


def hparam_fields() -> dict[str, list[tuple[str, dataclasses.Field, Any]]]:
    """field name -> [(algorithm, field, resolved type)] over every algorithm."""
    out: dict[str, list] = {}
    for algo in commhooks.algorithm_names():
        cls = commhooks.config_class(algo)
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # unresolvable forward references: use the raw annotations
            hints = {}
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append((algo, f, hints.get(f.name, f.type)))
    return out


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def default_text(algo: str, doc: HParamDoc) -> str:
    """The default a recipe run uses for ``doc`` under ``algo``, in words."""
    library = "required" if doc.required else _show(doc.default)
    recipe = recipe_default(algo, doc.name)
    if recipe is None:
        return library
    return f"{recipe.text} (library: {library})"


def _hparam_help(uses: list[tuple[str, HParamDoc]]) -> str:
    """One paragraph per distinct meaning: the algorithms, the meaning, valid values, defaults."""
    paragraphs: dict[tuple[str, str], list[str]] = {}
    for algo, doc in uses:
        paragraphs.setdefault((doc.help, doc.valid), []).append(algo)
    lines = []
    for (meaning, valid), algos in paragraphs.items():
        every = len(algos) == len(commhooks.algorithm_names())
        defaults = {default_text(a, doc) for a, doc in uses if a in algos}
        if len(defaults) == 1:
            default = f"default {defaults.pop()}"
        else:
            default = "defaults: " + "; ".join(
                f"{a} {default_text(a, doc)}" for a, doc in uses if a in algos)
        lines.append(f"{'every algorithm' if every else ', '.join(algos)}: {meaning}. "
                     f"Valid: {valid}; {default}.")
    return "\n".join(lines)


def _add_hparam_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "algorithm hyper-parameters",
        "The update rules and papers: docs/README.md. Unset flags take the recipe's default, else "
        "the library's; the values in use are printed at start.")
    docs = {(algo, doc.name): doc for algo in commhooks.algorithm_names() for doc in hparam_docs(algo)}
    for name, fields_ in sorted(hparam_fields().items(), key=lambda kv: kv[0].lower()):
        if name in _SHARED:
            continue
        uses = [(algo, docs[algo, name]) for algo, _, _ in fields_]
        doc, tp = uses[0][1], fields_[0][2]
        flag = "--" + name.replace("_", "-")
        inner, _ = _unwrap(tp)
        if inner is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=_hparam_help(uses))
        else:
            default = doc.default if doc.default is not dataclasses.MISSING else None
            conv, choices = _converter(tp, default, doc.choices)
            metavar = "{" + _show_choices(choices).replace(", ", ",") + "}" if choices else name.upper()
            group.add_argument(flag, dest=name, type=conv, default=None, metavar=metavar,
                               help=_hparam_help(uses))


QUIET_RANK_DELAY_S = 3.0  # how long a rank other than 0 waits before leaving on a usage error


def _is_first_rank() -> bool:
    # Under torchrun every rank parses the same command line: one copy of help or an error is enough.
    return os.environ.get("RANK", "0") == "0"


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option ``parser`` takes, with its flags and help (argparse keeps them private)."""
    return list(parser._actions)


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake gets a short answer: the error, a guess, where help is (no usage
    wall); under torchrun only rank 0 prints."""

    def print_help(self, file: Any = None) -> None:
        if _is_first_rank():
            super().print_help(file)

    def error(self, message: str) -> typing.NoReturn:
        if not _is_first_rank():
            # torchrun stops every rank once one exits: let rank 0 say what is wrong first
            time.sleep(QUIET_RANK_DELAY_S)
            self.exit(EXIT_USAGE)
        hint = ""
        if message.startswith("unrecognized arguments:"):
            flags = [s for a in options(self) for s in a.option_strings]
            guesses = [m[0] for w in message.split(":", 1)[1].split()
                       if w.startswith("--") and (m := difflib.get_close_matches(w.split("=")[0], flags, n=1))]
            hint = f" (did you mean {' '.join(guesses)}?)" if guesses else ""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}{hint}\n"
                     f"{self.prog} --help lists every flag with its default (and docs/recipes.md)\n")


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, keeping explicit line breaks in help texts (one per algorithm)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines: list[str] = []
        for part in text.splitlines():
            lines += super()._split_lines(part, width)
        return lines

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # descriptions and epilogs: wrap prose lines, keep indented ones (tables) as they are
        return "\n".join(indent + line if line.startswith(" ") else super(_Formatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())


# ---------------------------------------------------------------------------------------------
# The parser

# Collective timeout: how long a rank waits for a lost or partitioned peer before its job fails
# (and the launcher restarts it from the last checkpoint). On CPU every collective of these
# recipes takes well under a second; with CUDA/NCCL allow for the longest time one rank can
# spend away from the others (writing a large checkpoint, first-iteration autotuning).
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_TIMEOUT_CUDA_S = 300.0


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def _dataset_help(recipe: Recipe) -> str:
    need = [n for n, d in recipe.datasets.items() if not d.offline]
    offline = [n for n, d in recipe.datasets.items() if d.offline]
    text = f"default {recipe.default_dataset}"
    if not recipe.datasets[recipe.default_dataset].offline:
        text += " (its files must be in --data-dir: pass --download the first time)"
    return text + (f". {', '.join(offline)}: offline, no download" if offline and need else "")


def _algorithms_epilog() -> str:
    return "algorithms (--algo):\n" + "\n".join(f"  {a:<11} {describe(a)}" for a in commhooks.algorithm_names())


def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"python -m recipes.{recipe.name}", description=recipe.description,
        formatter_class=_Formatter,
        epilog="data set defaults:\n" + "\n".join(
            f"  {name}: {d.model} x{d.width}, {d.epochs} epochs, batch {d.batch_size}, lr {d.lr}, "
            f"wd {d.weight_decay}" for name, d in recipe.datasets.items())
        + "\n" + _algorithms_epilog()
        + "\nDocumentation: docs/README.md (algorithms, flags: docs/recipes.md, metrics: docs/metrics.md).")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=sorted(recipe.datasets), default=recipe.default_dataset,
                   help=_dataset_help(recipe))
    g.add_argument("--data-dir", default="./data", help="where torchvision data sets live (default ./data)")
    g.add_argument("--download", action="store_true", help="download the data set if missing")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="accept a data folder whose files do not match torchvision's md5 sums")
    g.add_argument("--model", choices=recipe.models, default=None,
                   help="default per data set (below)")
    g.add_argument("--width", type=float, default=None,
                   help="channel multiplier, 1 = the paper's (default per data set)")
    g.add_argument("--data-policy", choices=POLICIES, default=None,
                   help="shard = every rank a disjoint 1/W of each epoch; replica = every replica the "
                        "whole set in its own order; split = one fixed part per replica. Default "
                        f"replica for {' and '.join(_full_data_algorithms())} (their paper's setting), "
                        "shard otherwise")

    t = p.add_argument_group("training")
    t.add_argument("--algo", choices=commhooks.algorithm_names(), default="ssgd",
                   help="the algorithm (listed below; docs/README.md). Default ssgd")
    t.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable): the algorithms it registers with "
                        "commhooks.register become --algo choices (docs/usage.md)")
    t.add_argument("--epochs", type=int, default=None, help="default per data set (below)")
    t.add_argument("--batch-size", type=int, default=None, help="per rank (default per data set)")
    t.add_argument("--lr", type=float, default=None, help="initial learning rate (default per data set)")
    t.add_argument("--lr-milestones", type=_int_list, default=None,
                   help="epochs at which the lr is multiplied by --lr-decay, e.g. 60,120,160 "
                        "(default: the data set's, as fractions of --epochs)")
    t.add_argument("--lr-decay", type=float, default=None, help="lr factor at each milestone (default per data set)")
    t.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum (default on)")
    t.add_argument("--weight-decay", type=float, default=None, help="default per data set (below)")
    t.add_argument("--replica-size", type=int, default=None,
                   help="ranks per replica; default 1 (entropysgd: the world size, one replica)")
    t.add_argument("--seed", type=int, default=0, help="also the algorithms' own seed (default 0)")
    t.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for forward/backward (default: on with CUDA, off on CPU)")
    t.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    t.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help=f"collective timeout: a lost or partitioned peer fails the job after this "
                        f"long, and the launcher restarts it from the last checkpoint (default "
                        f"{DEFAULT_TIMEOUT_S:g} on CPU, {DEFAULT_TIMEOUT_CUDA_S:g} with CUDA; with "
                        f"NCCL keep it above the longest time one rank works alone, e.g. a large "
                        f"checkpoint write)")

    o = p.add_argument_group("output")
    o.add_argument("--logdir", default=None,
                   help=f"TensorBoard directory (default: a new {RUNS_ROOT}/{recipe.name}-DATASET-ALGO-N "
                        "for every run; a run resumed from --checkpoint-dir keeps its own)")
    o.add_argument("--results", default=None, metavar="FILE.json", help="summary written by rank 0")
    o.add_argument("--checkpoint-dir", default=None, help="per-rank checkpoints; a rerun resumes from the latest")
    o.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS", help="default 0 = never")
    o.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS", help="default 1")
    o.add_argument("--log-interval", type=int, default=None, metavar="STEPS",
                   help="train scalars (default: about 10 per epoch)")
    _add_hparam_flags(p)
    return p


def _full_data_algorithms() -> list[str]:
    """The algorithms whose paper gives every replica the whole data set (the recipes follow it)."""
    return [a for a in commhooks.algorithm_names() if commhooks.algorithm_spec(a).full_data_per_replica]


def import_plugins(recipe: Recipe, argv: Sequence[str]) -> list[str]:
    """Import every ``--plugin MODULE`` of ``argv`` (before the parser is built, so that the
    algorithms a plugin registers with ``commhooks.register`` are ``--algo`` choices).

    Exits with the usage code, naming the module, when one cannot be imported.
    """
    names = [v for flag, v in zip(argv, argv[1:], strict=False) if flag == "--plugin"]
    names += [a.split("=", 1)[1] for a in argv if a.startswith("--plugin=")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure of the user's module is a usage error here
            _Parser(prog=f"python -m recipes.{recipe.name}").error(f"--plugin: cannot import {name!r}: {type(err).__name__}: {err}")
    return names


def parse_args(recipe: Recipe, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, fill the data set's defaults, and reject hyper-parameters the algorithm lacks."""
    import_plugins(recipe, list(sys.argv[1:] if argv is None else argv))
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
    if args.timeout is None:
        cuda = (args.device or ("cuda" if _cuda_available() else "cpu")).startswith("cuda")
        args.timeout = DEFAULT_TIMEOUT_CUDA_S if cuda else DEFAULT_TIMEOUT_S
    _check_training_flags(parser, args)
    if args.nesterov and args.momentum == 0:
        parser.error("--nesterov needs --momentum > 0 (or pass --no-nesterov)")
    if args.data_policy is None:
        args.data_policy = "replica" if commhooks.algorithm_spec(args.algo).full_data_per_replica else "shard"
    takes = {f.name for f in dataclasses.fields(commhooks.config_class(args.algo))}
    foreign = [n for n, uses in hparam_fields().items()
               if n not in _SHARED and n not in takes and getattr(args, n, None) is not None]
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        mine = ", ".join("--" + n.replace("_", "-") for n in sorted(takes - _SHARED))
        parser.error(f"{flags} is not a hyper-parameter of {args.algo} (it takes: {mine})")
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_training_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values that would otherwise crash (and be retried) or train nonsense, naming the flag."""
    rules = [
        ("--epochs", args.epochs, args.epochs >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "a finite number > 0"),
        ("--lr-decay", args.lr_decay, math.isfinite(args.lr_decay) and args.lr_decay > 0, "> 0"),
        ("--momentum", args.momentum, 0 <= args.momentum < 1, "in [0, 1)"),
        ("--weight-decay", args.weight_decay,
         math.isfinite(args.weight_decay) and args.weight_decay >= 0, ">= 0"),
        ("--width", args.width, math.isfinite(args.width) and args.width > 0, "> 0"),
        ("--timeout", args.timeout, math.isfinite(args.timeout) and args.timeout > 0, "> 0 seconds"),
        ("--checkpoint-every", args.checkpoint_every, args.checkpoint_every >= 0, ">= 0"),
        ("--eval-every", args.eval_every, args.eval_every >= 1, ">= 1"),
    ]
    for flag, value in (("--max-steps", args.max_steps), ("--log-interval", args.log_interval),
                        ("--replica-size", args.replica_size)):
        if value is not None:
            rules.append((flag, value, value >= 1, ">= 1"))
    for flag, value, ok, rule in rules:
        if not ok:
            parser.error(f"{flag} must be {rule}, got {value}")


# ---------------------------------------------------------------------------------------------
# Per-algorithm defaults


@dataclass(frozen=True, kw_only=True)
class RunShape:
    """What the recipe's hyper-parameter defaults are derived from."""

    steps_per_epoch: int  # B
    total_steps: int
    seed: int
    log_every: int  # the train log interval, in steps


def train_log_every(log_interval: int | None, steps_per_epoch: int) -> int:
    """Steps between two train logs: ``--log-interval``, else about 10 per epoch."""
    return log_interval or max(1, steps_per_epoch // 10)


# A rule's answer: the value to pass (KEEP: none, the library's default stays) and why the
# recipe adapted it to this run (None: nothing to say).
KEEP: Any = object()
Choice = tuple[Any, str | None]


@dataclass(frozen=True, kw_only=True)
class RunDefault:
    """A value the recipe derives from the run for a config field of this name.

    Every algorithm whose config has the field gets it (one added to the library too), unless
    ``only`` names the algorithms it is meant for.
    """

    text: str  # the value in words, for --help and docs/
    choose: Callable[[RunShape, Any], Choice]  # (run, the field's library default) -> choice
    only: tuple[str, ...] | None = None


# Parle's runs take 16-19 outer steps per epoch (MNIST: B = 469, CIFAR: B = 391 at L = 25). A
# small data set (digits: 11-44 steps per epoch) would take a handful of outer steps in a whole
# run at the library's L; below 4 outer steps per epoch the recipe uses a short inner loop instead.
_SMALL_L = 5
_MIN_OUTER_PER_EPOCH = 4


def _small_data_L(run: RunShape, library: Any) -> Choice:
    B = run.steps_per_epoch
    if not isinstance(library, int) or B >= _MIN_OUTER_PER_EPOCH * library:
        return KEEP, None
    L = min(_SMALL_L, B)
    return L, (f"L {library} -> {L}: {B} steps per epoch would give {B / library:.1f} outer steps per "
               f"epoch (the paper's MNIST and CIFAR runs have 16-19)")


def _warmup_one_epoch(run: RunShape, library: Any) -> Choice:
    """ADPSGD's warm-up: one epoch of SSGD (Section III), a tenth of a run shorter than two epochs."""
    B, total = run.steps_per_epoch, run.total_steps
    if B < total // 2:
        return B, None
    warmup = max(1, total // 10)
    return warmup, (f"warmup_steps {B} (one epoch) -> {warmup}: the run has only {total} steps, one "
                    f"epoch of SSGD would be half of it")


def _cpsgd_period(run: RunShape, library: Any) -> Choice:
    """CPSGD's library period: DiLoCo's 500 and SlowMo's 48 local steps exceed whole runs on small data sets."""
    return next(f.default for f in dataclasses.fields(commhooks.config_class("cpsgd")) if f.name == "period"), None


# The recipe's defaults, by config field: values derived from the run, and CPSGD's period for
# DiLoCo and SlowMo; never a restated library default (those are the papers' settings, and a
# change there is never overridden here). --help and docs/recipes.md describe them with `text`;
# resolve_hparams notes each adaptation by field.
RECIPE_DEFAULTS: dict[str, RunDefault] = {
    "steps_per_epoch": RunDefault(text="the run's steps per epoch", choose=lambda run, _: (run.steps_per_epoch, None)),
    "log_every": RunDefault(text="--log-interval (about 10 per epoch)", choose=lambda run, _: (run.log_every, None)),
    "seed": RunDefault(text="--seed", choose=lambda run, _: (run.seed, None)),
    "sample_steps": RunDefault(text="a quarter of the run", choose=lambda run, _: (max(1, run.total_steps // 4), None)),
    # ADPSGD's own: CPSGD keeps the library's warm-up (none)
    "warmup_steps": RunDefault(text="one epoch (a tenth of the run when an epoch is half of it)",
                               choose=_warmup_one_epoch, only=("adpsgd",)),
    "L": RunDefault(text=f"the library's, or {_SMALL_L} when an epoch has fewer than {_MIN_OUTER_PER_EPOCH} x L steps",
                    choose=_small_data_L),
    "period": RunDefault(text="cpsgd's (the library's exceeds whole runs on small data sets)", choose=_cpsgd_period,
                         only=("diloco", "slowmo")),
}


def recipe_default(algo: str, name: str) -> RunDefault | None:
    """The recipe's rule for ``algo``'s field ``name``, or None (the library's default holds)."""
    rule = RECIPE_DEFAULTS.get(name)
    if rule is None or (rule.only is not None and algo not in rule.only):
        return None
    return rule


def algo_defaults(algo: str, *, steps_per_epoch: int, total_steps: int, seed: int,
                  log_interval: int | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The values the recipe passes for ``algo`` (:data:`RECIPE_DEFAULTS`), and why it adapted
    any of them to this run, by field.

    - ``steps_per_epoch`` = this run's B (the scoping of Parle eq. 9);
    - ``log_every`` = the train log interval: CPSGD and DPSGD estimate the consensus distance
      then (a few kilobytes, counted in ``measure_bytes``, not ``comm_bytes``), so that
      TensorBoard shows how far the replicas drift apart;
    - ``seed`` = ``--seed``; ADPSGD's ``sample_steps`` a quarter of the run and its warm-up
      one epoch (ADPSGD, Section III);
    - ``L``: the library's (Parle, Section 3) unless an epoch is shorter than 4 outer steps,
      then 5 (small data sets).
    """
    run = RunShape(steps_per_epoch=steps_per_epoch, total_steps=total_steps, seed=seed,
                   log_every=train_log_every(log_interval, steps_per_epoch))
    values: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for f in dataclasses.fields(commhooks.config_class(algo)):
        rule = recipe_default(algo, f.name)
        if rule is None:
            continue
        value, note = rule.choose(run, f.default)
        if value is not KEEP:
            values[f.name] = value
        if note is not None:
            notes[f.name] = note
    return values, notes


def resolve_hparams(args: argparse.Namespace, *, steps_per_epoch: int, total_steps: int
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(hparams passed to commhooks.build, every field's effective value, notes by field)."""
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
            notes.pop(f.name, None)  # the user's value: nothing adapted
        elif f.name in defaults:
            passed[f.name] = defaults[f.name]
        if f.name in passed:
            effective[f.name] = passed[f.name]
        elif f.default is not dataclasses.MISSING:
            effective[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            effective[f.name] = f.default_factory()
        else:
            effective[f.name] = None
    return passed, effective, notes


def _md_value(value: Any) -> str:
    return f'`"{value}"`' if isinstance(value, str) else f"`{value}`"


def hparam_markdown(algo: str, *, common: bool = False) -> str:
    """``algo``'s hyper-parameter table as the docs/ pages show it, from the fields' own
    documentation (tests/test_docs.py checks that the pages hold exactly this table).

    Args:
        algo: a name from ``commhooks.algorithm_names()``.
        common: the options every algorithm takes (buffers, ...) instead of ``algo``'s own.
    """
    shared = {f.name for f in dataclasses.fields(CommonConfig)}
    rows = ["| keyword (flag) | meaning | default | recipes' default | valid values |",
            "|---|---|---|---|---|"]
    for doc in hparam_docs(algo):
        if (doc.name in shared) != common:
            continue
        library = "required" if doc.required else _md_value(doc.default)
        rule = recipe_default(algo, doc.name)
        recipe = "the same" if rule is None else rule.text
        flag = "--" + doc.name.replace("_", "-")
        rows.append(f"| `{doc.name}` (`{flag}`) | {doc.help} | {library} | {recipe} | {doc.valid} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------
# Where a run's TensorBoard files go

RUNS_ROOT = "runs"
# In the checkpoint directory: the logdir of the run that writes the checkpoints, so that a
# resumed run continues its own curves.
LOGDIR_FILE = "tensorboard-logdir"


def fresh_logdir(root: str, name: str) -> str:
    """Create and return ``root/name-N`` with the next free N (1, 2, ...); safe against a race."""
    os.makedirs(root, exist_ok=True)
    pattern = re.compile(re.escape(name) + r"-(\d+)$")
    n = max((int(m.group(1)) for e in os.listdir(root) if (m := pattern.match(e))), default=0)
    while True:
        n += 1
        path = os.path.join(root, f"{name}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def run_logdir(args: argparse.Namespace, recipe_name: str, *, resuming: bool) -> tuple[str, str | None]:
    """This run's TensorBoard directory (rank 0 calls it), and a warning to print, if any.

    ``--logdir`` is honoured as given. Otherwise a resumed run continues in the directory its
    checkpoints name, and a new run gets a fresh ``runs/<recipe>-<dataset>-<algo>-N``: two runs
    in one directory draw one zig-zag curve in TensorBoard.
    """
    marker = os.path.join(args.checkpoint_dir, LOGDIR_FILE) if args.checkpoint_dir else None
    if args.logdir:
        logdir = args.logdir
        old = os.path.isdir(logdir) and any(f.startswith("events.out.tfevents") for f in os.listdir(logdir))
        warning = (f"--logdir {logdir} already holds another run's TensorBoard events: both will share "
                   "its curves (omit --logdir for a fresh directory)") if old and not resuming else None
    elif resuming and marker and os.path.isfile(marker):
        with open(marker) as f:
            logdir, warning = f.read().strip(), None
    else:
        logdir = fresh_logdir(RUNS_ROOT, f"{recipe_name}-{args.dataset}-{args.algo}")
        warning = None
    if marker and not resuming:
        with open(marker, "w") as f:
            f.write(logdir + "\n")
    return logdir, warning
