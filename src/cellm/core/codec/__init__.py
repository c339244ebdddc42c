"""Wire codec for sparse vectors: every download and upload, as few bytes as the information allows.

A message is a header (header.py), then positions (positions.py: dense, bitmap or Golomb gaps, the cheapest per
message, or whole blocks named by block index), then values (values.py: fp32, fp16, bf16, or int8 with per-block
scales), optionally zstd'd (compression.py). decode() is strict: any malformed input raises CodecError, nothing else. No I/O here.
"""

from cellm.core.codec.errors import CodecError
from cellm.core.codec.header import HARD_MAX_N
from cellm.core.codec.pipeline import decode, encode, roundtrip
from cellm.core.codec.positions import bound_bits
from cellm.core.codec.spec import CodecSpec

__all__ = ["HARD_MAX_N", "CodecError", "CodecSpec", "bound_bits", "decode", "encode", "roundtrip"]
