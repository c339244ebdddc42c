"""Value stages: the k kept values (in position order) at a chosen precision.

Error bounds, per entry, of what the receiver decodes (v') against what was sent (v):

* fp32 -- exact.
* fp16 -- round to nearest even: |v - v'| <= max(|v| * 2**-11, 2**-25). Values whose magnitude would round past
  the fp16 maximum (65504) raise ValueError at encode: silently sending inf or a clamped value would corrupt
  the model without anyone noticing. Use bf16 or fp32 for such vectors.
* bf16 -- round to nearest even of the top 16 bits: |v - v'| <= max(|v| * 2**-8, 2**-134). Only values within
  half a bf16 step of the float32 maximum overflow; they raise ValueError at encode.
* int8 -- per block of ``block_size`` consecutive kept values, scale s = max|v| / 127 (stored as fp32 or fp16,
  rounded up so that no value is clipped and tiny scales do not flush to 0), q = round(v / s) in [-127, 127],
  v' = q * s. So |v - v'| <= s / 2, up to one float32 rounding of the product q * s (relative 2**-24), with s
  the transmitted scale. With fp16 scales a block whose s would overflow fp16 raises ValueError; tiny scales
  round up to the smallest fp16 subnormal (coarser, but the bound holds with the stored s).
* int4 -- as int8 with s = max|v| / 7 and q in [-7, 7], two values a byte: |v - v'| <= s / 2.
* int2 -- ternary, s = max|v| and q in {-1, 0, 1}, four values a byte: |v - v'| <= s / 2, so every value
  below half its block's maximum is sent as 0 (use it with error feedback, or for downloads, which are re-made
  from exact weights every round).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from cellm.core.codec.errors import CodecError
from cellm.core.codec.header import Buffer, ValueScheme

_F32_MAX = float(np.finfo(np.float32).max)


def as_buffer(a: np.ndarray) -> memoryview:
    """The array's bytes without a copy (the message is assembled with a single copy, in header.pack)."""
    return memoryview(np.ascontiguousarray(a)).cast("B")


class ValueStage(ABC):
    """Encode float32 values to (scales, values) byte sections and back. ``needs`` names header fields read."""

    scheme: ClassVar[ValueScheme]
    needs: ClassVar[frozenset[str]] = frozenset({"k"})

    @abstractmethod
    def section_lens(self, k: int) -> tuple[int, int]:
        """Exact (scale_len, val_len) for k values; the decoder checks the header against it."""

    @abstractmethod
    def encode(self, v: np.ndarray) -> tuple[Buffer, Buffer]:
        """(scales, values) as byte buffers; ValueError if a value cannot be represented. v is finite float32."""

    @abstractmethod
    def decode(self, scales: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
        """Fresh, writable float32 array; finiteness is checked by the pipeline."""


class Fp32Values(ValueStage):
    scheme = ValueScheme.FP32

    def section_lens(self, k: int) -> tuple[int, int]:
        return 0, 4 * k

    def encode(self, v: np.ndarray) -> tuple[Buffer, Buffer]:
        return b"", as_buffer(v.astype("<f4", copy=False))

    def decode(self, scales: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
        return vals.view("<f4").astype(np.float32)


class Fp16Values(ValueStage):
    scheme = ValueScheme.FP16

    def section_lens(self, k: int) -> tuple[int, int]:
        return 0, 2 * k

    def encode(self, v: np.ndarray) -> tuple[Buffer, Buffer]:
        with np.errstate(over="ignore"):
            h = v.astype("<f2")
        bad = np.isinf(h)
        if bad.any():
            raise ValueError(
                f"fp16 values overflow: {int(bad.sum())} values have magnitude above 65504 "
                f"(max |v| = {float(np.abs(v).max()):.6g}); use values='bf16' or 'fp32'"
            )
        return b"", as_buffer(h)

    def decode(self, scales: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
        return vals.view("<f2").astype(np.float32)


class Bf16Values(ValueStage):
    scheme = ValueScheme.BF16

    def section_lens(self, k: int) -> tuple[int, int]:
        return 0, 2 * k

    def encode(self, v: np.ndarray) -> tuple[Buffer, Buffer]:
        u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
        top = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")
        bad = (top & np.uint16(0x7FFF)) == np.uint16(0x7F80)
        if bad.any():
            raise ValueError(f"bf16 values overflow: {int(bad.sum())} values round past the float32 maximum")
        return b"", as_buffer(top)

    def decode(self, scales: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
        return (vals.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


class Int8Values(ValueStage):
    """Block absmax scale, one signed byte per value in [-L, L] (L = 127 here; see :class:`PackedIntValues`)."""

    scheme = ValueScheme.INT8
    needs = frozenset({"k", "block_size", "fp16_scales"})
    levels: ClassVar[int] = 127
    name: ClassVar[str] = "int8"

    def __init__(self, block_size: int, fp16_scales: bool = False) -> None:
        self.block_size = block_size
        self.fp16_scales = fp16_scales
        self._scale_dtype = "<f2" if fp16_scales else "<f4"

    def section_lens(self, k: int) -> tuple[int, int]:
        blocks = -(-k // self.block_size)
        return blocks * (2 if self.fp16_scales else 4), self.value_len(k)

    def value_len(self, k: int) -> int:
        return k

    def scales_for(self, v: np.ndarray) -> np.ndarray:
        """Per-block transmitted scale (float64 copy of the stored fp32/fp16 value)."""
        if v.size == 0:
            return np.zeros(0, dtype=np.float64)
        L = float(self.levels)
        starts = np.arange(0, v.size, self.block_size)
        s = np.maximum.reduceat(np.abs(v), starts).astype(np.float64) / L
        if self.fp16_scales:
            with np.errstate(over="ignore"):
                h = s.astype(np.float16)
            low = h.astype(np.float64) < s  # round up: a scale below absmax / L would clip the block's max
            h[low] = np.nextafter(h[low], np.float16(np.inf))
            if np.isinf(h).any():
                raise ValueError(
                    f"{self.name} block scale overflows fp16 (block max |v| > 65504 * {self.levels}); "
                    "use scales='fp32'"
                )
            return h.astype(np.float64)
        f = s.astype(np.float32)
        low = f.astype(np.float64) < s  # round up, as above; this also keeps tiny scales from flushing to 0
        f[low] = np.nextafter(f[low], np.float32(np.inf))
        hot = np.float32(L) * f.astype(np.float64) > _F32_MAX  # L * s must stay finite in float32
        f[hot] = np.nextafter(f[hot], np.float32(0))
        return f.astype(np.float64)

    def quantize(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scales, integer codes q in [-L, L] as int8)."""
        s = self.scales_for(v)
        per = _per_entry(s, self.block_size, v.size)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(per > 0, np.rint(v.astype(np.float64) / per), 0.0)
        return s, np.clip(q, -self.levels, self.levels).astype(np.int8)

    def pack(self, q: np.ndarray) -> Buffer:
        return as_buffer(q)

    def unpack(self, vals: np.ndarray, k: int) -> np.ndarray:
        q = vals.view(np.int8)
        if (q == -128).any():
            raise CodecError("int8 values must be in [-127, 127]")
        return q

    def encode(self, v: np.ndarray) -> tuple[Buffer, Buffer]:
        s, q = self.quantize(v)
        return as_buffer(s.astype(self._scale_dtype)), self.pack(q)

    def decode(self, scales: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
        s = scales.view(self._scale_dtype).astype(np.float64)
        if not np.isfinite(s).all() or (s < 0).any():
            raise CodecError(f"{self.name} scales must be finite and non-negative")
        q = self.unpack(vals, k)
        with np.errstate(over="ignore"):
            return (q * _per_entry(s, self.block_size, k)).astype(np.float32)


class PackedIntValues(Int8Values):
    """Below a byte a value: code u = q + L in ``bits`` bits, 8 / bits codes a byte, the first in the low bits.

    Codes above 2L and nonzero padding bits after the last value are refused, so each message has one encoding.
    """

    bits: ClassVar[int]

    def value_len(self, k: int) -> int:
        return -(-k * self.bits // 8)

    def pack(self, q: np.ndarray) -> Buffer:
        per = 8 // self.bits
        u = (q.astype(np.int16) + self.levels).astype(np.uint8)
        u = np.concatenate([u, np.zeros((-u.size) % per, dtype=np.uint8)]).reshape(-1, per)
        shifts = (np.arange(per, dtype=np.uint8) * self.bits).astype(np.uint8)
        return as_buffer(np.bitwise_or.reduce(u << shifts, axis=1).astype(np.uint8))

    def unpack(self, vals: np.ndarray, k: int) -> np.ndarray:
        per = 8 // self.bits
        b = vals.view(np.uint8)
        shifts = (np.arange(per, dtype=np.uint8) * self.bits).astype(np.uint8)
        u = ((b[:, None] >> shifts) & np.uint8((1 << self.bits) - 1)).reshape(-1)
        if (u[k:] != 0).any():
            raise CodecError(f"{self.name} padding bits after the last value must be zero")
        u = u[:k]
        if (u > 2 * self.levels).any():
            raise CodecError(f"{self.name} codes must be in [0, {2 * self.levels}]")
        return u.astype(np.int8) - np.int8(self.levels)


class Int4Values(PackedIntValues):
    """Block absmax scale s = max|v| / 7, q in [-7, 7]: |v - v'| <= s / 2. Two values a byte."""

    scheme = ValueScheme.INT4
    levels = 7
    bits = 4
    name = "int4"


class Int2Values(PackedIntValues):
    """Ternary: block absmax scale s = max|v|, q in {-1, 0, 1}: |v - v'| <= s / 2. Four values a byte."""

    scheme = ValueScheme.INT2
    levels = 1
    bits = 2
    name = "int2"


def _per_entry(scales: np.ndarray, block_size: int, k: int) -> np.ndarray:
    """Each entry's block scale; memory O(k) whatever the block size (one block is a broadcast scalar)."""
    if scales.size <= 1:
        return np.broadcast_to(scales, (k,)) if k else np.zeros(0)
    return np.repeat(scales, block_size)[:k]  # several blocks: block_size < k, so this is < 2k entries


def value_stage(scheme: int, block_size: int, fp16_scales: bool) -> ValueStage:
    """The stage for a header's value scheme; CodecError for an unknown one."""
    if scheme == ValueScheme.FP32:
        return Fp32Values()
    if scheme == ValueScheme.FP16:
        return Fp16Values()
    if scheme == ValueScheme.BF16:
        return Bf16Values()
    if scheme == ValueScheme.INT8:
        return Int8Values(block_size, fp16_scales)
    if scheme == ValueScheme.INT4:
        return Int4Values(block_size, fp16_scales)
    if scheme == ValueScheme.INT2:
        return Int2Values(block_size, fp16_scales)
    raise CodecError(f"unknown value scheme {scheme}")


def stage_for_spec(values: str, block_size: int, fp16_scales: bool) -> ValueStage:
    scheme = {
        "fp32": ValueScheme.FP32,
        "fp16": ValueScheme.FP16,
        "bf16": ValueScheme.BF16,
        "int8": ValueScheme.INT8,
        "int4": ValueScheme.INT4,
        "int2": ValueScheme.INT2,
    }
    return value_stage(scheme[values], block_size, fp16_scales)
