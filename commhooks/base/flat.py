"""Persistent flat buffers that the model's parameters and buffers *live* in.

A weight synchronisation is then one in-place collective over one tensor per dtype, with no
``torch.cat`` and no copy-in/copy-out: PyTorch's ``PeriodicModelAverager`` concatenates at every
sync and costs 1.6-2.2x a raw all-reduce of the same bytes (README.md, "Benchmarks").

Layout of one floating group (one per dtype/device): ``[parameters | floating buffers]``, so the
parameter segment is a prefix and ``buffers="local"`` simply communicates the prefix only.
Integer buffers (``num_batches_tracked``) live in flat tensors of their own and are max-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(kw_only=True)
class FlatGroup:
    """One flat tensor and the tensors that are views into it.

    Args:
        flat: the storage every member tensor is a view of.
        params: parameters of this dtype/device, in layout order (the prefix of ``flat``).
        param_numel: number of elements in the parameter prefix.
        comm_numel: number of elements that take part in weight communication (the parameter
            prefix, plus the floating buffers when they are averaged).
    """

    flat: torch.Tensor
    params: list[nn.Parameter]
    param_numel: int
    comm_numel: int
    _shapes: list[torch.Size] = field(default_factory=list)

    @property
    def param_segment(self) -> torch.Tensor:
        return self.flat[: self.param_numel]

    @property
    def comm_segment(self) -> torch.Tensor:
        return self.flat[: self.comm_numel]

    @property
    def buffer_segment(self) -> torch.Tensor:
        return self.flat[self.param_numel :]

    def split_params(self, segment: torch.Tensor) -> list[torch.Tensor]:
        """Views of a parameter-prefix-shaped tensor, one per parameter, shaped like it."""
        sizes = [p.numel() for p in self.params]
        return [piece.view(shape) for piece, shape in zip(segment.split(sizes), self._shapes, strict=True)]


def _relocate(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy each tensor into ``flat`` and make it a view of its slice (identity preserved)."""
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        view = flat[offset : offset + n].view_as(tensor)
        view.copy_(tensor.detach())
        # ``.data =`` keeps the Parameter/buffer object (which DDP, the optimizer and the module
        # hold) and only swaps its storage, so in-place updates now land in the flat buffer.
        tensor.data = view
        offset += n


def _group_key(tensor: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    return (tensor.dtype, tensor.device)


class FlatWeights:
    """All parameters and buffers of a module relocated into persistent flat tensors.

    Args:
        module: the model (the ``.module`` of a DDP wrapper).
        buffers: ``"average"`` to communicate floating buffers with the weights (integer buffers
            take the maximum), ``"local"`` to keep every buffer out of communication.
    """

    def __init__(self, module: nn.Module, buffers: str = "average") -> None:
        self.buffers_policy = buffers
        params = list(module.parameters())
        all_buffers = [b for b in module.buffers() if b is not None]
        for p in params:
            if not p.is_floating_point():
                raise ValueError(f"model: parameter of dtype {p.dtype} is not supported")
        float_buffers = [b for b in all_buffers if b.is_floating_point()]
        int_buffers = [b for b in all_buffers if not b.is_floating_point() and not b.is_complex()]

        keys: list[tuple[torch.dtype, torch.device]] = []
        for t in params + float_buffers:
            if _group_key(t) not in keys:
                keys.append(_group_key(t))
        self.groups: list[FlatGroup] = []
        for dtype, device in keys:
            gparams = [p for p in params if _group_key(p) == (dtype, device)]
            gbuffers = [b for b in float_buffers if _group_key(b) == (dtype, device)]
            param_numel = sum(p.numel() for p in gparams)
            buffer_numel = sum(b.numel() for b in gbuffers)
            flat = torch.empty(param_numel + buffer_numel, dtype=dtype, device=device)
            with torch.no_grad():
                _relocate(gparams + gbuffers, flat)
            comm = param_numel + (buffer_numel if buffers == "average" else 0)
            self.groups.append(
                FlatGroup(
                    flat=flat,
                    params=gparams,
                    param_numel=param_numel,
                    comm_numel=comm,
                    _shapes=[p.shape for p in gparams],
                )
            )

        self.int_flats: list[torch.Tensor] = []
        for key in dict.fromkeys(_group_key(b) for b in int_buffers):
            members = [b for b in int_buffers if _group_key(b) == key]
            flat = torch.empty(sum(b.numel() for b in members), dtype=key[0], device=key[1])
            with torch.no_grad():
                _relocate(members, flat)
            self.int_flats.append(flat)

    @property
    def device(self) -> torch.device:
        return self.groups[0].flat.device if self.groups else torch.device("cpu")

    def comm_segments(self) -> list[torch.Tensor]:
        """What a weight synchronisation averages: parameters (+ floating buffers if averaged)."""
        return [g.comm_segment for g in self.groups if g.comm_numel > 0]

    def param_segments(self) -> list[torch.Tensor]:
        return [g.param_segment for g in self.groups]

    def buffer_segments(self) -> list[torch.Tensor]:
        """Floating-buffer segments that are averaged (empty under ``buffers="local"``)."""
        if self.buffers_policy != "average":
            return []
        return [g.buffer_segment for g in self.groups if g.buffer_segment.numel() > 0]

    def max_segments(self) -> list[torch.Tensor]:
        """Integer buffers that take the maximum over replicas (none under ``buffers="local"``)."""
        return self.int_flats if self.buffers_policy == "average" else []

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every flat tensor (floating then integer), for a later :meth:`restore`."""
        return [g.flat.clone() for g in self.groups] + [f.clone() for f in self.int_flats]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for dst, src in zip([g.flat for g in self.groups] + self.int_flats, snapshot, strict=True):
                dst.copy_(src)
