"""QSGD: unbiased stochastic quantization of gradients, as a DDP communication hook.

D. Alistarh, D. Grubic, J. Li, R. Tomioka, M. Vojnovic, "QSGD: Communication-Efficient SGD via
Gradient Quantization and Encoding", NeurIPS 2017, arXiv 1610.02132, Section 3.1 and Lemma 3.1.

Each parameter's gradient is cut into buckets of ``bucket_size`` consecutive coordinates (the last
one of a parameter may be shorter; a bucket never spans two parameters). For a bucket ``v`` with
``s = 2**bits - 1`` levels, coordinate ``i`` is sent as

    Q(v)_i = ||v||_2 * sign(v_i) * xi_i / s,
    xi_i = l + 1 with probability s|v_i|/||v|| - l, else l,   where l = floor(s|v_i|/||v||),

so ``E[Q(v)] = v`` and ``E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2`` (Lemma 3.1, ``d`` the
bucket's length). On the wire: the float32 norm of every bucket, the level ``xi_i`` in ``bits``
bits and the sign in one bit, packed eight coordinates at a time (:func:`pack_bits`).

Every rank all-gathers every rank's code, decodes each in rank order and averages, so all ranks
hold bit-identical gradients. The rounding draws of a parameter come from a generator seeded with
``(seed, step, rank, parameter index)``: independent across ranks, reproducible across runs, and
independent of how DDP groups parameters into buckets (DDP reorders them after its first
iteration, and a resumed process starts from the first-iteration order again).
"""

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .grad_hooks import GradSyncState, Hook, allreduce_hook
from .rng import step_seed

MAX_BITS = 8  # a level fits one byte, the widest field pack_bits handles


def num_levels(bits: int) -> int:
    """``s = 2**bits - 1``: the levels ``0, 1/s, ..., 1`` of ``|v_i| / ||v||``."""
    return (1 << bits) - 1


# ---------------------------------------------------------------------------------------------
# Bit packing: eight values of ``width`` bits become ``width`` bytes.


def packed_size(numel: int, width: int) -> int:
    """Bytes :func:`pack_bits` makes of ``numel`` values of ``width`` bits."""
    return numel if width == 8 else math.ceil(numel / 8) * width


def _check_width(width: int) -> None:
    if not 1 <= width <= 8:
        raise ValueError(f"width must be in 1..8, got {width}")


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**width)`` (``1 <= width <= 8``) into a uint8 tensor, ``width`` bits each.

    Groups of eight values become ``width`` bytes (value ``j`` of a group in bits
    ``j*width .. (j+1)*width - 1`` of the group's little-endian word); the last group is padded
    with zeros.
    """
    _check_width(width)
    if width == 8:
        return values.reshape(-1).to(torch.uint8)
    flat = values.reshape(-1)
    n = flat.numel()
    groups = math.ceil(n / 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=flat.device)
    padded[:n] = flat
    columns = padded.view(groups, 8)
    # Column by column (a reduction over a dimension of 8 is slower): the fields do not overlap,
    # and 8 * 7 = 56 bits fit an int64.
    word = columns[:, 0].clone()
    for j in range(1, 8):
        word.bitwise_or_(columns[:, j] << (j * width))
    out = torch.empty(groups, width, dtype=torch.uint8, device=flat.device)
    for b in range(width):
        out[:, b] = (word >> (8 * b)) & 0xFF
    return out.view(-1)


def unpack_bits(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """The first ``numel`` values that :func:`pack_bits` packed, as uint8."""
    _check_width(width)
    if width == 8:
        return packed[:numel]
    rows = packed.view(-1, width)
    word = rows[:, 0].to(torch.int64)
    for b in range(1, width):
        word.bitwise_or_(rows[:, b].to(torch.int64) << (8 * b))
    out = torch.empty(rows.shape[0], 8, dtype=torch.uint8, device=packed.device)
    mask = (1 << width) - 1
    for j in range(8):
        out[:, j] = (word >> (j * width)) & mask
    return out.view(-1)[:numel]


# ---------------------------------------------------------------------------------------------
# The quantizer: pure functions on flat tensors.


@dataclass(frozen=True)
class Layout:
    """How a flat vector made of consecutive segments (parameters) splits into QSGD buckets.

    Args:
        sizes: the segments' lengths, in order.
        bucket_size: ``d``, the coordinates per bucket; a segment's last bucket may be shorter.
        lengths: every bucket's length (int64, on the vector's device).
        mask: ``True`` at the real coordinates of the zero-padded ``(buckets, bucket_size)``
            matrix the norms are computed on.
    """

    sizes: tuple[int, ...]
    bucket_size: int
    lengths: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, sizes: Sequence[int], bucket_size: int, device: torch.device | str = "cpu") -> "Layout":
        lengths: list[int] = []
        for n in sizes:
            full, tail = divmod(int(n), bucket_size)
            lengths += [bucket_size] * full + ([tail] if tail else [])
        counts = torch.tensor(lengths, dtype=torch.int64, device=device)
        mask = torch.arange(bucket_size, device=device).unsqueeze(0) < counts.unsqueeze(1)
        return cls(sizes=tuple(int(n) for n in sizes), bucket_size=bucket_size, lengths=counts, mask=mask)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def num_buckets(self) -> int:
        return self.lengths.numel()

    def per_coordinate(self, per_bucket: torch.Tensor) -> torch.Tensor:
        """A per-bucket value repeated over the bucket's coordinates."""
        return per_bucket.repeat_interleave(self.lengths, output_size=self.numel)


@dataclass(frozen=True)
class QSGDCode:
    """A quantized vector: what one rank sends.

    Args:
        norms: float32, ``||v||_2`` of every bucket.
        levels: the levels ``xi_i``, :func:`pack_bits` with ``bits`` bits each.
        signs: ``v_i < 0``, :func:`pack_bits` with one bit each.
        bits: bits per level.
    """

    norms: torch.Tensor
    levels: torch.Tensor
    signs: torch.Tensor
    bits: int

    def payload(self) -> torch.Tensor:
        """The code as one uint8 tensor (norms, levels, signs): the bytes that travel."""
        return torch.cat([self.norms.view(torch.uint8), self.levels, self.signs])

    @classmethod
    def from_payload(cls, payload: torch.Tensor, layout: Layout, bits: int) -> "QSGDCode":
        n_norms = 4 * layout.num_buckets
        n_levels = packed_size(layout.numel, bits)
        norms = payload[:n_norms].view(torch.float32)
        return cls(norms=norms, levels=payload[n_norms:n_norms + n_levels],
                   signs=payload[n_norms + n_levels:], bits=bits)


def payload_bytes(layout: Layout, bits: int) -> int:
    """Bytes of a :class:`QSGDCode` of a vector with this layout: about ``(bits + 1) / 8 + 4 / d`` per coordinate."""
    return 4 * layout.num_buckets + packed_size(layout.numel, bits) + packed_size(layout.numel, 1)


def variance_bound(bucket_size: int, bits: int) -> float:
    """``min(d/s^2, sqrt(d)/s)``: ``E||Q(v) - v||^2 <= this * ||v||^2`` (Alistarh et al., Lemma 3.1)."""
    s = num_levels(bits)
    return min(bucket_size / s**2, math.sqrt(bucket_size) / s)


def bucket_norms(v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """float32 ``||v||_2`` of every bucket of ``v`` (a zero-padded matrix: deterministic on every device)."""
    padded = torch.zeros(layout.mask.shape, dtype=torch.float32, device=v.device)
    padded.masked_scatter_(layout.mask, v.to(torch.float32))
    norms: torch.Tensor = torch.linalg.vector_norm(padded, dim=1)
    return norms


def encode(v: torch.Tensor, uniforms: torch.Tensor, layout: Layout, bits: int) -> QSGDCode:
    """Quantize the flat vector ``v`` (QSGD, Alistarh et al., Section 3.1).

    Args:
        v: the flat vector (any floating dtype; quantized in float32).
        uniforms: one draw of U[0, 1) per coordinate: coordinate ``i`` rounds up iff
            ``uniforms[i] < s|v_i|/||v|| - l``.
        layout: the segments and buckets of ``v``.
        bits: bits per level, 1..8 (``s = 2**bits - 1`` levels).
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if v.numel() != layout.numel or uniforms.numel() != layout.numel:
        raise ValueError(f"v and uniforms must have the layout's {layout.numel} coordinates, "
                         f"got {v.numel()} and {uniforms.numel()}")
    s = num_levels(bits)
    x = v.reshape(-1).to(torch.float32)
    norms = bucket_norms(x, layout)
    # A zero bucket has only zero coordinates: scale it by anything finite (its levels are 0).
    scale = layout.per_coordinate(s / torch.where(norms > 0, norms, torch.ones_like(norms)))
    scaled = x.abs().mul_(scale)
    floor = scaled.floor()
    # A non-finite bucket keeps its non-finite norm (its decode is NaN): clamp only the levels.
    levels = floor.add_(uniforms.reshape(-1) < scaled.sub_(floor)).nan_to_num_(0.0).clamp_(0, s)
    return QSGDCode(norms=norms, levels=pack_bits(levels, bits), signs=pack_bits(x < 0, 1), bits=bits)


def decode(code: QSGDCode, layout: Layout) -> torch.Tensor:
    """The float32 vector ``Q(v)`` of a :class:`QSGDCode`: ``||v|| * sign * xi / s`` per coordinate."""
    n = layout.numel
    levels = unpack_bits(code.levels, code.bits, n).to(torch.float32)
    negative = unpack_bits(code.signs, 1, n).bool()
    out = levels.mul_(layout.per_coordinate(code.norms / num_levels(code.bits)))
    return torch.where(negative, out.neg(), out)


def stream_seed(seed: int, step: int, rank: int, index: int) -> int:
    """The seed of the rounding draws of parameter ``index`` on ``rank`` at ``step``."""
    return step_seed(step_seed(step_seed(seed, step), rank), index)


def quantize(v: torch.Tensor, *, bits: int, bucket_size: int, generator: torch.Generator) -> torch.Tensor:
    """``decode(encode(v))`` of one flat vector (one segment), drawing from ``generator``."""
    layout = Layout.of([v.numel()], bucket_size, v.device)
    uniforms = torch.rand(v.numel(), generator=generator, device=v.device)
    return decode(encode(v, uniforms, layout, bits), layout)


# ---------------------------------------------------------------------------------------------
# The DDP communication hook.


class QSGDCompressor:
    """Encodes DDP gradient buckets parameter by parameter, with per-parameter draws.

    Args:
        params: the model's parameters, in ``model.parameters()`` order: a parameter's position
            there is its index in the draws' seed.
        bits: bits per level, 1..8.
        bucket_size: coordinates per QSGD bucket, >= 1.
        seed: the draws' seed, shared by every rank (each rank's stream differs by its rank).
        rank: this rank's global rank (default: the default group's).
    """

    def __init__(self, params: Iterable[torch.Tensor], *, bits: int, bucket_size: int, seed: int,
                 rank: int | None = None) -> None:
        self.index = {id(p): i for i, p in enumerate(params)}
        self.bits, self.bucket_size, self.seed = bits, bucket_size, seed
        self.rank = dist.get_rank() if rank is None else rank
        self._layouts: dict[tuple[int, ...], Layout] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def layout(self, bucket: dist.GradBucket) -> tuple[list[int], Layout]:
        """The parameter indices of a DDP bucket, in its order, and its layout (cached)."""
        params = bucket.parameters()
        indices = [self.index[id(p)] for p in params]
        key = tuple(indices)
        if key not in self._layouts:
            self._layouts[key] = Layout.of([p.numel() for p in params], self.bucket_size, bucket.buffer().device)
        return indices, self._layouts[key]

    def uniforms(self, indices: list[int], layout: Layout, step: int, device: torch.device) -> torch.Tensor:
        """The draws of ``step`` for the parameters ``indices`` (sizes ``layout.sizes``), concatenated."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        out = torch.empty(layout.numel, dtype=torch.float32, device=device)
        offset = 0
        for index, n in zip(indices, layout.sizes, strict=True):
            gen.manual_seed(stream_seed(self.seed, step, self.rank, index))
            torch.rand(n, generator=gen, dtype=torch.float32, device=device, out=out[offset:offset + n])
            offset += n
        return out


# No ``from __future__ import annotations`` in this module: DDP checks hooks' annotations at runtime.
def qsgd_hook(compressor: QSGDCompressor) -> Hook:
    """A gradient hook: QSGD codes all-gathered over ``state.group``, decoded and averaged.

    ``state.group is None`` (local gradients) sends nothing and quantizes nothing. ``comm_bytes``
    counts the code this rank hands to the all-gather (norms, levels, signs), as the all-reduce
    hook counts the bucket it hands to the all-reduce.
    """

    def hook(state: GradSyncState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if state.group is None:
            return allreduce_hook(state, bucket)
        state.begin_bucket()
        buffer = bucket.buffer()
        indices, layout = compressor.layout(bucket)
        uniforms = compressor.uniforms(indices, layout, state.step, buffer.device)
        payload = encode(buffer, uniforms, layout, compressor.bits).payload()
        size = dist.get_world_size(state.group)
        gathered = [torch.empty_like(payload) for _ in range(size)]
        state.meter.count([payload])
        state._launched.append(time.perf_counter())
        work = dist.all_gather(gathered, payload, group=state.group, async_op=True)

        def finish(fut: torch.futures.Future) -> torch.Tensor:
            state._done.append(time.perf_counter())
            fut.wait()
            # Every rank decodes the same codes in the same order: bit-identical means.
            total = decode(QSGDCode.from_payload(gathered[0], layout, compressor.bits), layout)
            for part in gathered[1:]:
                total.add_(decode(QSGDCode.from_payload(part, layout, compressor.bits), layout))
            buffer.copy_(total.div_(size))
            return buffer

        return work.get_future().then(finish)

    return hook
