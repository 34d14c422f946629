"""``list_ports``: the guest's listening TCP sockets, from ``/proc/net/tcp{,6}`` and fd tables.

Each line of ``/proc/net/tcp`` and ``/proc/net/tcp6`` in state ``0A`` (``LISTEN``) is a
listening socket: its local address and port, and its socket inode. The owning process is
found by reading the ``/proc/PID/fd/*`` links (``socket:[INODE]``) of every process; where a
socket's owner cannot be read (another user's process, a process gone meanwhile) its ``pid``
and ``command`` are ``null``. ``command`` is the process name (``/proc/PID/comm``, as ``ss -p``
shows it), not its command line, which may hold secrets.

Everything here blocks: it runs in the agent's thread pool.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

_LISTEN = "0A"


def _address(hexText: str, family: str) -> str:
    """A ``/proc/net/tcp`` address as text: the kernel prints each 32-bit word in host order."""
    raw = bytes.fromhex(hexText)
    words = b"".join(
        int.from_bytes(raw[i : i + 4], "big").to_bytes(4, "little") for i in range(0, len(raw), 4)
    )
    if family == "ipv4":
        return str(ipaddress.IPv4Address(words))
    return str(ipaddress.IPv6Address(words))


def parseProcNet(text: str, family: str) -> list[tuple[str, int, int]]:
    """The listening sockets of one ``/proc/net/tcp*`` table: ``(host, port, inode)``."""
    result: list[tuple[str, int, int]] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        address, _, port = fields[1].partition(":")
        try:
            result.append((_address(address, family), int(port, 16), int(fields[9])))
        except ValueError:
            continue
    return result


def socketOwners(proc: Path, wanted: set[int]) -> dict[int, int]:
    """Map each socket inode in ``wanted`` to the lowest pid holding it (where readable)."""
    owners: dict[int, int] = {}
    if not wanted:
        return owners
    try:
        pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        return owners
    for pid in pids:
        fdDirectory = proc / str(pid) / "fd"
        try:
            names = os.listdir(fdDirectory)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(fdDirectory / name)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in wanted and inode not in owners:
                    owners[inode] = pid
        if len(owners) == len(wanted):
            break
    return owners


def _command(proc: Path, pid: int) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text(errors="replace").rstrip("\n") or None
    except OSError:
        return None


def listPorts(proc: Path = Path("/proc")) -> dict[str, Any]:
    """The answer of ``list_ports``: every listening TCP socket, sorted by port."""
    sockets: list[tuple[str, int, int, str]] = []
    for table, family in (("tcp", "ipv4"), ("tcp6", "ipv6")):
        try:
            text = (proc / "net" / table).read_text()
        except OSError:
            continue
        sockets += [(host, port, inode, family) for host, port, inode in parseProcNet(text, family)]
    owners = socketOwners(proc, {inode for _, _, inode, _ in sockets if inode})
    ports = []
    for host, port, inode, family in sorted(sockets, key=lambda s: (s[1], s[3], s[0])):
        pid = owners.get(inode)
        ports.append(
            {
                "port": port,
                "host": host,
                "family": family,
                "pid": pid,
                "command": _command(proc, pid) if pid is not None else None,
            }
        )
    return {"ports": ports}
