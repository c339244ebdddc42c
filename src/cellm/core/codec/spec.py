"""What the sender chooses: value precision, position scheme, int8 block size and zstd level."""

from __future__ import annotations

from dataclasses import dataclass

VALUE_CHOICES = ("fp32", "fp16", "bf16", "int8", "int4", "int2", "rot4", "rot3", "rot2")
SCALED_VALUES = ("int8", "int4", "int2", "rot4", "rot3", "rot2")  # a scale per block (or chunk) + integer codes
ROTATED_VALUES = ("rot4", "rot3", "rot2")  # chunks of power-of-two sizes <= block_size, randomly rotated
POSITION_CHOICES = ("auto", "bitmap", "gaps")
SCALE_CHOICES = ("fp32", "fp16")
MAX_BLOCK_SIZE = 1 << 24
MAX_ZSTD_LEVEL = 22
MAX_POS_BLOCK = 1 << 12  # position blocks: the header packs b - 1 into the low 12 bits of pos_param


@dataclass(frozen=True)
class CodecSpec:
    """How to encode one message. The receiver needs none of it: every choice is recorded in the header.

    ``positions="auto"`` codes the positions with whichever of bitmap and Golomb gaps is smaller for this message;
    a dense message (k == N) always uses the zero-byte "dense" scheme. ``block_size`` and ``scales`` only matter
    for the block-scaled schemes (``int8``, ``int4``, ``int2``, and ``rot4``/``rot3``/``rot2``, whose block_size must
    be a power of two: the largest Walsh-Hadamard chunk). ``zstd_level`` 0 means no zstd; 1..22 compresses the body and keeps the result only
    when it is smaller. Lossy value schemes and their error bounds are in values.py; a value that fp16 (or bf16)
    cannot represent makes encode raise ValueError rather than send inf.

    ``pos_block`` = b > 1: the positions are a union of whole blocks of the grid (block j = entries [j*b, (j+1)*b),
    what block top-k keeps) and are coded as block indices (a bitmap or Golomb gaps over ceil(N / b) blocks, the
    smaller with "auto"; "bitmap" / "gaps" force one). A message whose positions are not such a union is a sender
    bug: encode raises ValueError naming pos_block. 1 codes every position (the default).
    """

    values: str = "fp32"
    positions: str = "auto"
    block_size: int = 256
    zstd_level: int = 0
    scales: str = "fp32"
    pos_block: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.values not in VALUE_CHOICES:
            raise ValueError(f"CodecSpec.values must be one of {VALUE_CHOICES}, got {self.values!r}")
        if self.positions not in POSITION_CHOICES:
            raise ValueError(f"CodecSpec.positions must be one of {POSITION_CHOICES}, got {self.positions!r}")
        if not is_int(self.block_size) or not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(
                f"CodecSpec.block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {self.block_size!r}"
            )
        if self.values in ROTATED_VALUES and self.block_size & (self.block_size - 1):
            raise ValueError(
                f"CodecSpec.block_size must be a power of two for values={self.values!r} (the largest rotated "
                f"chunk), got {self.block_size}"
            )
        if not is_int(self.zstd_level) or not 0 <= self.zstd_level <= MAX_ZSTD_LEVEL:
            raise ValueError(
                f"CodecSpec.zstd_level must be an int in [0, {MAX_ZSTD_LEVEL}], got {self.zstd_level!r}"
            )
        if self.scales not in SCALE_CHOICES:
            raise ValueError(f"CodecSpec.scales must be one of {SCALE_CHOICES}, got {self.scales!r}")
        if not is_int(self.pos_block) or not 1 <= self.pos_block <= MAX_POS_BLOCK:
            raise ValueError(f"CodecSpec.pos_block must be an int in [1, {MAX_POS_BLOCK}], got {self.pos_block!r}")


def is_int(x: object) -> bool:
    """An int that is not a bool (True is an int to Python, not a size to the codec)."""
    return isinstance(x, int) and not isinstance(x, bool)
