"""A SIGKILLed peer takes its DHT process and p2p daemon with it (no orphans left running)."""

import os
import signal
import subprocess
import sys

import pytest

from tests.harness import wait_until_sync

pytestmark = pytest.mark.timeout(120)

PEER = """
import time
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity
dht = SwarmDHT(Identity.generate(), DHTConfig(host_maddrs=("/ip4/127.0.0.1/tcp/0",)))
dht.start()
print("ready", flush=True)
time.sleep(600)
"""


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [g for c in children for g in descendants(int(c))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_sigkilled_peer_leaves_no_dht_process_behind():
    peer = subprocess.Popen([sys.executable, "-c", PEER], stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "ready"
        helpers = descendants(peer.pid)
        assert len(helpers) >= 2  # hivemind's DHT process and its p2p daemon
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=10)
        wait_until_sync(  # the kernel delivers the parent-death signals; the helpers then exit
            lambda: [pid for pid in helpers if os.path.exists(f"/proc/{pid}")],
            until=lambda alive: not alive,
            timeout=30,
            what="the DHT helpers to exit after their parent's SIGKILL",
        )
    finally:
        for pid in descendants(peer.pid) if peer.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if peer.poll() is None:
            peer.kill()
