"""Seeded mutations of valid messages, shared by the fuzz test and bench/fuzz_codec.py.

Pure functions (no I/O). Many mutations "reseal" the message (recompute the CRC) so that the checks behind the
checksum -- sizes, stage decoders, value finiteness -- are what must catch them, not the CRC.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import zstandard

from cellm.core.codec import header as hdr
from cellm.core.codec.errors import CodecError, CodecInternalError
from cellm.core.codec.pipeline import decode, encode
from cellm.core.codec.spec import ROTATED_VALUES, VALUE_CHOICES, CodecSpec
from cellm.core.sparse import SparseVector

_HUGE = (1 << 62, 1 << 40, (1 << 40) + 1, 1 << 32, (1 << 63) - 1)


def reseal(data: bytes) -> bytes:
    """``data`` with its CRC32 field recomputed, so only the deeper checks can reject it."""
    if len(data) < hdr.FIXED_SIZE:
        return data
    crc = zlib.crc32(data[hdr.CRC_OFFSET + 4 :])
    return data[: hdr.CRC_OFFSET] + crc.to_bytes(4, "little") + data[hdr.CRC_OFFSET + 4 :]


def craft(header: hdr.Header, body: bytes) -> bytes:
    """A message with any header fields (valid or not) and a correct CRC."""
    return hdr.pack(header, body)


def split(data: bytes) -> tuple[hdr.Header, bytes]:
    h, off, _ = hdr.unpack(memoryview(data))
    return h, data[off:]


def random_vector(rng: np.random.Generator, max_n: int = 4000) -> SparseVector:
    """Small vectors of every shape the codec distinguishes: empty, dense, sparse, clustered; odd magnitudes."""
    n = int(rng.choice([0, 1, 2, 7, 8, 9, int(rng.integers(1, max_n + 1))]))
    kind = int(rng.integers(0, 4))
    if kind == 0:
        k = n
    elif kind == 1:
        k = 0
    else:
        k = int(rng.integers(0, n + 1)) if kind == 2 else max(0, n // int(rng.choice([2, 8, 64, 512])))
    idx = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)
    scale = float(rng.choice([1e-30, 1e-3, 1.0, 1e3, 6e4]))
    vals = (rng.standard_normal(k) * scale).astype(np.float32)
    if k and rng.random() < 0.2:
        vals[rng.random(k) < 0.5] = 0.0
    return SparseVector(n, torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(vals))


def random_spec(rng: np.random.Generator, values: str | None = None) -> CodecSpec:
    """Any value scheme (or ``values``); the rotated ones get power-of-two blocks, which they require."""
    values = values or str(rng.choice(VALUE_CHOICES))
    blocks = [1, 4, 64, 256, 1 << 20] if values in ROTATED_VALUES else [1, 3, 64, 256, 1 << 20]
    return CodecSpec(
        values=values,
        positions=str(rng.choice(["auto", "bitmap", "gaps"])),
        block_size=int(rng.choice(blocks)),
        zstd_level=int(rng.choice([0, 0, 1, 3])),
        scales=str(rng.choice(["fp32", "fp16"])),
    )


def valid_message(rng: np.random.Generator, values: str | None = None) -> tuple[bytes, int]:
    """(message, its n)."""
    while True:
        vec = random_vector(rng)
        spec = random_spec(rng, values)
        if rng.random() < 0.25:  # block top-k: whole blocks of the grid, named by block index
            spec = replace(spec, pos_block=int(rng.choice([2, 3, 8, 16, 64, 4096])))
            vec = block_aligned(rng, vec, spec.pos_block)
        try:
            return encode(vec, spec), vec.n
        except ValueError:  # e.g. fp16 overflow of a 6e4-scale vector: pick another
            continue


def block_aligned(rng: np.random.Generator, vec: SparseVector, block: int) -> SparseVector:
    """Every entry of each block of ``block`` entries that ``vec`` touches (a block top-k's kept set)."""
    ids = np.unique(vec.indices.numpy() // block)
    idx = (ids[:, None] * block + np.arange(block)).reshape(-1)
    idx = idx[idx < vec.n].astype(np.int64)
    vals = (rng.standard_normal(idx.size) * float(rng.choice([1e-3, 1.0, 1e3]))).astype(np.float32)
    return SparseVector(vec.n, torch.from_numpy(idx), torch.from_numpy(vals))


def _flip(rng: np.random.Generator, data: bytes, lo: int = 0) -> bytes:
    b = bytearray(data)
    if len(b) <= lo:
        return data
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(lo, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def _truncate(rng: np.random.Generator, data: bytes) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def _insert(rng: np.random.Generator, data: bytes) -> bytes:
    i = int(rng.integers(0, len(data) + 1))
    extra = rng.integers(0, 256, size=int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
    out = data[:i] + extra + data[i:]
    return reseal(out) if rng.random() < 0.5 else out


def _delete(rng: np.random.Generator, data: bytes) -> bytes:
    i = int(rng.integers(0, len(data)))
    out = data[:i] + data[i + int(rng.integers(1, 9)) :]
    return reseal(out) if rng.random() < 0.5 else out


def _trailing(rng: np.random.Generator, data: bytes) -> bytes:
    out = data + rng.integers(0, 256, size=int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    return reseal(out) if rng.random() < 0.5 else out


def _flip_resealed(rng: np.random.Generator, data: bytes) -> bytes:
    return reseal(_flip(rng, data, lo=hdr.CRC_OFFSET + 4))


def _header_field(rng: np.random.Generator, data: bytes) -> bytes:
    """One header field set to a wrong, off-by-one or huge value; correct CRC."""
    h, body = split(data)
    name = str(rng.choice(["positions", "values", "flags", *hdr._VARINT_FIELDS]))
    old = getattr(h, name)
    small = name in ("positions", "values", "flags")
    choices = [old + 1, max(old - 1, 0), 0, int(rng.integers(0, 256))]
    if not small:
        choices += [*_HUGE, old * 2 + 1, int(rng.integers(0, 1 << 20))]
    new = int(rng.choice(choices)) & (0xFF if small else (1 << 63) - 1)
    return craft(replace(h, **{name: new}), body)


def _raw_sections(data: bytes) -> tuple[hdr.Header, bytearray] | None:
    h, body = split(data)
    if h.flags & hdr.FLAG_ZSTD:
        body = zstandard.ZstdDecompressor().decompress(body)
    return h, bytearray(body)


def _reseal_raw(h: hdr.Header, raw: bytes, rng: np.random.Generator) -> bytes:
    """Re-pack a (mutated) raw body, recompressing when the original was zstd'd, so the zstd layer passes."""
    if h.flags & hdr.FLAG_ZSTD:
        packed = zstandard.ZstdCompressor(level=1).compress(raw)
        return craft(replace(h, body_len=len(packed)), packed)
    return craft(replace(h, body_len=len(raw)), raw)


def _poison_values(rng: np.random.Generator, data: bytes) -> bytes:
    """NaN / Inf / -128 / negative scale in the value sections, behind a correct CRC (and zstd)."""
    h, raw = _raw_sections(data)
    if h.k == 0:
        return _header_field(rng, data)
    start = h.pos_len + h.scale_len
    i = int(rng.integers(0, h.k))
    if h.values == hdr.ValueScheme.FP32:
        raw[start + 4 * i : start + 4 * i + 4] = np.array(
            [rng.choice([np.nan, np.inf, -np.inf])], "<f4"
        ).tobytes()
    elif h.values == hdr.ValueScheme.FP16:
        raw[start + 2 * i : start + 2 * i + 2] = np.array(
            [rng.choice([np.nan, np.inf, -np.inf])], "<f2"
        ).tobytes()
    elif h.values == hdr.ValueScheme.BF16:
        raw[start + 2 * i : start + 2 * i + 2] = int(rng.choice([0x7F80, 0xFF80, 0x7FC0])).to_bytes(
            2, "little"
        )
    elif h.values in _ROT_BITS:
        _poison_rotated(rng, h, raw, start)
    elif h.values in (hdr.ValueScheme.INT4, hdr.ValueScheme.INT2) and rng.random() < 0.5:
        bits = 4 if h.values == hdr.ValueScheme.INT4 else 2
        per = 8 // bits
        if h.k % per and rng.random() < 0.5:  # a nonzero padding bit after the last value
            raw[start + h.val_len - 1] |= 1 << (bits * (h.k % per))
        else:  # a code above 2L: 15 for int4, 3 for int2
            raw[start + i // per] |= ((1 << bits) - 1) << (bits * (i % per))
    elif h.values == hdr.ValueScheme.INT8 and rng.random() < 0.5:
        raw[start + i] = 0x80  # int8 -128
    else:
        width = 2 if h.flags & hdr.FLAG_FP16_SCALES else 4
        j = int(rng.integers(0, h.scale_len // width)) * width + h.pos_len
        bad = rng.choice([np.nan, np.inf, -1.0, 65504.0 if width == 2 else 3e38])  # huge: q * s overflows
        raw[j : j + width] = np.array([bad], "<f2" if width == 2 else "<f4").tobytes()
    return _reseal_raw(h, bytes(raw), rng)


_ROT_BITS = {hdr.ValueScheme.ROT4: 4, hdr.ValueScheme.ROT3: 3, hdr.ValueScheme.ROT2: 2}


def _poison_rotated(rng: np.random.Generator, h: hdr.Header, raw: bytearray, start: int) -> None:
    """rot4/rot3/rot2 (k > 0): a set padding bit, a bad chunk scale, a nonzero code where the scale is 0, or a
    new seed (any seed decodes: the outcome may be a valid vector)."""
    bits, kind = _ROT_BITS[h.values], int(rng.integers(0, 4))
    spare = (-h.k * bits) % 8
    if kind == 0 and spare:
        raw[start + h.val_len - 1] |= 1 << int(rng.integers(8 - spare, 8))
    elif kind == 3:
        raw[h.pos_len : h.pos_len + 4] = rng.integers(0, 256, size=4, dtype=np.uint8).tobytes()
    else:
        width = 2 if h.flags & hdr.FLAG_FP16_SCALES else 4
        j = h.pos_len + 4 + int(rng.integers(0, (h.scale_len - 4) // width)) * width
        dtype = "<f2" if width == 2 else "<f4"
        if kind == 2:  # scale 0: only the midpoint code is a valid encoding of that chunk
            raw[j : j + width] = bytes(width)
            raw[start + int(rng.integers(0, h.val_len))] ^= 1 << int(rng.integers(0, 8))
        else:
            bad = rng.choice([np.nan, np.inf, -np.inf, -1.0, -0.0, 65504.0 if width == 2 else 3e38])
            raw[j : j + width] = np.array([bad], dtype).tobytes()


def _scramble_positions(rng: np.random.Generator, data: bytes) -> bytes:
    """Random bytes over the position section (the codes cannot express unsorted positions; this is the
    nearest attack: gaps past n, wrong counts, set padding bits), behind a correct CRC."""
    h, raw = _raw_sections(data)
    if h.pos_len == 0:
        return _header_field(rng, data)
    for _ in range(int(rng.integers(1, 5))):
        raw[int(rng.integers(0, h.pos_len))] = int(rng.integers(0, 256))
    return _reseal_raw(h, bytes(raw), rng)


def _zstd_tricks(rng: np.random.Generator, data: bytes) -> bytes:
    """Bombs, frames without content size, wrong declared sizes, two frames: all with a correct CRC."""
    h, raw = _raw_sections(data)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        frame = _bomb()
    elif kind == 1:
        frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(raw))
    elif kind == 2:
        frame = zstandard.ZstdCompressor(level=1).compress(bytes(raw) + b"\0")
    else:
        one = zstandard.ZstdCompressor(level=1).compress(bytes(raw))
        frame = one + one
    return craft(replace(h, flags=h.flags | hdr.FLAG_ZSTD, body_len=len(frame)), frame)


@functools.cache
def _bomb() -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(bytes(1 << 24))  # 16 MiB of zeros in ~500 bytes


def _garbage(rng: np.random.Generator, data: bytes) -> bytes:
    tail = rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
    out = data[: hdr.FIXED_SIZE] + tail
    return reseal(out) if rng.random() < 0.5 else out


MUTATIONS: dict[str, Callable[[np.random.Generator, bytes], bytes]] = {
    "truncate": _truncate,
    "flip": _flip,
    "flip_resealed": _flip_resealed,
    "insert": _insert,
    "delete": _delete,
    "trailing": _trailing,
    "header_field": _header_field,
    "poison_values": _poison_values,
    "scramble_positions": _scramble_positions,
    "zstd_tricks": _zstd_tricks,
    "garbage": _garbage,
}


def check_decode(data: bytes, max_n: int) -> str:
    """Outcome of decoding untrusted bytes: "ok" (a well-formed vector), "rejected" (CodecError), or a failure:
    "internal" (the last-resort guard fired), "invalid" (returned a malformed vector), "other" (any other error).
    """
    try:
        vec = decode(data, max_n=max_n)
    except CodecInternalError:
        return "internal"
    except CodecError:
        return "rejected"
    except Exception:
        return "other"
    idx, vals = vec.indices, vec.values
    ok = (
        0 <= vec.n <= max_n
        and idx.dtype == torch.int64
        and vals.dtype == torch.float32
        and idx.dim() == 1
        and vals.shape == idx.shape
        and (idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < vec.n))
        and bool((idx[1:] > idx[:-1]).all())
        and bool(torch.isfinite(vals).all())
    )
    return "ok" if ok else "invalid"


def fuzz_case(seed: int, max_n: int = 1 << 20, values: str | None = None) -> tuple[str, str]:
    """(mutation name, outcome) for one seeded case; ``values`` fixes the value scheme (default: any)."""
    rng = np.random.default_rng(seed)
    data, _ = valid_message(rng, values)
    name = str(rng.choice(list(MUTATIONS)))
    return name, check_decode(MUTATIONS[name](rng, data), max_n)
