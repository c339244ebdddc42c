"""The cryptographic building blocks, each a thin wrapper over an audited library (nothing home-made).

- Key agreement: X25519 (``cryptography``), its shared secret expanded with HKDF-SHA256; the salt is the round's
  parameter digest and the info string names the purpose and the two client ids, so that every derived key is
  bound to one round, one use and one (ordered or unordered) pair.
- Authenticated encryption of the shares: ChaCha20-Poly1305 under a key derived per round and per direction
  src -> dst, with a random 12-byte nonce sent in front of the ciphertext. A protocol run encrypts once per
  key, but a runtime that retries a stage would encrypt fresh shares under the same key; the random nonce
  keeps that safe for 12 bytes a ciphertext.
- Masks: the ChaCha20 keystream (a PRG) read as little-endian words reduced mod 2^R; 2^R divides the word
  range, so every ring element is equally likely.
- Secret sharing: pycryptodome's Shamir over GF(2^128) (16-byte secrets), applied to each half of a 32-byte
  secret with the same share index.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cellm.core.secagg.errors import SecAggAbort, SecAggError
from cellm.core.secagg.quantize import ring_mask

KEY_BYTES = 32
"""Raw X25519 keys, self-mask seeds, derived symmetric keys, Shamir shares of a 32-byte secret."""
TAG_BYTES = 16
"""Poly1305 tag."""
SHARE_PLAINTEXT_BYTES = 2 * KEY_BYTES
"""One holder's share of the self-mask seed followed by its share of the mask private key."""
NONCE_BYTES = 12
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES
"""Nonce, then the encrypted share pair and its tag."""
_ZERO_NONCE_PRG = bytes(16)
DOMAIN = b"cellm-secagg/v1/"

Entropy = Callable[[int], bytes]


def u64(value: int) -> bytes:
    """An id as 8 big-endian bytes (for info strings and associated data)."""
    return int(value).to_bytes(8, "big")


def new_private_key(entropy: Entropy) -> X25519PrivateKey:
    """An X25519 key from 32 bytes of ``entropy`` (os.urandom in production; seeded only in tests)."""
    return X25519PrivateKey.from_private_bytes(_entropy(entropy, KEY_BYTES))


def private_raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def public_raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def load_private(raw: bytes, what: str) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise SecAggError(f"{what}: a private key has {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def derive_key(private: X25519PrivateKey, peer_public: bytes, salt: bytes, info: bytes, what: str) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public)): 32 bytes bound to ``salt`` (the round) and ``info`` (the use).

    X25519 refuses a low-order peer key (an all-zero shared secret); that is reported as a bad key, not a crash.
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggError(f"{what}: key agreement failed ({e}); the peer's public key is invalid") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=DOMAIN + info).derive(shared)


def hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of a secret that is already uniform (a self-mask seed) into a PRG key for one use."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=DOMAIN + info).derive(secret)


def commit(secret: bytes, salt: bytes, owner: int) -> bytes:
    """SHA-256 commitment to a 32-byte uniformly random seed: lets the server check a reconstruction.

    Reveals nothing usable about the seed (it has 256 bits of entropy).
    """
    return hashlib.sha256(DOMAIN + b"commit" + salt + u64(owner) + secret).digest()


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305: a random nonce followed by the ciphertext and tag of ``plaintext``, bound to ``associated``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes, what: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggError(
            f"{what}: authentication failed (the ciphertext was altered, is for another client or round, "
            f"or the sender's key is wrong)"
        ) from None


def prg(key: bytes, count: int, ring_bits: int) -> np.ndarray:
    """``count`` uniform ring elements (uint64 < 2^R) from the ChaCha20 keystream of ``key``.

    32-bit words when R <= 32 (half the keystream), 64-bit words otherwise; either way 2^R divides the word
    range, so reducing mod 2^R keeps the values uniform.
    """
    word = 4 if ring_bits <= 32 else 8
    stream = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE_PRG), mode=None).encryptor().update(bytes(count * word))
    words = np.frombuffer(stream, dtype="<u4" if word == 4 else "<u8")
    return words.astype(np.uint64) & ring_mask(ring_bits)


def share_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir shares of a 32-byte secret: share ``i`` (0-based) is for index ``i + 1``; any ``threshold`` rebuild it.

    Each 16-byte half is shared on its own polynomial (pycryptodome shares 16-byte secrets), with the same
    index; a share is the two 16-byte halves' shares concatenated (32 bytes).
    """
    if len(secret) != KEY_BYTES:
        raise ValueError(f"share_secret: the secret must have {KEY_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num:
        raise ValueError(f"share_secret: threshold {threshold} must be in [1, {num}]")
    halves = [Shamir.split(threshold, num, secret[h:h + 16]) for h in (0, 16)]
    return [halves[0][i][1] + halves[1][i][1] for i in range(num)]


def combine_shares(shares: Sequence[tuple[int, bytes]], threshold: int, what: str) -> bytes:
    """The secret from at least ``threshold`` (index, share) pairs; SecAggError if there are fewer.

    Fewer shares would interpolate a wrong secret silently (Shamir cannot tell), so the count is checked
    here; exactly ``threshold`` shares (lowest indices) are used, as pycryptodome asks.
    """
    indices = [i for i, _ in shares]
    if len(set(indices)) != len(indices):
        raise SecAggError(f"{what}: two shares have the same index")
    if len(shares) < threshold:
        raise SecAggAbort(
            f"{what}: {len(shares)} shares, fewer than the threshold {threshold}: the secret cannot be "
            f"reconstructed"
        )
    for _, s in shares:
        if len(s) != KEY_BYTES:
            raise SecAggError(f"{what}: a share has {len(s)} bytes, expected {KEY_BYTES}")
    use = sorted(shares)[:threshold]
    return b"".join(Shamir.combine([(i, s[h:h + 16]) for i, s in use]) for h in (0, 16))


def _entropy(entropy: Entropy, n: int) -> bytes:
    out = entropy(n)
    if not isinstance(out, bytes) or len(out) != n:
        raise ValueError(f"entropy source returned {type(out).__name__}, expected {n} bytes")
    return out


def fresh_secret(entropy: Entropy) -> bytes:
    """32 uniformly random bytes (a self-mask seed)."""
    return _entropy(entropy, KEY_BYTES)
