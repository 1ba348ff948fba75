"""Real networks with NAT for tests: Linux network namespaces, veth pairs, nftables masquerade.

``NatLab`` builds a small internet on one machine, removed again on exit (always)::

    with NatLab() as lab:                      # pytest.skip if namespaces cannot be made
        relay = lab.public("relay")            # 10.99.0.N on the "internet"
        home = lab.behind_nat("home")          # 192.168.N.2 behind its own router
        process = home.spawn([python, "-m", "tests.netns_roles", ...])

    namespace <p>wan:  bridge br0, the "internet" (10.99.0.0/24)
       +-- <p>pN (public host):  eth0 10.99.0.N
       +-- <p>rN (router):       eth0 10.99.0.N, lan0 192.168.N.1; nft masquerade out of
                                 eth0, forwards only replies inbound (a home router)
              +-- <p>nN (home):  eth0 192.168.N.2, default route via the router

A lab that a killed run left behind is removed by the next lab (an owner file names the
process that made each lab; labs of live processes stay). Nothing touches the machine's own namespace: every interface is created inside a
namespace of the lab, so all traffic stays within them (and their loopbacks).
Needs root, ``ip`` (iproute2) and ``nft`` (nftables; ``make system-deps`` installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_NAT_RULES = """
table ip nat {
  chain postrouting { type nat hook postrouting priority 100; oifname "eth0" masquerade; }
}
table ip filter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan0" accept
  }
}
"""


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def unavailable_reason() -> str | None:
    """Why network namespaces with NAT cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}` (apt-get install {package}; make system-deps)"
    probe = f"swprobe{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "exec", probe, "nft", "list", "tables")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return f"cannot create network namespaces with nftables here: {error}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def require_namespaces() -> None:
    """Skip the calling test, saying why, where namespaces with NAT cannot be made."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@dataclass
class Host:
    """One machine of the lab: a namespace and the address others see it by."""

    namespace: str
    address: str  # its own address (behind NAT: the private one)
    public_address: str  # what the internet sees (behind NAT: its router's)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def spawn(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in this host (stdout/stderr piped, text); the lab kills it on exit."""
        process = subprocess.Popen(
            self.command(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            **kwargs,
        )
        self.processes.append(process)
        return process


_OWNERS = Path(tempfile.gettempdir()) / "swarm-natlab"
"""One file per lab, named by its prefix, holding the pid of the process that made it."""

_STALE_UNOWNED_SECONDS = 900.0
"""A ``sw*`` namespace with no owner file is stale once this old: no NAT test runs this
long, and the labs of older code (or a run killed between its first namespace and its
owner file) leave no owner file."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(namespace: str) -> bool:
    owner = _OWNERS / namespace[:7]  # "sw" + the lab's five hex digits
    try:
        return not _alive(int(owner.read_text()))
    except (OSError, ValueError):
        pass
    try:
        age = time.time() - (Path("/run/netns") / namespace).stat().st_mtime
    except OSError:
        return False
    return age > _STALE_UNOWNED_SECONDS


def reap_stale_namespaces() -> list[str]:
    """Delete the namespaces (and kill the processes in them) that labs of dead processes left.

    A test run killed outright (SIGKILL, a CI timeout) never reaches ``NatLab.close``;
    its namespaces would pile up. Labs of live processes (a parallel run) are kept.
    Returns the namespaces deleted.
    """
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    names = [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("sw")]
    reaped = [name for name in names if _stale(name)]
    for name in reaped:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    for owner in _OWNERS.glob("sw*") if _OWNERS.is_dir() else ():
        with contextlib.suppress(OSError, ValueError):
            if not _alive(int(owner.read_text())):
                owner.unlink()
    return reaped


class NatLab:
    """A disposable internet of namespaces (see the module doc). Use as a context manager.

    On entry it first reaps what labs of dead processes left (:func:`reap_stale_namespaces`).
    """

    def __init__(self) -> None:
        self.prefix = f"sw{uuid.uuid4().hex[:5]}"
        self.wan = f"{self.prefix}wan"
        self._namespaces: list[str] = []
        self._hosts: list[Host] = []
        self._next = 1

    def __enter__(self) -> NatLab:
        require_namespaces()
        reap_stale_namespaces()
        _OWNERS.mkdir(exist_ok=True)
        (_OWNERS / self.prefix).write_text(str(os.getpid()))  # before the first namespace
        try:
            self._add_namespace(self.wan)
            _run("ip", "-n", self.wan, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.wan, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _attach_to_wan(self, namespace: str, number: int) -> str:
        address = f"10.99.0.{number}"
        port = f"{self.prefix}w{number}"
        _run(
            "ip",
            "-n",
            self.wan,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            namespace,
        )
        _run("ip", "-n", self.wan, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", namespace, "link", "set", "eth0", "up")
        return address

    def public(self, name: str) -> Host:
        """A host with a public address on the lab's internet."""
        number, self._next = self._next, self._next + 1
        namespace = f"{self.prefix}p{number}"
        self._add_namespace(namespace)
        address = self._attach_to_wan(namespace, number)
        host = Host(namespace, address, address)
        self._hosts.append(host)
        return host

    def behind_nat(self, name: str) -> Host:
        """A host behind its own masquerading router: it can dial out, nobody can dial in."""
        number, self._next = self._next, self._next + 1
        router, home = f"{self.prefix}r{number}", f"{self.prefix}n{number}"
        self._add_namespace(router)
        self._add_namespace(home)
        public_address = self._attach_to_wan(router, number)
        _run("ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", home)
        _run("ip", "-n", router, "addr", "add", f"192.168.{number}.1/24", "dev", "lan0")
        _run("ip", "-n", router, "link", "set", "lan0", "up")
        _run("ip", "-n", home, "addr", "add", f"192.168.{number}.2/24", "dev", "eth0")
        _run("ip", "-n", home, "link", "set", "eth0", "up")
        _run("ip", "-n", home, "route", "add", "default", "via", f"192.168.{number}.1")
        _run("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        result = subprocess.run(
            ["ip", "netns", "exec", router, "nft", "-f", "-"],
            input=_NAT_RULES,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"nft rules for {router} failed: {result.stderr.strip()}")
        host = Host(home, f"192.168.{number}.2", public_address)
        self._hosts.append(host)
        return host

    def close(self) -> None:
        """Kill every process the lab's hosts started, then delete every namespace (idempotent)."""
        for host in self._hosts:
            for process in host.processes:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, 9)
                    except ProcessLookupError:
                        pass
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self._hosts.clear()
        for namespace in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        self._namespaces.clear()
        with contextlib.suppress(OSError):
            (_OWNERS / self.prefix).unlink()
