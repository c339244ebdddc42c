"""encode / decode: header, position stage, value stage, optional zstd, checksum; and the strict checks.

The decoder trusts nothing it reads. Its order is: framing (magic, version, minimal varints); every declared
size against the caller's max_n and against what (n, k, schemes) imply; the exact total length; the CRC32;
only then a bounded decompression and the stage decoders; finally the decoded positions and values themselves.
So a message can cost at most a few times the memory its accepted (n, k) justify, and never more time than
linear in its size and n.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from cellm.core.codec import positions as pos_mod
from cellm.core.codec.compression import ZstdStage
from cellm.core.codec.errors import CodecError, CodecInternalError
from cellm.core.codec.header import (
    CRC_OFFSET,
    FLAG_FP16_SCALES,
    FLAG_ZSTD,
    HARD_MAX_N,
    KNOWN_FLAGS,
    Header,
    PositionScheme,
    ValueScheme,
    pack,
    unpack,
)
from cellm.core.codec.spec import MAX_BLOCK_SIZE, SCALED_VALUES, CodecSpec, is_int
from cellm.core.codec.values import stage_for_spec, value_stage
from cellm.core.sparse import SparseVector

DEFAULT_SPEC = CodecSpec()


def encode(vec: SparseVector, spec: CodecSpec = DEFAULT_SPEC) -> bytes:
    """The wire bytes of ``vec``. ValueError if the spec is invalid, vec is malformed, or a value overflows."""
    spec.validate()
    n, idx, vals = _as_arrays(vec)
    plan = pos_mod.choose(idx, n, spec.positions, spec.pos_block)
    pos_bytes = plan.stage.encode(plan, idx, n)
    fp16_scales = spec.values in SCALED_VALUES and spec.scales == "fp16"
    vstage = stage_for_spec(spec.values, spec.block_size, fp16_scales)
    scale_bytes, val_bytes = vstage.encode(vals)
    raw_len = len(pos_bytes) + len(scale_bytes) + len(val_bytes)
    body, flags = [pos_bytes, scale_bytes, val_bytes], FLAG_FP16_SCALES if fp16_scales else 0
    body_len = raw_len
    if spec.zstd_level and raw_len:
        packed = ZstdStage(spec.zstd_level).encode(b"".join(body))
        if len(packed) < raw_len:  # zstd is kept only where it pays; the decoder insists on this
            body, body_len, flags = [packed], len(packed), flags | FLAG_ZSTD
    header = Header(
        positions=int(plan.stage.scheme),
        values=int(vstage.scheme),
        flags=flags,
        n=n,
        k=int(idx.size),
        pos_param=plan.param if "pos_param" in plan.stage.needs else 0,
        block_size=spec.block_size if "block_size" in vstage.needs else 0,
        pos_len=len(pos_bytes),
        scale_len=len(scale_bytes),
        val_len=len(val_bytes),
        body_len=body_len,
    )
    return pack(header, body)


def decode(data: bytes, *, max_n: int, expected_n: int | None = None) -> SparseVector:
    """The SparseVector in ``data``; CodecError (and only CodecError) for anything wrong with the bytes.

    ``max_n`` caps the declared N before anything is allocated; ``expected_n`` (if given) must equal it.
    Bad arguments (not bad data) raise plain ValueError.
    """
    if not is_int(max_n) or not 0 <= max_n <= HARD_MAX_N:
        raise ValueError(f"max_n must be an int in [0, {HARD_MAX_N}], got {max_n!r}")
    if expected_n is not None and (not is_int(expected_n) or expected_n < 0):
        raise ValueError(f"expected_n must be a non-negative int or None, got {expected_n!r}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"message must be bytes, got {type(data).__name__}")
    try:
        with np.errstate(
            all="ignore"
        ):  # never let a numpy warning (an error under -W error) escape as non-CodecError
            return _decode(bytes(data) if not isinstance(data, bytes) else data, max_n, expected_n)
    except CodecError:
        raise
    except Exception as e:  # last resort: a receiver must survive any upload; the fuzz harness counts these
        raise CodecInternalError(f"internal decoder error ({type(e).__name__}: {e})") from e


def roundtrip(vec: SparseVector, spec: CodecSpec) -> tuple[bytes, SparseVector]:
    """The bytes sent and exactly what the receiver decodes from them (what error feedback must subtract)."""
    data = encode(vec, spec)
    return data, decode(data, max_n=vec.n, expected_n=vec.n)


def _decode(data: bytes, max_n: int, expected_n: int | None) -> SparseVector:
    view = memoryview(data)
    h, off, crc = unpack(view)
    _check_header(h, max_n, expected_n)
    pstage = pos_mod.POSITION_STAGES[h.positions]
    vstage = value_stage(h.values, h.block_size, bool(h.flags & FLAG_FP16_SCALES))
    pstage.check_sizes(h.n, h.k, h.pos_param, h.pos_len)
    if (h.scale_len, h.val_len) != vstage.section_lens(h.k):
        want = vstage.section_lens(h.k)
        raise CodecError(
            f"value sections declare {h.scale_len}+{h.val_len} bytes, k={h.k} needs {want[0]}+{want[1]}"
        )
    if h.body_len != len(data) - off:
        raise CodecError(
            f"body is {len(data) - off} bytes, header declares {h.body_len} (truncated or trailing)"
        )
    if h.flags & FLAG_ZSTD:
        if not 0 < h.body_len < h.raw_len:
            raise CodecError(f"zstd body of {h.body_len} bytes for {h.raw_len} raw bytes (must be smaller)")
    elif h.body_len != h.raw_len:
        raise CodecError(f"body is {h.body_len} bytes, sections add up to {h.raw_len}")
    if zlib.crc32(view[CRC_OFFSET + 4 :]) != crc:
        raise CodecError("CRC32 mismatch: message corrupted")
    raw = ZstdStage.decode(view[off:], h.raw_len) if h.flags & FLAG_ZSTD else view[off:]
    buf = np.frombuffer(raw, dtype=np.uint8)
    p_end, s_end = h.pos_len, h.pos_len + h.scale_len
    idx = pstage.decode(buf[:p_end], h.n, h.k, h.pos_param)
    if h.positions != PositionScheme.DENSE:
        _check_positions(idx, h.n, h.k)
    vals = vstage.decode(buf[p_end:s_end], buf[s_end:], h.k)
    if not np.isfinite(vals).all():
        raise CodecError(f"{int((~np.isfinite(vals)).sum())} decoded values are NaN or infinite")
    return SparseVector(h.n, torch.from_numpy(idx), torch.from_numpy(vals))


def _check_header(h: Header, max_n: int, expected_n: int | None) -> None:
    """Meaning and limits of every field, before any allocation."""
    if h.n > max_n:
        raise CodecError(f"declared n={h.n} exceeds max_n={max_n}")
    if expected_n is not None and h.n != expected_n:
        raise CodecError(f"declared n={h.n}, expected n={expected_n}")
    if h.k > h.n:
        raise CodecError(f"declared k={h.k} exceeds n={h.n}")
    if h.positions not in pos_mod.POSITION_STAGES:
        raise CodecError(f"unknown position scheme {h.positions}")
    if h.values not in tuple(ValueScheme):
        raise CodecError(f"unknown value scheme {h.values}")
    if h.flags & ~KNOWN_FLAGS:
        raise CodecError(f"unknown flag bits {h.flags & ~KNOWN_FLAGS:#x}")
    if (h.positions == PositionScheme.DENSE) != (h.k == h.n):
        raise CodecError(f"k == n (n={h.n}, k={h.k}) must, and only then may, use the dense position scheme")
    # Fields a stage does not declare it needs must be zero, so each message has one encoding.
    pstage = pos_mod.POSITION_STAGES[h.positions]
    vstage = value_stage(h.values, h.block_size, bool(h.flags & FLAG_FP16_SCALES))
    needs = pstage.needs | vstage.needs
    if "pos_param" not in needs and h.pos_param:
        raise CodecError(f"position parameter {h.pos_param} set for a scheme that has none")
    if "block_size" not in needs and h.block_size:
        raise CodecError(f"block size {h.block_size} set for a value scheme that has none")
    if "fp16_scales" not in needs and h.flags & FLAG_FP16_SCALES:
        raise CodecError("fp16-scales flag set for a value scheme without scales")
    if "block_size" in needs and not 1 <= h.block_size <= MAX_BLOCK_SIZE:
        raise CodecError(f"block size {h.block_size} outside [1, {MAX_BLOCK_SIZE}]")


def _check_positions(idx: np.ndarray, n: int, k: int) -> None:
    """Comparisons, not differences: an int64 wrap in a stage would still show up as a descent."""
    if idx.size != k:
        raise CodecError(f"decoded {idx.size} positions, header declares k={k}")
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= n):
        raise CodecError(f"positions outside [0, n={n})")
    if k > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise CodecError("positions are not strictly increasing")


def _as_arrays(vec: SparseVector) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, int64 positions, float32 values) as numpy, after checking vec is a well-formed sparse vector."""
    if not isinstance(vec, SparseVector):
        raise TypeError(f"encode needs a SparseVector, got {type(vec).__name__}")
    n = vec.n
    if not is_int(n) or not 0 <= n <= HARD_MAX_N:
        raise ValueError(f"vector n must be an int in [0, {HARD_MAX_N}], got {n!r}")
    if vec.indices.dim() != 1 or vec.values.dim() != 1 or vec.indices.numel() != vec.values.numel():
        raise ValueError("indices and values must be 1-D and of equal length")
    if vec.indices.dtype.is_floating_point or vec.indices.dtype == torch.bool or vec.indices.is_complex():
        raise ValueError(f"indices must be integers, got {vec.indices.dtype}")
    if not vec.values.dtype.is_floating_point:
        raise ValueError(f"values must be floating point, got {vec.values.dtype}")
    idx = vec.indices.detach().cpu().to(torch.int64).contiguous().numpy()
    vals = vec.values.detach().cpu().to(torch.float32).contiguous().numpy()
    k = idx.size
    if k > n:
        raise ValueError(f"k={k} positions for n={n}")
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= n):
        raise ValueError(f"positions must lie in [0, n={n})")
    if k > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise ValueError("positions must be strictly increasing")
    if not np.isfinite(vals).all():
        raise ValueError(f"{int((~np.isfinite(vals)).sum())} values are NaN or infinite")
    return n, idx, vals
