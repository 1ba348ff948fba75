"""libp2p multiaddrs as the data plane uses them: which peer an address names, what to dial.

An address is one or more multiaddrs, comma-separated, each ending in ``/p2p/<peer id>``
(after any relay hops: ``/ip4/R/tcp/P/p2p/<relay>/p2p-circuit/p2p/<peer>``); a bare
``/p2p/<peer id>`` leaves the dialling to the daemon's peer store.
"""

from __future__ import annotations

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from transport.errors import ConfigurationError


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_P2P_CODE = 421


class DaemonMaddr:
    """A multiaddr in the binary form p2pd parses.

    hivemind's ``Multiaddr.to_bytes`` writes a ``/p2p/<id>`` component as a CID, which
    the Go daemon rejects ("length greater than remaining number of bytes"): relay
    addresses (``.../p2p/<relay>/p2p-circuit``) could not be dialled. Here ``/p2p/``
    values are written as the raw multihash, everything else by hivemind's encoder.
    """

    def __init__(self, text: str):
        self.text = text
        parts = text.strip("/").split("/")
        encoded = bytearray()
        chunk: list[str] = []
        index = 0
        while index < len(parts):
            if parts[index] == "p2p" and index + 1 < len(parts):
                if chunk:
                    encoded += Multiaddr("/" + "/".join(chunk)).to_bytes()
                    chunk = []
                multihash = PeerID.from_base58(parts[index + 1]).to_bytes()
                encoded += _varint(_P2P_CODE) + _varint(len(multihash)) + multihash
                index += 2
            else:
                chunk.append(parts[index])
                index += 1
        if chunk:
            encoded += Multiaddr("/" + "/".join(chunk)).to_bytes()
        self._bytes = bytes(encoded)

    def to_bytes(self) -> bytes:
        return self._bytes

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"DaemonMaddr({self.text!r})"


def split_address(address: str) -> tuple[PeerID | None, list[DaemonMaddr]]:
    """The peer id an address names (None if none) and the transport parts to dial.

    Raises:
        ConfigurationError: not a multiaddr list.
    """
    named: PeerID | None = None
    dial: list[DaemonMaddr] = []
    for text in filter(None, (part.strip() for part in address.split(","))):
        parts = text.rstrip("/").split("/")
        try:
            if len(parts) >= 3 and parts[-2] == "p2p":  # the target is the last /p2p/ (after any relay)
                peer = PeerID.from_base58(parts[-1])
                named = named or peer
                if len(parts) == 3:
                    continue  # a bare peer id: the peer store knows where
                parts = parts[:-2]
            dial.append(DaemonMaddr("/".join(parts)))
        except Exception as error:  # multiaddr and base58 raise several unrelated classes
            raise ConfigurationError(f"{text!r} is not a libp2p multiaddr: {error}") from None
    return named, dial
