"""CURVE keys, the ZAP handler that names each client by its key, and admission tokens.

ZeroMQ's CURVE mechanism encrypts and authenticates every connection: a client must
know the server's public key. A server runs a ZAP handler (one per ZeroMQ context)
that accepts any client key and stores it as the messages' ``User-Id`` property, so
every request carries its sender's authenticated key. In a private swarm the client
also sends ``admission_token(swarm_key, client_public_key)`` in each envelope; the
server recomputes it from the authenticated key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

import zmq
import zmq.asyncio
import zmq.utils.z85

from transport.errors import ConfigurationError

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"swarm"


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, z85-encoded (40 bytes each), as from ``zmq.curve_keypair()``.

    Attributes:
        public: shared with peers (the swarm layer publishes it in the peer's record).
        secret: never leaves this process.
    """

    public: bytes
    secret: bytes

    def __post_init__(self) -> None:
        for name in ("public", "secret"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 40:
                raise ConfigurationError(f"KeyPair.{name} must be 40 z85 bytes (zmq.curve_keypair())")
        try:
            derived = zmq.curve_public(self.secret)
        except Exception:
            raise ConfigurationError("KeyPair.secret is not a valid z85 CURVE key") from None
        if derived != self.public:
            raise ConfigurationError("KeyPair.public does not belong to KeyPair.secret")

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh random key pair."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def check_public_key(key: bytes, name: str) -> bytes:
    """``key`` if it is a 40-byte z85 key.

    Raises:
        ConfigurationError: naming ``name``.
    """
    if not isinstance(key, bytes) or len(key) != 40:
        raise ConfigurationError(f"{name} must be a 40-byte z85 CURVE public key")
    try:
        zmq.utils.z85.decode(key)
    except Exception:
        raise ConfigurationError(f"{name} is not valid z85") from None
    return key


def admission_token(swarm_key: bytes, public_key: bytes) -> bytes:
    """Proof of knowing ``swarm_key``, bound to one CURVE public key.

    Args:
        swarm_key: the private swarm's shared secret.
        public_key: the client's z85 CURVE public key.
    Returns:
        HMAC-SHA256(swarm_key, public_key), 32 bytes.
    """
    return hmac.new(swarm_key, public_key, hashlib.sha256).digest()


def configure_server_socket(socket: zmq.Socket, keys: KeyPair) -> None:
    """Make ``socket`` a CURVE server whose clients are named by the ZAP handler."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    socket.zap_domain = ZAP_DOMAIN


def configure_client_socket(socket: zmq.Socket, keys: KeyPair, server_public_key: bytes) -> None:
    """Make ``socket`` a CURVE client that only talks to ``server_public_key``."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = server_public_key


def bind_zap_socket(context: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    """The socket ``serve_zap`` answers on, bound before any server socket of ``context``."""
    socket = context.socket(zmq.REP)
    socket.linger = 0
    try:
        socket.bind(ZAP_ENDPOINT)
    except BaseException:
        socket.close()
        raise
    return socket


async def serve_zap(socket: zmq.asyncio.Socket) -> None:
    """Answer ZAP requests on ``socket``: allow any CURVE key, name the user by it.

    Runs until cancelled, then closes ``socket``.
    """
    try:
        while True:
            request = await socket.recv_multipart()
            # [version, request id, domain, address, identity, mechanism, *credentials]
            version, request_id = request[0], request[1]
            mechanism = request[5] if len(request) > 5 else b""
            if mechanism == b"CURVE" and len(request) == 7 and len(request[6]) == 32:
                user_id = zmq.utils.z85.encode(request[6])
                reply = [version, request_id, b"200", b"OK", user_id, b""]
            else:
                reply = [version, request_id, b"400", b"CURVE required", b"", b""]
            await socket.send_multipart(reply)
    finally:
        socket.close(linger=0)
