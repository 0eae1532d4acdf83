"""Machines for tests, made of Linux network namespaces on a private subnet.

:class:`Lab` makes one namespace per "host": the central one holds a bridge with the
subnet's first address, every other host gets a veth pair whose one end is on that
bridge and whose other end is the host's ``eth0``. Every interface is made inside a
namespace (``ip -n``), none in the machine's own, so deleting the namespaces removes
all of them. Processes start through :meth:`Lab.command`: ``ip netns exec`` then
``unshare --mount --uts``, so each host also has its own host name and its own mounts
(bind mounts made there are seen by that host's processes only, as an NFS mount is
seen only on the machine that mounted it).

Names start with :data:`PREFIX` and the pid of the test process that made them; a lab
removes what a previous, crashed run left (its pid gone) before it makes its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

PREFIX = "thymh"
NETNS_DIR = Path("/run/netns")
MOUNT_ROOT = Path("/tmp")  # per run: /tmp/thymh<pid>, mount points only
_CLONE_NEWNET = 0x40000000
_OWNED = re.compile(rf"^{PREFIX}(\d+)-")
T = TypeVar("T")


@dataclass(frozen=True)
class Host:
    name: str  # also its host name inside the namespace
    netns: str
    address: str


@dataclass(frozen=True)
class Mount:
    """``source`` bind-mounted at ``target`` inside a host (read-only if ``readonly``)."""

    source: Path
    target: Path
    readonly: bool = False


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_pids(netns: str) -> list[int]:
    """Every process whose network namespace is ``netns``."""
    done = _run("ip", "netns", "pids", netns, check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def kill_netns_processes(netns: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Send ``sig`` to every process in ``netns``; with SIGKILL, until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig != signal.SIGKILL or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def remove_stale() -> list[str]:
    """Delete the namespaces (and mount folders) of runs whose test process is gone."""
    removed = []
    names = [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line]
    for name in names:
        match = _OWNED.match(name)
        if match and not _alive(int(match.group(1))):
            kill_netns_processes(name)
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    for folder in MOUNT_ROOT.glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)(-.+)?", folder.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def unavailable_reason() -> str | None:
    """Why this machine cannot make the lab (None when it can): tried, not guessed."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare", "mount", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run("ip", "netns", "add", probe)
    except (RuntimeError, OSError) as exc:
        return f"cannot make a network namespace: {exc}"
    try:
        done = _run(
            "ip",
            "netns",
            "exec",
            probe,
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            "hostname probe && mount --bind /tmp /tmp",
            check=False,
        )
        if done.returncode != 0:
            return f"cannot unshare mounts and host names in a namespace: {done.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


class Lab:
    """Hosts on ``subnet``.0/24: ``central`` at .1 (on the bridge), the others from .11."""

    def __init__(self, subnet: str = "10.213.0") -> None:
        remove_stale()
        self.run_id = f"{PREFIX}{os.getpid()}"
        self.subnet = subnet
        self.mount_root = MOUNT_ROOT / self.run_id
        self.mount_root.mkdir(exist_ok=True)
        self.hosts: dict[str, Host] = {}
        self._scratch: list[Path] = []
        self.central = self._namespace("central", f"{subnet}.1")
        _run("ip", "-n", self.central.netns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.central.netns, "addr", "add", f"{subnet}.1/24", "dev", "br0")
        _run("ip", "-n", self.central.netns, "link", "set", "br0", "up")

    def scratch(self, name: str) -> Path:
        """A folder of this run outside pytest's (whose parents only root may enter)."""
        folder = MOUNT_ROOT / f"{self.run_id}-{name}"
        folder.mkdir()
        self._scratch.append(folder)
        return folder

    def _namespace(self, name: str, address: str) -> Host:
        host = Host(name, f"{self.run_id}-{name}", address)
        _run("ip", "netns", "add", host.netns)
        self.hosts[name] = host
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        return host

    def add(self, name: str) -> Host:
        """A host on the bridge, with the next address."""
        host = self._namespace(name, f"{self.subnet}.{10 + len(self.hosts)}")
        side = f"v-{name}"[:15]
        _run(
            "ip",
            "-n",
            self.central.netns,
            "link",
            "add",
            side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.netns,
        )
        _run("ip", "-n", self.central.netns, "link", "set", side, "master", "br0", "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        return host

    def command(
        self,
        host: Host,
        argv: Sequence[str],
        mounts: Sequence[Mount] = (),
        hide: Sequence[Path] = (),
    ) -> list[str]:
        """``argv`` as run on ``host``: its network, its host name, ``mounts`` made first,
        then an empty tmpfs over each folder of ``hide`` (what exists on another machine
        only: a path there that leaks into the database is not found here either)."""
        steps = [f"hostname {shlex.quote(host.name)}"]
        for m in mounts:
            steps.append(f"mount --bind {shlex.quote(str(m.source))} {shlex.quote(str(m.target))}")
            if m.readonly:
                steps.append(f"mount -o remount,bind,ro {shlex.quote(str(m.target))}")
        steps += [f"mount -t tmpfs -o size=1m,ro none {shlex.quote(str(p))}" for p in hide]
        script = " && ".join([*steps, 'exec "$@"'])
        return [
            "ip",
            "netns",
            "exec",
            host.netns,
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            *argv,
        ]

    def run(self, host: Host, argv: Sequence[str], timeout: float = 60) -> str:
        """Run ``argv`` on ``host`` to completion (in its network only); its stdout."""
        done = subprocess.run(
            ["ip", "netns", "exec", host.netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{host.name}: {' '.join(argv)}: {done.stderr[-2000:]}")
        return done.stdout

    def call(self, host: Host, fn: Callable[[], T]) -> T:
        """``fn()`` in a thread that joined ``host``'s network: sockets it opens are there."""
        box: dict[str, object] = {}

        def inside() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_DIR / host.netns, os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=inside, name=f"netns-{host.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    def kill_host(self, host: Host, sig: int = signal.SIGKILL) -> None:
        """Every process on ``host`` at once, as if the machine lost power (SIGKILL)."""
        kill_netns_processes(host.netns, sig)

    def close(self) -> None:
        """Stop every process on every host (TERM, then KILL), delete the namespaces."""
        others = [h for h in self.hosts.values() if h is not self.central]
        for group in (others, [self.central]):
            for host in group:
                kill_netns_processes(host.netns, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(netns_pids(h.netns) for h in group):
                time.sleep(0.2)
            for host in group:
                kill_netns_processes(host.netns, signal.SIGKILL)
        for host in self.hosts.values():
            _run("ip", "netns", "del", host.netns, check=False)
        self.hosts.clear()
        for folder in [self.mount_root, *self._scratch]:
            shutil.rmtree(folder, ignore_errors=True)
