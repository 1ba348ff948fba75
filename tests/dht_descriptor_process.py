"""A peer whose DHT request's descriptor hand-off fails, as its own process (it exhausts its descriptors).

Run as ``python tests/dht_descriptor_process.py``: starts a one-node ``SwarmDHT`` on
127.0.0.1, opens descriptors until none is left, frees one (each request hands its
future's pipe end and shared state to the DHT process as descriptors: the first of the
hand-offs takes it), publishes, and frees one more a second later: the peer's resource
sharer accepts the DHT process's connection for the second hand-off with it and then
cannot duplicate the descriptor to send. It prints one JSON line: the publish's outcome,
whether the DHT process is alive after every descriptor is back, and a later publish's
outcome.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from swarm.dht import DHTConfig, SwarmDHT
    from swarm.identity import Identity

    dht = SwarmDHT(Identity.generate(), DHTConfig(host_maddrs=("/ip4/127.0.0.1/tcp/0",), request_timeout=10))
    dht.start()
    loop = asyncio.new_event_loop()  # its self-pipe before the descriptors run out

    async def publish(value: int, timeout: float) -> str:
        try:
            await dht.publish("key", value, timeout=timeout)
            return "stored"
        except Exception as error:  # the outcome is the report
            return type(error).__name__

    first = loop.run_until_complete(publish(1, 10))  # the resource sharer's listener starts here
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    os.close(held.pop())
    during = loop.create_task(publish(2, 3))
    loop.run_until_complete(asyncio.sleep(1))  # the DHT process is waiting for the second hand-off
    os.close(held.pop())
    during = loop.run_until_complete(during)
    for descriptor in held:
        os.close(descriptor)
    alive = dht._dht.is_alive()
    after = loop.run_until_complete(publish(3, 10))
    print(json.dumps({"first": first, "during": during, "alive": alive, "after": after}), flush=True)
    os._exit(0)  # no orderly shutdown needed: the DHT process dies with this one


if __name__ == "__main__":
    main()
