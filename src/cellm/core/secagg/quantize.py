"""Ring quantization: floats clipped to a public bound become signed integers in Z_{2^R}, packed in R bits.

Masks only cancel in a finite ring, so every client maps its values onto the same integer grid before masking:
``q = round(clip(x, -c, c) / step)`` with ``step = c / L`` and ``L = 2^(B-1) - 1`` levels on each side of zero
(``B = value_bits``, sign included). The grid is symmetric, so zero is exact and ``-q`` is on the grid.

The ring has ``R = B + ceil(log2(max_clients)) + margin_bits`` bits. Why that is enough with ``margin_bits = 0``:
each ``|q| <= L < 2^(B-1)``, so the sum of ``m <= max_clients <= 2^ceil(log2 max_clients)`` of them has
``|sum| <= m L < 2^(R-1)``, which the two's-complement reading of ``R`` bits represents without wrapping.
``margin_bits`` is there for a runtime that wants slack (e.g. to add discrete noise later); it costs one bit a
value each.

Rounding: stochastic when a ``numpy.random.Generator`` is given (what a runtime should use, seeded from the run
seed, the round and the client), round-to-nearest otherwise. Stochastic rounding is unbiased,
``E[q step] = clip(x)``, so the errors of a round's clients average out in the sum (they grow like sqrt(m) step,
not m step / 2 with a consistent sign); its error on one value is below ``step`` rather than ``step / 2``.
Error feedback, if the client keeps it, should take ``dequantize(q)`` as what was sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellm.core.secagg.errors import SecAggError

MAX_CLIENTS = 1 << 16
"""Most clients one round may have: bounds every count a parser accepts (and keeps R <= 64)."""

_BLOCK = 1 << 16  # values packed per pass: a multiple of 8, so each block ends on a byte boundary


@dataclass(frozen=True)
class QuantSpec:
    """What every client and the server agree on before a round: the clip bound and the grid's bits."""

    clip: float
    """Public bound c: values are clipped to [-c, c] before quantization (the server cannot check it later)."""
    value_bits: int
    """Bits of one quantized value, sign included: 2 <= B <= 32."""
    max_clients: int
    """Most clients whose vectors may be summed; sets the ring's headroom ceil(log2 max_clients)."""
    margin_bits: int = 0
    """Extra headroom bits; 0 is provably enough for the sum (see the module docstring)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"QuantSpec.clip must be a finite number > 0, got {self.clip!r}")
        if not (isinstance(self.value_bits, int) and 2 <= self.value_bits <= 32):
            raise ValueError(f"QuantSpec.value_bits must be an integer in [2, 32], got {self.value_bits!r}")
        if not (isinstance(self.max_clients, int) and 1 <= self.max_clients <= MAX_CLIENTS):
            raise ValueError(f"QuantSpec.max_clients must be in [1, {MAX_CLIENTS}], got {self.max_clients!r}")
        if not (isinstance(self.margin_bits, int) and 0 <= self.margin_bits <= 8):
            raise ValueError(f"QuantSpec.margin_bits must be in [0, 8], got {self.margin_bits!r}")

    @property
    def levels(self) -> int:
        """L: the largest |q|."""
        return (1 << (self.value_bits - 1)) - 1

    @property
    def step(self) -> float:
        """The grid's spacing c / L."""
        return float(self.clip) / self.levels

    @property
    def ring_bits(self) -> int:
        """R: bits of one ring element, and of one masked value on the wire."""
        return self.value_bits + (self.max_clients - 1).bit_length() + self.margin_bits

    def max_abs_error(self, stochastic: bool) -> float:
        """Largest |dequantize(q) - clip(x)| for one value (the sum of m values: m times it)."""
        return self.step if stochastic else self.step / 2


def ring_mask(ring_bits: int) -> np.uint64:
    """2^R - 1 as a uint64, for reducing uint64 arithmetic (which wraps mod 2^64) mod 2^R."""
    return np.uint64((1 << ring_bits) - 1)


def quantize(values: np.ndarray, spec: QuantSpec, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clip to [-c, c] and map onto the signed grid as ring elements (uint64 in [0, 2^R)).

    ``rng`` given: stochastic rounding (unbiased); None: round to nearest (deterministic). NaN is refused,
    +-inf clip to +-c.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"quantize: expected a 1-d vector, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError(f"quantize: {int(np.isnan(x).sum())} values are NaN")
    scaled = np.clip(x, -spec.clip, spec.clip) / spec.step
    if rng is None:
        q = np.rint(scaled)
    else:
        low = np.floor(scaled)
        q = low + (rng.random(x.shape[0]) < (scaled - low))
    levels = spec.levels
    q = np.clip(q, -levels, levels).astype(np.int64)  # float rounding at +-c may overshoot by one ulp
    return q.astype(np.uint64) & ring_mask(spec.ring_bits)  # two's complement, reduced mod 2^R


def to_signed(ring: np.ndarray, ring_bits: int) -> np.ndarray:
    """Read ring elements as two's-complement integers of R bits (int64)."""
    r = np.asarray(ring, dtype=np.uint64)
    shift = np.uint64(64 - ring_bits)
    return (r << shift).view(np.int64) >> np.int64(64 - ring_bits)


def dequantize(ring: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """One client's ring vector back to floats (what it actually contributes; for error feedback)."""
    return to_signed(ring, spec.ring_bits).astype(np.float64) * spec.step


def dequantize_sum(sum_ring: np.ndarray, num_clients: int, spec: QuantSpec) -> np.ndarray:
    """The float sum of ``num_clients`` quantized vectors from their sum in the ring.

    Equals the sum of each client's ``dequantize`` (exactly in integers: the ring sum cannot wrap, and the
    integer sum times ``step`` is one float rounding). Refuses a sum no ``num_clients`` vectors can make, which
    means a wrapped ring, a corrupt sum, or the wrong count.
    """
    if not (isinstance(num_clients, int) and 1 <= num_clients <= spec.max_clients):
        raise SecAggError(f"dequantize_sum: num_clients must be in [1, {spec.max_clients}], got {num_clients!r}")
    signed = to_signed(sum_ring, spec.ring_bits)
    bound = num_clients * spec.levels
    if signed.size and int(np.abs(signed).max()) > bound:
        raise SecAggError(
            f"dequantize_sum: a value of {int(np.abs(signed).max())} grid steps exceeds the {bound} that "
            f"{num_clients} clients can reach: the sum is corrupt or counts the wrong clients"
        )
    return signed.astype(np.float64) * spec.step


def packed_size(count: int, ring_bits: int) -> int:
    """Bytes of ``count`` values at ``ring_bits`` bits each: ceil(count R / 8)."""
    return (count * ring_bits + 7) >> 3


def pack_ring(values: np.ndarray, ring_bits: int) -> bytes:
    """Each value (uint64 < 2^R) as exactly R bits, most significant first, zero-padded to a byte."""
    v = np.ascontiguousarray(values, dtype=np.uint64)
    parts = []
    for start in range(0, v.shape[0], _BLOCK):
        block = v[start:start + _BLOCK].astype(">u8")
        bits = np.unpackbits(block.view(np.uint8).reshape(-1, 8), axis=1)[:, 64 - ring_bits:]
        parts.append(np.packbits(bits.reshape(-1)).tobytes())
    return b"".join(parts)


def unpack_ring(buf: bytes, count: int, ring_bits: int, what: str = "ring values") -> np.ndarray:
    """Inverse of pack_ring; SecAggError unless ``buf`` is exactly ceil(count R / 8) bytes with zero padding."""
    need = packed_size(count, ring_bits)
    if len(buf) != need:
        raise SecAggError(f"{what}: {len(buf)} bytes, expected {need} for {count} values of {ring_bits} bits")
    raw = np.frombuffer(buf, dtype=np.uint8)
    pad = need * 8 - count * ring_bits
    if pad and int(raw[-1]) & ((1 << pad) - 1):
        raise SecAggError(f"{what}: padding bits after the last value are not zero")
    out = np.empty(count, dtype=np.uint64)
    block_bytes = _BLOCK * ring_bits // 8
    for b, start in enumerate(range(0, count, _BLOCK)):
        n = min(_BLOCK, count - start)
        chunk = raw[b * block_bytes:b * block_bytes + packed_size(n, ring_bits)]
        bits = np.unpackbits(chunk, count=n * ring_bits).reshape(n, ring_bits)
        full = np.zeros((n, 64), dtype=np.uint8)
        full[:, 64 - ring_bits:] = bits
        out[start:start + n] = np.packbits(full, axis=1).view(">u8").reshape(-1)
    return out
