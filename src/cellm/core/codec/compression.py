"""The optional zstd stage over the whole body, with a bounded, exact-size decompression."""

from __future__ import annotations

import zstandard

from cellm.core.codec.errors import CodecError


class ZstdStage:
    """zstd at ``level`` over the raw body. Decode needs the exact raw size (from the header) and nothing else."""

    needs = frozenset({"raw_len"})

    def __init__(self, level: int) -> None:
        self.level = level

    def encode(self, raw: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(raw)

    @staticmethod
    def decode(frame: bytes | memoryview, raw_len: int) -> bytes:
        """Exactly ``raw_len`` bytes from exactly one frame, or CodecError.

        python-zstandard allocates the frame's declared content size and ignores max_output_size when that size is
        present, so the declared size is compared to ``raw_len`` first: output can never exceed what the header's
        (already limit-checked) section lengths allow.
        """
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd frame header unreadable: {e}") from None
        if declared != raw_len:
            raise CodecError(f"zstd frame declares {declared} bytes, header expects {raw_len}")
        try:
            out = zstandard.ZstdDecompressor().decompress(
                frame, max_output_size=raw_len, allow_extra_data=False
            )
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd body corrupt: {e}") from None
        if len(out) != raw_len:
            raise CodecError(f"zstd body gave {len(out)} bytes, header expects {raw_len}")
        return out
