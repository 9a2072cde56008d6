"""Fail loudly, on every rank, when ranks disagree (configuration, step counters, layouts).

Ranks that disagree on *when* or *what* to communicate hang or, worse, mix the wrong tensors of
the same size (docs/README.md, "Ranks must agree"). Each field is hashed to an integer and compared with a MIN and a MAX
all-reduce: two tiny collectives that every rank runs, so a mismatch is an error everywhere,
never a hang, and works on gloo and NCCL alike (no object collectives).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp


def _field_hash(value: object) -> int:
    digest = hashlib.sha256(repr(value).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # fits a signed int64


def collective_device(group: ProcessGroup | None = None) -> torch.device:
    """Where a small tensor for a collective over ``group`` must live: CUDA for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_min(value: int, group: ProcessGroup | None = None) -> int:
    """The minimum of ``value`` over the ranks of ``group`` (one int64 all-reduce; collective).

    ``rank_min(int(ok)) == 1`` is "ok on every rank". In a single process it returns ``value``.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(t, op=ReduceOp.MIN, group=group)
    return int(t.item())


def check_same_across_ranks(
    fields: Mapping[str, object],
    group: ProcessGroup | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Raise ``RuntimeError`` on every rank if any field differs between ranks.

    Args:
        fields: name -> value; values are compared through ``repr``. Every rank must pass the
            same keys in the same order.
        group: the process group to compare over (default: the default group).
        device: where the comparison tensor lives (must suit the backend: CUDA for NCCL).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    if device is None:
        device = collective_device(group)
    names = list(fields)
    # The key names take part too, so ranks that pass different keys also fail loudly.
    hashes = [_field_hash(names)] + [_field_hash(fields[k]) for k in names]
    low = torch.tensor(hashes, dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=ReduceOp.MAX, group=group)
    differ = (low != high).tolist()
    if differ[0]:
        raise RuntimeError(f"ranks disagree on which fields to compare (rank has {names})")
    bad = [name for name, d in zip(names, differ[1:], strict=True) if d]
    if bad:
        mine = ", ".join(f"{k}={fields[k]!r}" for k in bad)
        raise RuntimeError(
            f"ranks disagree on {', '.join(bad)} (rank {dist.get_rank()} has {mine}); "
            "every rank must run the same configuration"
        )
