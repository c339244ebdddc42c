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
* rot4, rot3, rot2 -- rotated codes, DRIVE/EDEN-style. The k values are cut into chunks of power-of-two sizes
  m <= ``block_size`` (which must be a power of two): k // block_size full blocks, then one chunk per binary digit
  of the remainder, largest first, so there is no padding. Each chunk x is rotated, y = H_m D x / sqrt(m) (H_m the
  Sylvester Hadamard matrix, D a diagonal of random signs drawn from a 32-bit seed that the message carries; the
  encoder takes the CRC32 of the values as the seed, so encoding stays a pure function of its input), and each
  y_i is sent as a midrise code u in [0, 2**b - 1] (b = 4, 3, 2 bits) standing for (u - c) * s, c = (2**b - 1) / 2,
  with one scale per chunk s = max|y| / c (stored as fp32 or fp16, rounded up as for int8). So |y_i - y'_i| <= s / 2
  and, the rotation being orthonormal, ||x - x'||_2 <= sqrt(m) * s / 2 per chunk, up to one float32 rounding of
  each decoded value. The rotation spreads a chunk's energy over all its entries, so s follows the chunk's L2 norm
  (about ||x||_2 * sqrt(2 ln(2m) / m) / c) rather than its largest entry; the error is spread evenly too, and exact
  zeros come back as small values unless the whole chunk is zero. A chunk whose decoded values could pass the
  float32 maximum (values within a factor ~sqrt(m) of it) raises ValueError at encode.
"""

from __future__ import annotations

import math
import zlib
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


class RotatedValues(ValueStage):
    """Chunks of power-of-two sizes, each randomly rotated and sent as ``bits``-bit midrise codes with one scale.

    Scales section: the 4-byte sign seed (little-endian), then one fp32 or fp16 scale per chunk in chunk order;
    none of it for k = 0. Values section: the codes, ``bits`` each, the first in the low bits, across bytes.
    """

    needs = frozenset({"k", "block_size", "fp16_scales"})
    bits: ClassVar[int]
    name: ClassVar[str]

    def __init__(self, block_size: int, fp16_scales: bool = False) -> None:
        if block_size < 1 or block_size & (block_size - 1):  # a header's field: CodecSpec refuses it at encode
            raise CodecError(f"{self.name} block size {block_size} is not a power of two")
        self.block_size = block_size
        self.fp16_scales = fp16_scales
        self._scale_dtype = "<f2" if fp16_scales else "<f4"
        self._half = ((1 << self.bits) - 1) / 2  # code u stands for (u - half) * s

    def section_lens(self, k: int) -> tuple[int, int]:
        if k == 0:
            return 0, 0
        return SEED_BYTES + chunk_count(k, self.block_size) * (2 if self.fp16_scales else 4), -(-k * self.bits // 8)

    def encode(self, v: np.ndarray) -> tuple[Buffer, Buffer]:
        k = v.size
        if k == 0:
            return b"", b""
        seed = zlib.crc32(as_buffer(v.astype("<f4", copy=False)))  # a pure function of the message
        y = rotate(v.astype(np.float64), sign_flips(seed, k), self.block_size)
        sizes = chunk_sizes(k, self.block_size)
        s = self._stored_scales(_chunk_absmax(y, self.block_size) / self._half)
        worst = _chunk_absmax(v.astype(np.float64), self.block_size) + np.sqrt(sizes) * s / 2
        if (worst > _F32_MAX * (1 - 2.0**-20)).any():  # then a decoded value could round past float32's maximum
            raise ValueError(
                f"{self.name} values too large: a chunk could decode past the float32 maximum "
                f"(max |v| = {float(np.abs(v).max()):.6g}); use int8 or fp32"
            )
        per = np.repeat(s, sizes)
        t = np.divide(y, per, out=np.zeros_like(y), where=per > 0) + self._half
        u = np.clip(np.floor(t + 0.5), 0, 2 * self._half).astype(np.uint8)  # ties round up; all-zero chunk: half
        scales = seed.to_bytes(SEED_BYTES, "little") + s.astype(self._scale_dtype).tobytes()
        return scales, pack_codes(u, self.bits)

    def decode(self, scales: np.ndarray, vals: np.ndarray, k: int) -> np.ndarray:
        if k == 0:
            return np.zeros(0, dtype=np.float32)
        seed = int.from_bytes(scales[:SEED_BYTES].tobytes(), "little")
        s = scales[SEED_BYTES:].view(self._scale_dtype).astype(np.float64)
        if not np.isfinite(s).all() or np.signbit(s).any():
            raise CodecError(f"{self.name} scales must be finite and non-negative")
        u = unpack_codes(vals, k, self.bits, self.name)
        per = np.repeat(s, chunk_sizes(k, self.block_size))
        if ((per == 0) & (u != 1 << (self.bits - 1))).any():  # one encoding per message: what encode writes
            raise CodecError(f"{self.name} codes of a chunk with scale 0 must all be {1 << (self.bits - 1)}")
        x = unrotate((u - self._half) * per, sign_flips(seed, k), self.block_size)
        with np.errstate(over="ignore"):
            return x.astype(np.float32)

    def _stored_scales(self, s: np.ndarray) -> np.ndarray:
        """The transmitted scales (float64 copies), rounded up so that no code is clipped and none flushes to 0."""
        dtype = np.float16 if self.fp16_scales else np.float32
        with np.errstate(over="ignore"):  # an overflow to inf is refused just below
            f = s.astype(dtype)
            low = f.astype(np.float64) < s
            f[low] = np.nextafter(f[low], dtype(np.inf))
        if np.isinf(f).any():
            raise ValueError(
                f"{self.name} chunk scale overflows {'fp16' if self.fp16_scales else 'fp32'} "
                f"(largest rotated value {float(s.max()) * self._half:.6g}); "
                + ("use scales='fp32'" if self.fp16_scales else "use fp32 values")
            )
        return f.astype(np.float64)


class Rot4Values(RotatedValues):
    scheme = ValueScheme.ROT4
    bits = 4
    name = "rot4"


class Rot3Values(RotatedValues):
    scheme = ValueScheme.ROT3
    bits = 3
    name = "rot3"


class Rot2Values(RotatedValues):
    scheme = ValueScheme.ROT2
    bits = 2
    name = "rot2"


SEED_BYTES = 4


def chunk_layout(k: int, block_size: int) -> list[tuple[int, int, int]]:
    """(start, size m, count) of each run of equal chunks, in order: k // block_size full blocks, then one chunk
    per binary digit of the remainder, largest first (k = 1000, block 256: 3 x 256, then 128, 64, 32, 8)."""
    full, rem = divmod(k, block_size)
    runs = [(0, block_size, full)] if full else []
    start = full * block_size
    for i in reversed(range(rem.bit_length())):
        if rem >> i & 1:
            runs.append((start, 1 << i, 1))
            start += 1 << i
    return runs


def chunk_count(k: int, block_size: int) -> int:
    """Number of chunks, without building them (section_lens runs on declared, unchecked sizes)."""
    return k // block_size + (k % block_size).bit_count()


def chunk_sizes(k: int, block_size: int) -> np.ndarray:
    """Each chunk's size, in order (int64)."""
    runs = chunk_layout(k, block_size)
    return np.concatenate([np.full(count, m, dtype=np.int64) for _, m, count in runs] or [np.zeros(0, np.int64)])


def sign_flips(seed: int, k: int) -> np.ndarray:
    """The diagonal D: k signs (+1.0 / -1.0) from the bits of PCG64(seed)'s raw stream, low bit first.

    The raw output of numpy's bit generators is kept fixed across numpy versions (Generator's methods are not), so
    a sender and a receiver on different numpy versions draw the same signs.
    """
    raw = np.random.PCG64(seed).random_raw(-(-k // 64)).astype("<u8")
    return 1.0 - 2.0 * np.unpackbits(raw.view(np.uint8), count=k, bitorder="little")


def hadamard(a: np.ndarray) -> np.ndarray:
    """H_m times each row of ``a`` (rows x m, m a power of two; Sylvester order, not normalised), in float64.

    The fast Walsh-Hadamard transform: log2(m) butterfly steps, each over every row at once.
    """
    out = np.array(a, dtype=np.float64)
    rows, m = out.shape
    h = 1
    while h < m:
        v = out.reshape(rows, m // (2 * h), 2, h)
        lo, hi = v[:, :, 0, :], v[:, :, 1, :]
        total, diff = lo + hi, lo - hi
        v[:, :, 0, :], v[:, :, 1, :] = total, diff
        h *= 2
    return out


def rotate(x: np.ndarray, signs: np.ndarray, block_size: int) -> np.ndarray:
    """y = H_m D x / sqrt(m) for each chunk x (float64): orthonormal, so ||y|| = ||x|| chunk by chunk."""
    return _per_run(x * signs, block_size)


def unrotate(y: np.ndarray, signs: np.ndarray, block_size: int) -> np.ndarray:
    """The inverse of :func:`rotate`: x = D H_m y / sqrt(m) (H_m H_m = m I, D D = I)."""
    return _per_run(y, block_size) * signs


def _per_run(x: np.ndarray, block_size: int) -> np.ndarray:
    out = np.empty(x.size, dtype=np.float64)
    for start, m, count in chunk_layout(x.size, block_size):
        end = start + m * count
        out[start:end] = (hadamard(x[start:end].reshape(count, m)) / math.sqrt(m)).reshape(-1)
    return out


def _chunk_absmax(x: np.ndarray, block_size: int) -> np.ndarray:
    parts = [np.abs(x[a : a + m * c]).reshape(c, m).max(axis=1) for a, m, c in chunk_layout(x.size, block_size)]
    return np.concatenate(parts) if parts else np.zeros(0)


def pack_codes(u: np.ndarray, bits: int) -> Buffer:
    """Codes (< 2**bits) as ``bits``-bit fields, the first in the low bits of byte 0, fields crossing bytes."""
    planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return as_buffer(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(vals: np.ndarray, k: int, bits: int, name: str) -> np.ndarray:
    """Inverse of :func:`pack_codes` (uint8 codes); CodecError for nonzero padding bits after the last code."""
    stream = np.unpackbits(vals.view(np.uint8), bitorder="little")
    if stream[k * bits :].any():
        raise CodecError(f"{name} padding bits after the last value must be zero")
    planes = stream[: k * bits].reshape(k, bits)
    return np.bitwise_or.reduce(planes << np.arange(bits, dtype=np.uint8), axis=1)


def _per_entry(scales: np.ndarray, block_size: int, k: int) -> np.ndarray:
    """Each entry's block scale; memory O(k) whatever the block size (one block is a broadcast scalar)."""
    if scales.size <= 1:
        return np.broadcast_to(scales, (k,)) if k else np.zeros(0)
    return np.repeat(scales, block_size)[:k]  # several blocks: block_size < k, so this is < 2k entries


_PLAIN: dict[int, type[ValueStage]] = {ValueScheme.FP32: Fp32Values, ValueScheme.FP16: Fp16Values,
                                       ValueScheme.BF16: Bf16Values}
_SCALED: dict[int, type[Int8Values] | type[RotatedValues]] = {
    ValueScheme.INT8: Int8Values, ValueScheme.INT4: Int4Values, ValueScheme.INT2: Int2Values,
    ValueScheme.ROT4: Rot4Values, ValueScheme.ROT3: Rot3Values, ValueScheme.ROT2: Rot2Values}


def value_stage(scheme: int, block_size: int, fp16_scales: bool) -> ValueStage:
    """The stage for a header's value scheme; CodecError for an unknown one."""
    if scheme in _PLAIN:
        return _PLAIN[scheme]()
    if scheme in _SCALED:
        return _SCALED[scheme](block_size, fp16_scales)
    raise CodecError(f"unknown value scheme {scheme}")


def stage_for_spec(values: str, block_size: int, fp16_scales: bool) -> ValueStage:
    scheme = {
        "fp32": ValueScheme.FP32,
        "fp16": ValueScheme.FP16,
        "bf16": ValueScheme.BF16,
        "int8": ValueScheme.INT8,
        "int4": ValueScheme.INT4,
        "int2": ValueScheme.INT2,
        "rot4": ValueScheme.ROT4,
        "rot3": ValueScheme.ROT3,
        "rot2": ValueScheme.ROT2,
    }
    return value_stage(scheme[values], block_size, fp16_scales)
