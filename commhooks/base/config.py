"""Configuration fields that document and validate themselves, and the options every algorithm takes.

Every config is a frozen keyword-only dataclass; a field without a default is required. Each
field carries ``metadata={"help": ..., "valid": ...}`` (and ``"choices"`` for a fixed set): the
recipes' ``--help`` and the pages under ``docs/`` are generated from it (:func:`field_docs`).
A config validates itself at construction (``__post_init__``): a bad value raises
``ValueError`` naming the argument and the rule. Configs compose by inheritance: an algorithm's
config derives from the configs of its components, and each ``__post_init__`` checks its own
fields and then calls ``super().__post_init__()``.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal


def check(ok: bool, name: str, rule: str, value: object) -> None:
    """Raise ``ValueError("{name} must be {rule}, got {value!r}")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int_at_least(config: object, name: str, low: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``config.name`` is an integer ``>= low``."""
    value = getattr(config, name)
    check(is_int(value) and value >= low, name, f"an integer >= {low}", value)


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hparam(
    default: Any = MISSING, *, help: str, valid: str, choices: tuple[Any, ...] | None = None, int_at_least: int | None = None,
) -> Any:
    """A config field with its one-line meaning (``help``) and valid values (``valid``).

    With ``int_at_least``, every config checks at construction that the field is an integer at
    least that large (``ConfigBase.__post_init__``); other rules go in the config's own
    ``__post_init__``.
    """
    metadata: dict[str, Any] = {"help": help, "valid": valid}
    if choices is not None:
        metadata["choices"] = choices
    if int_at_least is not None:
        metadata["int_at_least"] = int_at_least
    return field(default=default, metadata=metadata)


def literal_values(annotation: Any) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` type, with ``None`` for ``Literal[...] | None``."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    out: list[Any] = []
    for arg in typing.get_args(annotation):
        if arg is type(None):
            out.append(None)
        elif typing.get_origin(arg) is Literal:
            out.extend(typing.get_args(arg))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class ConfigBase:
    """The root of every config: the end of the ``__post_init__`` chain, which checks the fields
    declared with ``hparam(..., int_at_least=N)``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            low = f.metadata.get("int_at_least")
            if low is not None:
                check_int_at_least(self, f.name, low)

    def warn_foot_guns(self, name: str, optimizer: Any, num_replicas: int) -> None:
        """Warn (at ``build``) about settings that train without error but not as intended.

        Overridden by configs that know such a setting (calling ``super()``); ``name`` is the
        algorithm's.
        """


BufferPolicy = Literal["average", "local"]
GradCompression = Literal["fp16", "bf16", "qsgd"]

# The fixed sets of the choice fields (also in each field's metadata["choices"]).
BUFFER_POLICIES: tuple[str, ...] = literal_values(BufferPolicy)
GRAD_COMPRESSIONS: tuple[str | None, ...] = (None, *literal_values(GradCompression))


@dataclass(frozen=True, kw_only=True)
class CommonConfig(ConfigBase):
    """Options every algorithm takes.

    Args:
        buffers: ``"average"`` (floating buffers averaged with the weights, integer buffers
            max-reduced) or ``"local"`` (buffers never communicated).
        grad_compression: ``None``, ``"fp16"`` or ``"bf16"``: the dtype gradients travel in;
            ``"qsgd"``: QSGD's stochastic quantization (Alistarh et al., arXiv 1610.02132).
        qsgd_bits, qsgd_bucket_size, qsgd_seed: QSGD's bits per level, bucket length and seed.
    """

    buffers: BufferPolicy = hparam(
        "average", choices=BUFFER_POLICIES, valid='"average" or "local"',
        help="buffers such as BatchNorm statistics: average = floating buffers averaged with the "
             "weights (integer ones take the max), local = never communicated")
    grad_compression: GradCompression | None = hparam(
        None, choices=GRAD_COMPRESSIONS, valid='None, "fp16", "bf16" or "qsgd"',
        help="how the gradients travel: None = as computed (float32), fp16/bf16 = in that dtype (half "
             "the bytes, averaged in that precision), qsgd = QSGD's unbiased stochastic quantization "
             "(about (qsgd_bits + 1) / 8 bytes per coordinate, all-gathered and averaged)")
    qsgd_bits: int = hparam(
        8, valid="an integer in 1..8 (a level fits one byte)",
        help="QSGD: bits per level, s = 2^bits - 1 levels of abs(g_i) / norm(bucket); the sign takes one more bit")
    qsgd_bucket_size: int = hparam(
        512, valid="an integer >= 1",
        help="QSGD: coordinates per bucket, each sends its float32 norm (the variance bound grows with it)", int_at_least=1)
    qsgd_seed: int = hparam(
        0, valid="an integer",
        help="QSGD: seed of the rounding draws (each rank's stream differs by rank, step and parameter)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.buffers in BUFFER_POLICIES, "buffers", '"average" or "local"', self.buffers)
        check(self.grad_compression in GRAD_COMPRESSIONS, "grad_compression", 'None, "fp16", "bf16" or "qsgd"',
              self.grad_compression)
        check(is_int(self.qsgd_bits) and 1 <= self.qsgd_bits <= 8, "qsgd_bits", "an integer in 1..8", self.qsgd_bits)
        check(is_int(self.qsgd_seed), "qsgd_seed", "an integer", self.qsgd_seed)


@dataclass(frozen=True)
class HParamDoc:
    """One hyper-parameter as documented by its field: what ``--help`` and ``docs/`` show.

    Args:
        name: the keyword ``build`` takes.
        help: its meaning, one line.
        valid: the values the config accepts, in words.
        default: the library default, or ``dataclasses.MISSING`` when required.
        choices: the fixed set of values, or None.
    """

    name: str
    help: str
    valid: str
    default: Any
    choices: tuple[Any, ...] | None

    @property
    def required(self) -> bool:
        return self.default is MISSING


def field_docs(cls: type[ConfigBase]) -> list[HParamDoc]:
    """Every field of config class ``cls`` with its meaning, default, valid values and choices."""
    out = []
    for f in fields(cls):
        meta = f.metadata
        out.append(HParamDoc(name=f.name, help=meta["help"], valid=meta["valid"], default=f.default,
                             choices=meta.get("choices")))
    return out


def required_fields(cls: type[ConfigBase]) -> list[str]:
    return [f.name for f in fields(cls) if _is_required(f)]


def _is_required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING
