"""Persistent peer identity: an Ed25519 key pair in a 0600 file, and the CURVE key bound to it.

The peer id is a hash of the Ed25519 public key, so nobody can claim an id without its
private key. The transport's CURVE (X25519) key pair is the same key in Montgomery form
(the standard Ed25519 -> X25519 conversion, libsodium's ``crypto_sign_ed25519_*_to_curve25519``),
so one file holds everything and anyone can compute a peer's CURVE public key from its
identity key (:func:`curve_public_key_of`). A record that carries a CURVE key is therefore
checkable: the key must be the signer's own (issue #14: a record signed by A carrying B's
address and key would otherwise send A's clients to B), and a client that connects with
it can only complete the handshake with that peer. Using one key for signatures and key
agreement is what libsodium supports and Signal's XEdDSA does the other way round; the
signatures (Ed25519 over labelled messages) and the CURVE handshake never sign or decrypt
each other's inputs.

The private swarm key (``load_swarm_key``) lives here too: it is the other secret a peer
reads from a file.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import stat
from pathlib import Path
from typing import NewType

import zmq.utils.z85
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.swarm_errors import InsecureKeyFile
from transport.curve import KeyPair
from transport.errors import ConfigurationError

PeerId = NewType("PeerId", str)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_PEER_ID_LABEL = b"swarm/peer-id/v1"
_FIELD_PRIME = 2**255 - 19  # Curve25519's field
_MIN_SWARM_KEY_BYTES = 16


def peer_id_from_public_key(public_key: bytes) -> PeerId:
    """Derives the peer id from a raw 32-byte Ed25519 public key.

    Args:
        public_key: raw Ed25519 public key.

    Returns:
        32 lowercase base32 characters (160 bits of SHA-256).

    Raises:
        ValueError: if the key is not 32 bytes.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"Ed25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    digest = hashlib.sha256(_PEER_ID_LABEL + public_key).digest()[:20]
    return PeerId(base64.b32encode(digest).decode().lower())


def curve_public_key_of(public_key: bytes) -> bytes:
    """The z85 CURVE public key that belongs to an Ed25519 identity key.

    The Edwards point's y coordinate maps to the Montgomery u = (1 + y) / (1 - y) (RFC 7748,
    section 4.1); ``Identity`` derives its CURVE secret so that its public key is exactly this.

    Args:
        public_key: raw 32-byte Ed25519 public key.

    Returns:
        40 z85 bytes, as ``zmq.curve_keypair()`` returns public keys.

    Raises:
        ValueError: the key is not 32 bytes, or is the one point without a Montgomery form.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"Ed25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    if (1 - y) % _FIELD_PRIME == 0:
        raise ValueError("Ed25519 public key is the identity point")
    u = (1 + y) * pow(1 - y, _FIELD_PRIME - 2, _FIELD_PRIME) % _FIELD_PRIME
    return zmq.utils.z85.encode(u.to_bytes(32, "little"))


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Checks an Ed25519 signature.

    Args:
        public_key: raw 32-byte Ed25519 public key.
        message: the signed bytes.
        signature: 64-byte signature.

    Returns:
        True if the signature is valid; False for a bad signature or malformed key.
    """
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclasses.dataclass(frozen=True, eq=False)
class Identity:
    """A peer's key material. Create with ``Identity.generate()`` or ``load_or_create_identity``.

    Attributes:
        peer_id: derived from ``public_key``.
        public_key: raw Ed25519 public key (32 bytes), carried in every signed record.
        curve_public_key: z85 CURVE public key (40 bytes), as ``zmq.curve_keypair()`` returns;
            equals ``curve_public_key_of(public_key)``.
        curve_secret_key: z85 CURVE secret key (40 bytes); never leaves this process.
    """

    _private_key: Ed25519PrivateKey = dataclasses.field(repr=False)
    peer_id: PeerId
    public_key: bytes
    curve_public_key: bytes
    curve_secret_key: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> Identity:
        """Builds an identity (and its derived CURVE key pair) from an Ed25519 private key."""
        public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        seed = private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        # Ed25519's secret scalar is the first half of SHA-512(seed) (RFC 8032, 5.1.5); as an
        # X25519 scalar it gives the Montgomery form of the Ed25519 public key. X25519 clamps
        # the scalar itself; zmq/libsodium clamp identically, so this pair equals what
        # zmq.curve_public() computes from the secret.
        curve_seed = hashlib.sha512(seed).digest()[:32]
        curve_private = X25519PrivateKey.from_private_bytes(curve_seed)
        curve_public = curve_private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(
            _private_key=private_key,
            peer_id=peer_id_from_public_key(public_key),
            public_key=public_key,
            curve_public_key=zmq.utils.z85.encode(curve_public),
            curve_secret_key=zmq.utils.z85.encode(curve_seed),
        )

    @classmethod
    def generate(cls) -> Identity:
        """Creates a fresh, unsaved identity (tests, ephemeral clients)."""
        return cls.from_private_key(Ed25519PrivateKey.generate())

    def curve_keypair(self) -> KeyPair:
        """The transport's CURVE key pair, bound to this identity."""
        return KeyPair(self.curve_public_key, self.curve_secret_key)

    def sign(self, message: bytes) -> bytes:
        """Signs ``message`` with the Ed25519 key; returns the 64-byte signature."""
        return self._private_key.sign(message)

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (what the key file holds)."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _check_private_permissions(path: Path, what: str) -> None:
    if os.name != "posix":
        return
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}` or point --identity-path elsewhere"
        )


def _write_private_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def load_or_create_identity(path: str | os.PathLike[str]) -> Identity:
    """Loads the identity stored at ``path``, creating it (mode 0600) on first use.

    Args:
        path: the key file (PKCS#8 PEM, Ed25519). Its folder is created with mode 0700.

    Returns:
        The peer's identity.

    Raises:
        InsecureKeyFile: the file is readable or writable by group or others.
        ConfigurationError: the file exists but holds no Ed25519 private key.
    """
    path = Path(path)
    if not path.exists():
        identity = Identity.generate()
        try:
            _write_private_file(path, identity.to_pem())
            return identity
        except FileExistsError:
            pass  # another process created it first: load theirs
    _check_private_permissions(path, "identity file")
    try:
        private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigurationError(f"identity file {path} holds no readable private key: {error}") from error
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ConfigurationError(
            f"identity file {path} must hold an Ed25519 key, got {type(private_key).__name__}"
        )
    return Identity.from_private_key(private_key)


def load_swarm_key(path: str | os.PathLike[str]) -> bytes:
    """Reads a private swarm's shared key from a file (mode 0600).

    Args:
        path: the key file; its bytes (surrounding whitespace stripped) are the key.

    Returns:
        The key bytes.

    Raises:
        InsecureKeyFile: the file is readable or writable by group or others.
        ConfigurationError: the file is missing or the key is shorter than 16 bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"swarm key file {path} does not exist (flag --swarm-key)")
    _check_private_permissions(path, "swarm key file")
    key = path.read_bytes().strip()
    if len(key) < _MIN_SWARM_KEY_BYTES:
        raise ConfigurationError(
            f"swarm key in {path} is {len(key)} bytes; use at least {_MIN_SWARM_KEY_BYTES} random bytes "
            "(e.g. `head -c 32 /dev/urandom | base64 > swarm.key`)"
        )
    return key
