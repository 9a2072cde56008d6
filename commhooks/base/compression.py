"""The gradient hook of a configuration: plain all-reduce, fp16/bf16 casts, or QSGD."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import CommonConfig
from .grad_hooks import Hook, allreduce_hook, compress_wrapper
from .qsgd import QSGDCompressor, qsgd_hook

#: The dtype each cast compression sends (``None``: as computed).
COMPRESSION: dict[str | None, torch.dtype | None] = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_grad_hook(config: CommonConfig, params: Iterable[torch.Tensor] = ()) -> Hook:
    """The gradient hook of ``config.grad_compression`` (``params``: the model's, for QSGD's draws)."""
    if config.grad_compression == "qsgd":
        return qsgd_hook(QSGDCompressor(params, bits=config.qsgd_bits, bucket_size=config.qsgd_bucket_size,
                                        seed=config.qsgd_seed))
    dtype = COMPRESSION[config.grad_compression]
    return allreduce_hook if dtype is None else compress_wrapper(allreduce_hook, dtype)
