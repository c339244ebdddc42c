"""Vectorised bit streams (MSB first, numpy.packbits order): fixed-width fields and unary runs.

Every reader checks that the buffer has exactly the bytes the stream needs and that padding bits are zero, so
that no two byte strings decode to the same message.
"""

from __future__ import annotations

import numpy as np

from cellm.core.codec.errors import CodecError


def nbytes(nbits: int) -> int:
    return (nbits + 7) >> 3


def pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Each value (non-negative, < 2**width) as ``width`` bits, concatenated and zero-padded to a byte."""
    count = int(values.size)
    if width == 0 or count == 0:
        return b""
    if width == 8:
        return values.astype(np.uint8).tobytes()
    v = values.astype(np.uint64, copy=False)
    bits = np.empty((count, width), dtype=np.uint8)
    for j in range(width):  # one vectorised pass per bit plane; width <= 40
        bits[:, j] = (v >> np.uint64(width - 1 - j)) & np.uint64(1)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_fixed(buf: np.ndarray, count: int, width: int, what: str) -> np.ndarray:
    """Inverse of pack_fixed: int64 values; CodecError unless ``buf`` is exactly the right, zero-padded size."""
    nbits = count * width
    if buf.size != nbytes(nbits):
        raise CodecError(
            f"{what}: {buf.size} bytes, expected {nbytes(nbits)} for {count} fields of {width} bits"
        )
    if count == 0 or width == 0:
        return np.zeros(count, dtype=np.int64)
    _check_padding(buf, nbits, what)
    if width == 8:
        return buf.astype(np.int64)
    bits = np.unpackbits(buf, count=nbits).reshape(count, width)
    out = np.zeros(count, dtype=np.int64)
    for j in range(width):
        out <<= 1
        out |= bits[:, j]
    return out


def pack_unary(q: np.ndarray) -> bytes:
    """Each q as q zero bits then a one bit (so the ones mark where each code ends)."""
    if q.size == 0:
        return b""
    ends = np.cumsum(q + 1) - 1
    bits = np.zeros(int(ends[-1]) + 1, dtype=bool)
    bits[ends] = True
    return np.packbits(bits).tobytes()


def unpack_unary(buf: np.ndarray, count: int, what: str) -> np.ndarray:
    """Inverse of pack_unary for exactly ``count`` codes filling ``buf`` to its last byte."""
    if count == 0:
        if buf.size:
            raise CodecError(f"{what}: {buf.size} bytes for zero codes")
        return np.zeros(0, dtype=np.int64)
    if buf.size == 0:
        raise CodecError(f"{what}: empty, expected {count} codes")
    ones = np.flatnonzero(np.unpackbits(buf))
    if ones.size != count:
        raise CodecError(f"{what}: {ones.size} codes, expected {count}")
    if int(ones[-1]) >> 3 != buf.size - 1:
        raise CodecError(f"{what}: {buf.size - 1 - (int(ones[-1]) >> 3)} trailing zero bytes")
    return np.diff(ones, prepend=-1) - 1


def _check_padding(buf: np.ndarray, nbits: int, what: str) -> None:
    spare = (-nbits) & 7
    if spare and int(buf[-1]) & ((1 << spare) - 1):
        raise CodecError(f"{what}: padding bits are not zero")
