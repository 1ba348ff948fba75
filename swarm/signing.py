"""Signed (and, in private swarms, encrypted) DHT records: a hivemind record validator.

Every record a Swarm peer stores is a *per-peer* record: the DHT subkey is the owner's
peer id. Its value travels inside an envelope (msgpack list)::

    [b"SWR1", public_key(32), payload, signature(64), nonce]

- ``signature`` is Ed25519 over ``(key, subkey, payload, expiration_time)``, so nobody can
  forge, replay under another key, or extend the lifetime of another peer's record.
- ``peer_id_from_public_key(public_key)`` must equal the subkey: a peer can only write
  under its own id.
- In a private swarm ``payload`` is the value encrypted with ChaCha20-Poly1305 under a key
  derived from the swarm key (``nonce`` random, ``(key, subkey, expiration)`` as associated
  data). Peers without the swarm key can neither write records members accept nor read
  members' records. In a public swarm ``payload`` is the plain value and ``nonce`` is empty.
- ``expiration_time`` may not lie further ahead than ``max_ttl + max_clock_skew`` of the
  validating peer's DHT time, so no record lives forever.

hivemind calls ``sign_value`` when this peer stores, ``validate`` when another peer asks
to store or returns records to us, and ``strip_value`` before handing a value to the app.
We use our own Ed25519 scheme rather than ``RSASignatureValidator``: that one puts a
~400-byte RSA key into every DHT key, while ours keeps keys readable (``swarm.block.3``)
and the identity doubles as the transport's CURVE key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from swarm.identity import Identity, peer_id_from_public_key, verify_signature

logger = logging.getLogger(__name__)

ENVELOPE_MAGIC = b"SWR1"
_SIGNED_LABEL = b"swarm/record/v1"
_ENCRYPTION_LABEL = b"swarm/record-encryption/v1"
_NONCE_BYTES = 12
_NIL = msgpack.packb(None)  # what a value that cannot be opened reads as (readers skip None)
_LOG_INTERVAL_S = 30.0


def _signed_bytes(record: DHTRecord, payload: bytes) -> bytes:
    return msgpack.packb([_SIGNED_LABEL, record.key, record.subkey, payload, float(record.expiration_time)])


def _associated_data(record: DHTRecord) -> bytes:
    return msgpack.packb([record.key, record.subkey, float(record.expiration_time)])


def _derive_cipher(swarm_key: bytes) -> ChaCha20Poly1305:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_ENCRYPTION_LABEL).derive(swarm_key)
    return ChaCha20Poly1305(key)


@dataclasses.dataclass(frozen=True)
class _Envelope:
    public_key: bytes
    payload: bytes
    signature: bytes
    nonce: bytes


def _unpack_envelope(value: bytes) -> _Envelope | None:
    try:
        items = msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(items, list) or len(items) != 5 or items[0] != ENVELOPE_MAGIC:
        return None
    if not all(isinstance(item, bytes) for item in items[1:]):
        return None
    return _Envelope(*items[1:])


class SwarmRecordValidator(RecordValidatorBase):
    """Signs our records and refuses anyone else's forgeries (see the module docstring).

    Args:
        identity: this peer's identity (signs what it stores).
        swarm_key: the private swarm's key, or None for a public swarm.
        max_ttl: longest record lifetime accepted, in seconds.
        max_clock_skew: tolerated difference between peers' DHT clocks, in seconds.
    """

    def __init__(
        self,
        identity: Identity,
        swarm_key: bytes | None = None,
        *,
        max_ttl: float = 600.0,
        max_clock_skew: float = 30.0,
    ):
        self._identity = identity
        self._cipher = _derive_cipher(swarm_key) if swarm_key is not None else None
        self._max_ahead = max_ttl + max_clock_skew
        self._last_log: dict[str, float] = {}
        self._logged_count: dict[str, int] = {}
        self.refusals: dict[str, int] = {}  # cause -> records refused (this process)

    @property
    def priority(self) -> int:
        return 10  # like RSASignatureValidator: outermost layer

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SwarmRecordValidator)

    def check(self, record: DHTRecord) -> str | None:
        """Validates a record and says why it is refused.

        Args:
            record: the record as hivemind sees it (hashed key, msgpack subkey, enveloped value).

        Returns:
            None if the record is valid, else a one-line reason.
        """
        refusal = self._check(record)
        return None if refusal is None else refusal[1]

    def _check(self, record: DHTRecord) -> tuple[str, str] | None:
        """None if valid, else (cause, reason): the cause names the kind of refusal (for the log)."""
        envelope = _unpack_envelope(record.value)
        if envelope is None:
            return "unsigned", "value is not a signed Swarm record"
        try:
            subkey = msgpack.unpackb(record.subkey, raw=False)
        except (ValueError, msgpack.UnpackException):
            return "subkey", "subkey is not msgpack"
        try:
            signer = peer_id_from_public_key(envelope.public_key)
        except ValueError:
            return "public-key", "malformed public key"
        if subkey != signer:
            return "forged-subkey", f"subkey {subkey!r} is not the signer's peer id {signer}"
        if record.expiration_time > get_dht_time() + self._max_ahead:
            return (
                "expiration",
                f"expiration {record.expiration_time - get_dht_time():.0f}s ahead exceeds the limit",
            )
        if not verify_signature(
            envelope.public_key, _signed_bytes(record, envelope.payload), envelope.signature
        ):
            return "signature", f"bad signature from {signer}"
        if self._cipher is not None:
            if not envelope.nonce:
                return "unsealed", (
                    f"record from {signer} is not sealed with the swarm key (outsider or public-swarm peer)"
                )
            try:
                self._cipher.decrypt(envelope.nonce, envelope.payload, _associated_data(record))
            except InvalidTag:
                return (
                    "wrong-swarm-key",
                    f"record from {signer} is sealed with a different swarm key (wrong --swarm-key?)",
                )
        elif envelope.nonce:
            return (
                "private-record",
                f"record from {signer} belongs to a private swarm (this peer has no --swarm-key)",
            )
        return None

    def validate(self, record: DHTRecord) -> bool:
        refusal = self._check(record)
        if refusal is not None:
            self._log_refusal(*refusal)
        return refusal is None

    def sign_value(self, record: DHTRecord) -> bytes:
        payload, nonce = record.value, b""
        if self._cipher is not None:
            nonce = os.urandom(_NONCE_BYTES)
            payload = self._cipher.encrypt(nonce, record.value, _associated_data(record))
        signature = self._identity.sign(_signed_bytes(record, payload))
        return msgpack.packb([ENVELOPE_MAGIC, self._identity.public_key, payload, signature, nonce])

    def strip_value(self, record: DHTRecord) -> bytes:
        envelope = _unpack_envelope(record.value)
        if envelope is None:
            return record.value  # not ours; the reader's parser skips it
        if self._cipher is None:
            return envelope.payload if not envelope.nonce else _NIL
        try:
            return self._cipher.decrypt(envelope.nonce, envelope.payload, _associated_data(record))
        except InvalidTag:
            return _NIL

    def _log_refusal(self, cause: str, reason: str) -> None:
        # Refusals come in floods (a misconfigured peer re-announcing, 400 forged records);
        # log each cause once per interval, with how many were refused since (issue #19: a
        # key with seconds and peer ids in it let every refusal through).
        self.refusals[cause] = self.refusals.get(cause, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(cause, -_LOG_INTERVAL_S) >= _LOG_INTERVAL_S:
            self._last_log[cause] = now
            count = self.refusals[cause] - self._logged_count.get(cause, 0)
            self._logged_count[cause] = self.refusals[cause]
            logger.warning("refused DHT record (%d of this kind since the last such line): %s", count, reason)
