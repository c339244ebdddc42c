"""Position stages: which k of the N entries a message carries.

Three schemes, chosen per message and recorded in the header:

* dense  -- k == N; zero bytes.
* bitmap -- one bit per entry, ceil(N/8) bytes; the cheapest code once k/N is near 1/2.
* golomb -- Golomb code of the gaps between kept positions, with the parameter b chosen from the mean gap by the
  Gallager-Van Voorhis rule (optimal for geometric gaps, which is what uniformly spread positions give). b need
  not be a power of two (truncated-binary remainders), which saves ~1-3% over Rice codes. The section is three
  bit streams: A, the top u-1 bits of every remainder (u = ceil(log2 b)); B, one extra bit for each remainder
  whose truncated-binary code is u bits long; U, the quotients in unary. Splitting the streams makes every
  stream fixed-width or unary, hence fully vectorised in numpy.
* blocks -- the positions are whole blocks of b consecutive entries (block j = [j*b, (j+1)*b), the last one cut at
  N; what block top-k keeps): the kept block indices are coded as a bitmap over the ceil(N/b) blocks or as Golomb
  gaps, whichever is smaller, so a position costs about 1/b of the per-entry code. pos_param packs b and the
  code: g * 4096 + (b - 1), g = 0 for the bitmap, else the Golomb parameter. The number of kept blocks follows
  from (N, k, b), and k must be exactly the entries those blocks cover.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cellm.core.codec.bitio import nbytes, pack_fixed, pack_unary, unpack_fixed, unpack_unary
from cellm.core.codec.errors import CodecError
from cellm.core.codec.header import PositionScheme
from cellm.core.codec.spec import MAX_POS_BLOCK


def bound_bits(n: int, k: int) -> float:
    """log2 C(n, k): the fewest bits any code can spend, on average, naming k of n positions."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got n={n}, k={k}")
    if k in (0, n):
        return 0.0
    return max(0.0, (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2))


@dataclass(frozen=True)
class PositionPlan:
    """A stage's exact cost for one message, and what it needs to then write it (so auto costs one pass)."""

    stage: PositionStage
    nbytes: int
    param: int = 0
    gaps: np.ndarray | None = None


class PositionStage(ABC):
    """Encode sorted positions to one byte section and back. ``needs`` names the header fields decode reads."""

    scheme: ClassVar[PositionScheme]
    needs: ClassVar[frozenset[str]]

    @abstractmethod
    def plan(self, idx: np.ndarray, n: int) -> PositionPlan: ...

    @abstractmethod
    def encode(self, plan: PositionPlan, idx: np.ndarray, n: int) -> bytes: ...

    @abstractmethod
    def check_sizes(self, n: int, k: int, param: int, pos_len: int) -> None:
        """CodecError unless the declared section length is possible for (n, k, param); runs before allocation."""

    @abstractmethod
    def decode(self, buf: np.ndarray, n: int, k: int, param: int) -> np.ndarray:
        """int64 positions; strictly increasing and < n is checked by the pipeline as well."""


class DensePositions(PositionStage):
    scheme = PositionScheme.DENSE
    needs = frozenset({"n"})

    def plan(self, idx: np.ndarray, n: int) -> PositionPlan:
        return PositionPlan(self, 0)

    def encode(self, plan: PositionPlan, idx: np.ndarray, n: int) -> bytes:
        return b""

    def check_sizes(self, n: int, k: int, param: int, pos_len: int) -> None:
        if k != n:
            raise CodecError(f"dense positions need k == n, got n={n}, k={k}")
        if pos_len:
            raise CodecError(f"dense positions take 0 bytes, header declares {pos_len}")

    def decode(self, buf: np.ndarray, n: int, k: int, param: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)


class BitmapPositions(PositionStage):
    scheme = PositionScheme.BITMAP
    needs = frozenset({"n", "k"})

    def plan(self, idx: np.ndarray, n: int) -> PositionPlan:
        return PositionPlan(self, nbytes(n))

    def encode(self, plan: PositionPlan, idx: np.ndarray, n: int) -> bytes:
        bits = np.zeros(n, dtype=bool)
        bits[idx] = True
        return np.packbits(bits).tobytes()

    def check_sizes(self, n: int, k: int, param: int, pos_len: int) -> None:
        if pos_len != nbytes(n):
            raise CodecError(f"bitmap of n={n} takes {nbytes(n)} bytes, header declares {pos_len}")

    def decode(self, buf: np.ndarray, n: int, k: int, param: int) -> np.ndarray:
        if n & 7 and int(buf[-1]) & ((1 << (8 - (n & 7))) - 1):
            raise CodecError("bitmap has bits set past position n")
        idx = np.flatnonzero(np.unpackbits(buf, count=n))
        if idx.size != k:
            raise CodecError(f"bitmap has {idx.size} positions set, header declares k={k}")
        return idx.astype(np.int64, copy=False)


def golomb_parameter(k: int, span: int) -> int:
    """Gallager-Van Voorhis optimum for geometric gaps with success rate p = k / span (span = last position + 1)."""
    if k <= 0 or span <= k:
        return 1
    p = k / span
    return max(1, math.ceil(math.log(2.0 - p) / -math.log1p(-p)))


def _golomb_split(b: int) -> tuple[int, int]:
    """(u, c): remainders take u-1 bits, plus one more bit when their top u-1 bits are >= c (truncated binary)."""
    u = (b - 1).bit_length()
    return u, (1 << u) - b


def _quotients(gaps: np.ndarray, b: int) -> np.ndarray:
    if b & (b - 1) == 0:
        return gaps >> (b.bit_length() - 1)
    return gaps // b


class GolombPositions(PositionStage):
    scheme = PositionScheme.GOLOMB
    needs = frozenset({"n", "k", "pos_param"})

    def plan(self, idx: np.ndarray, n: int) -> PositionPlan:
        k = int(idx.size)
        if k == 0:
            return PositionPlan(self, 0, 1, np.zeros(0, dtype=np.int64))
        gaps = np.diff(idx, prepend=-1) - 1
        b = golomb_parameter(k, int(idx[-1]) + 1)
        return PositionPlan(self, self.size(gaps, b), b, gaps)

    @staticmethod
    def size(gaps: np.ndarray, b: int) -> int:
        """Exact section bytes for these gaps with parameter b."""
        k = int(gaps.size)
        q = _quotients(gaps, b)
        u, c = _golomb_split(b)
        if u == 0:
            n_extra = 0
        elif c == 0:
            n_extra = k
        else:
            n_extra = int(np.count_nonzero(gaps - q * b >= c))
        return nbytes(k * max(u - 1, 0)) + nbytes(n_extra) + nbytes(int(q.sum()) + k)

    def encode(self, plan: PositionPlan, idx: np.ndarray, n: int) -> bytes:
        gaps, b = plan.gaps, plan.param
        assert gaps is not None
        if gaps.size == 0:
            return b""
        q = _quotients(gaps, b)
        u, c = _golomb_split(b)
        if u == 0:
            top, extra = b"", b""
        else:
            r = gaps - q * b
            long_ = r >= c
            code = np.where(long_, r + c, r)
            a = np.where(long_, code >> 1, code)
            top = pack_fixed(a, u - 1)
            extra = pack_fixed(code[long_] & 1, 1)
        return b"".join((top, extra, pack_unary(q)))

    def check_sizes(self, n: int, k: int, param: int, pos_len: int) -> None:
        if not 1 <= param <= max(n, 1):
            raise CodecError(f"golomb parameter {param} outside [1, n={n}]")
        if k == 0:
            if pos_len or param != 1:
                raise CodecError(f"golomb with k=0 must have 0 bytes and parameter 1, got {pos_len}, {param}")
            return
        u, _ = _golomb_split(param)
        top = nbytes(k * max(u - 1, 0))
        # quotients sum to at most (n - k) // b, and at most k remainders carry an extra bit
        most = top + nbytes(k if u else 0) + nbytes(k + (n - k) // param)
        if not top + 1 <= pos_len <= most:
            raise CodecError(f"golomb section of {pos_len} bytes impossible for n={n}, k={k}, b={param}")

    def decode(self, buf: np.ndarray, n: int, k: int, param: int) -> np.ndarray:
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        b = param
        u, c = _golomb_split(b)
        top_len = nbytes(k * max(u - 1, 0))
        if u == 0:
            r = np.zeros(k, dtype=np.int64)
            extra_len = 0
        else:
            a = unpack_fixed(buf[:top_len], k, u - 1, "golomb remainders")
            long_ = a >= c
            n_extra = int(np.count_nonzero(long_))
            extra_len = nbytes(n_extra)
            if top_len + extra_len >= buf.size:
                raise CodecError("golomb section too short for its remainder bits and quotients")
            e = unpack_fixed(buf[top_len : top_len + extra_len], n_extra, 1, "golomb extra bits")
            r = a
            r[long_] = 2 * a[long_] + e - c
        q = unpack_unary(buf[top_len + extra_len :], k, "golomb quotients")
        if int(q.sum()) * b + k > n:  # exact in int64: the unary length check bounds sum(q) by 8 * pos_len
            raise CodecError(f"golomb gaps run past n={n}")
        q *= b
        q += r
        q += 1
        idx = np.cumsum(q)
        idx -= 1
        if int(idx[-1]) >= n:
            raise CodecError(f"golomb gaps run past n={n}")
        return idx


_BLOCK_BITS = MAX_POS_BLOCK.bit_length() - 1  # pos_param's low bits hold b - 1, b <= MAX_POS_BLOCK


def pack_block_param(block: int, code: int) -> int:
    """The header's pos_param of a block message: ``code`` is 0 (bitmap over blocks) or the Golomb parameter."""
    return code << _BLOCK_BITS | (block - 1)


def unpack_block_param(param: int) -> tuple[int, int]:
    """(block size b, code) from pos_param; b is in [1, MAX_POS_BLOCK] (the caller refuses b = 1)."""
    return (param & (MAX_POS_BLOCK - 1)) + 1, param >> _BLOCK_BITS


def block_ids(idx: np.ndarray, n: int, block: int) -> np.ndarray | None:
    """The sorted block indices whose entries ``idx`` (sorted, distinct, < n) are exactly, or None when ``idx`` is
    not a union of whole blocks of the grid."""
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    bid = idx // block
    starts = np.flatnonzero(np.diff(bid, prepend=-1))
    ids = bid[starts]
    counts = np.diff(starts, append=idx.size)
    if not np.array_equal(counts, np.minimum(block, n - ids * block)):
        return None
    return ids


def kept_blocks(n: int, k: int, block: int) -> int | None:
    """How many blocks k entries are: k = m * b, or (m - 1) * b + the short last block's length; None if neither."""
    last = n - (-(-n // block) - 1) * block  # in [1, b]
    if k % block == 0:
        return k // block
    if last < block and k % block == last:
        return k // block + 1
    return None


class BlockPositions(PositionStage):
    """Block indices of whole blocks; ``block`` and ``wanted`` are the sender's choice (the decoder reads both
    from pos_param)."""

    scheme = PositionScheme.BLOCKS
    needs = frozenset({"n", "k", "pos_param"})

    def __init__(self, block: int = 2, wanted: str = "auto") -> None:
        self.block, self.wanted = block, wanted

    def plan(self, idx: np.ndarray, n: int) -> PositionPlan:
        blocks = block_ids(idx, n, self.block)
        if blocks is None:
            raise ValueError(f"CodecSpec.pos_block={self.block}: the positions are not a union of whole blocks of "
                             f"{self.block} entries (block top-k keeps whole blocks)")
        nb = -(-n // self.block)
        inner = _choose_inner(blocks, nb, self.wanted)
        code = inner.param if inner.stage.scheme == PositionScheme.GOLOMB else 0
        return PositionPlan(self, inner.nbytes, pack_block_param(self.block, code), inner.gaps)

    def encode(self, plan: PositionPlan, idx: np.ndarray, n: int) -> bytes:
        block, code = unpack_block_param(plan.param)
        blocks = idx[idx % block == 0] // block  # the first entry of each kept block (a union, as planned)
        nb = -(-n // block)
        if code == 0:
            return BitmapPositions().encode(plan, blocks, nb)
        return GolombPositions().encode(PositionPlan(GolombPositions(), plan.nbytes, code, plan.gaps), blocks, nb)

    @staticmethod
    def _inner(n: int, k: int, param: int) -> tuple[int, int, int, int, PositionStage]:
        """(b, code, n_blocks, kept blocks, inner stage), or CodecError when (n, k, param) cannot be a block
        message."""
        block, code = unpack_block_param(param)
        if block < 2:
            raise CodecError(f"block positions with block size {block}: must be in [2, {MAX_POS_BLOCK}]")
        nb = -(-n // block)
        m = kept_blocks(n, k, block)
        if m is None or m >= nb:
            raise CodecError(f"k={k} is not a number of entries whole blocks of {block} can cover in n={n}, "
                             "short of all of them")
        return block, code, nb, m, (GolombPositions() if code else BitmapPositions())

    def check_sizes(self, n: int, k: int, param: int, pos_len: int) -> None:
        _, code, nb, m, inner = self._inner(n, k, param)
        inner.check_sizes(nb, m, code, pos_len)

    def decode(self, buf: np.ndarray, n: int, k: int, param: int) -> np.ndarray:
        block, code, nb, m, inner = self._inner(n, k, param)
        blocks = inner.decode(buf, nb, m, code)
        if blocks.size != m or (m and (int(blocks[0]) < 0 or int(blocks[-1]) >= nb)):
            raise CodecError(f"block positions: {blocks.size} blocks decoded, expected {m} below {nb}")
        if m > 1 and not bool(np.all(blocks[1:] > blocks[:-1])):
            raise CodecError("block indices are not strictly increasing")
        idx = (blocks[:, None] * block + np.arange(block, dtype=np.int64)).reshape(-1)
        if m and int(blocks[-1]) == nb - 1:
            idx = idx[idx < n]
        if idx.size != k:
            raise CodecError(f"the {m} kept blocks cover {idx.size} entries, header declares k={k}")
        return idx


POSITION_STAGES: dict[int, PositionStage] = {
    int(s.scheme): s for s in (DensePositions(), BitmapPositions(), GolombPositions(), BlockPositions())
}


def _choose_inner(idx: np.ndarray, n: int, wanted: str) -> PositionPlan:
    if wanted == "bitmap":
        return BitmapPositions().plan(idx, n)
    golomb = GolombPositions().plan(idx, n)
    if wanted == "gaps":
        return golomb
    bitmap = BitmapPositions().plan(idx, n)
    return bitmap if bitmap.nbytes <= golomb.nbytes else golomb


def choose(idx: np.ndarray, n: int, wanted: str, block: int = 1) -> PositionPlan:
    """The plan for ``wanted`` ("auto": the smaller of bitmap and golomb; ties go to the bitmap).

    ``block`` > 1: the positions must be whole blocks of the grid (ValueError naming pos_block otherwise), coded
    by block index with ``wanted`` choosing among the bitmap and gaps over blocks.
    """
    if idx.size == n:
        return DensePositions().plan(idx, n)
    if block > 1:
        return BlockPositions(block, wanted).plan(idx, n)
    return _choose_inner(idx, n, wanted)
