"""The versioned message header: a fixed 12-byte prefix, then eight canonical LEB128 varints.

Layout (all integers little-endian)::

    offset size  field
    0      4     magic b"CLMC"
    4      1     version (1)
    5      1     position scheme: 0 dense, 1 bitmap, 2 golomb, 3 blocks (pos_param = g * 4096 + b - 1: block
                 size b in [2, 4096], g = 0 a bitmap over the ceil(n / b) blocks, else the Golomb parameter of
                 the block gaps)
    6      1     value scheme: 0 fp32, 1 fp16, 2 bf16, 3 int8, 4 int4, 5 int2 (ternary), 6 rot4, 7 rot3, 8 rot2
    7      1     flags: bit 0 = body is one zstd frame, bit 1 = int and rot scales are fp16; other bits must be 0
    8      4     CRC32 of every byte after this field (the varints and the body)
    12     var   n, k, pos_param, block_size, pos_len, scale_len, val_len, body_len   (ULEB128 each)
    ...    body  body_len bytes: positions | scales | values (pos_len + scale_len + val_len bytes), or a zstd
                 frame of exactly that, when flag bit 0 is set

Varints keep the header at ~20 bytes for typical messages (a fixed u64 layout would be ~70) and must be minimal
(no redundant 0x80 continuation bytes), so that each message has exactly one encoding.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import TypeAlias

from cellm.core.codec.errors import CodecError

Buffer: TypeAlias = bytes | bytearray | memoryview
MAGIC = b"CLMC"
VERSION = 1
FLAG_ZSTD = 1
FLAG_FP16_SCALES = 2
KNOWN_FLAGS = FLAG_ZSTD | FLAG_FP16_SCALES
HARD_MAX_N = 1 << 40  # far above any LoRA; keeps every size product well inside int64
_MAX_VARINT_BYTES = 9  # 63 bits
_FIXED = struct.Struct("<4sBBBBI")
CRC_OFFSET = 8
FIXED_SIZE = _FIXED.size


class PositionScheme(IntEnum):
    DENSE = 0
    BITMAP = 1
    GOLOMB = 2
    BLOCKS = 3  # whole blocks of b entries, named by block index (block top-k)


class ValueScheme(IntEnum):
    FP32 = 0
    FP16 = 1
    BF16 = 2
    INT8 = 3
    INT4 = 4
    INT2 = 5
    ROT4 = 6  # rotated (random signs + Walsh-Hadamard) chunks, 4-bit midrise codes
    ROT3 = 7
    ROT2 = 8


@dataclass(frozen=True)
class Header:
    """Every field the decoder needs, in wire order. Sizes are in bytes; pos_len etc. are uncompressed."""

    positions: int
    values: int
    flags: int
    n: int
    k: int
    pos_param: int
    block_size: int
    pos_len: int
    scale_len: int
    val_len: int
    body_len: int

    @property
    def raw_len(self) -> int:
        """Body size before zstd: what a bounded decompression must produce, exactly."""
        return self.pos_len + self.scale_len + self.val_len


_VARINT_FIELDS = tuple(f.name for f in fields(Header))[3:]


def write_varint(x: int) -> bytes:
    if x < 0 or x >= 1 << (7 * _MAX_VARINT_BYTES):
        raise ValueError(f"varint out of range: {x}")
    out = bytearray()
    while True:
        byte = x & 0x7F
        x >>= 7
        if x:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: memoryview, pos: int, name: str) -> tuple[int, int]:
    """Value and the offset after it; CodecError when truncated, overlong or non-minimal."""
    x = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise CodecError(f"header truncated inside field {name!r}")
        byte = data[pos + i]
        x |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise CodecError(f"header field {name!r} is not minimally encoded")
            return x, pos + i + 1
    raise CodecError(f"header field {name!r} is longer than {_MAX_VARINT_BYTES} bytes")


def pack(header: Header, body: Buffer | Sequence[Buffer]) -> bytes:
    """Header bytes followed by the body, with the CRC32 over everything after the CRC field.

    ``body`` may be a list of byte buffers (e.g. memoryviews of numpy arrays): they are copied exactly once,
    into the returned message.
    """
    parts = [body] if isinstance(body, bytes | bytearray | memoryview) else list(body)
    tail = b"".join(write_varint(getattr(header, name)) for name in _VARINT_FIELDS)
    crc = zlib.crc32(tail)
    for part in parts:
        crc = zlib.crc32(part, crc)
    fixed = _FIXED.pack(MAGIC, VERSION, header.positions, header.values, header.flags, crc)
    return b"".join((fixed, tail, *parts))


def unpack(data: memoryview) -> tuple[Header, int, int]:
    """(header, offset of the body, stored CRC). Checks only framing; the pipeline checks meaning and limits."""
    if len(data) < FIXED_SIZE:
        raise CodecError(f"message of {len(data)} bytes is shorter than the {FIXED_SIZE}-byte fixed header")
    magic, version, positions, values, flags, crc = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported version {version}, this decoder reads version {VERSION}")
    pos = FIXED_SIZE
    vals = {}
    for name in _VARINT_FIELDS:
        vals[name], pos = read_varint(data, pos, name)
    return Header(positions, values, flags, **vals), pos, crc
