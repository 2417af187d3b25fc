"""The TCP ports a process listens on, read from /proc (Linux): its socket inodes matched against the kernel's
socket tables. For ``meshgate healthcheck``, which must find a server's admin port when its settings cannot say."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6}'s address: 32-bit words in the host's (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening_ports(pid: int) -> list[tuple[str, int]]:
    """(address, port) of each TCP socket ``pid`` listens on, in port order; [] when /proc cannot tell."""
    inodes = _socket_inodes(pid)
    found: set[tuple[str, int]] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN or fields[9] not in inodes:
                continue
            address, _, port = fields[1].partition(":")
            try:
                found.add((_address(address), int(port, 16)))
            except ValueError:
                continue
    return sorted(found, key=lambda item: (item[1], item[0]))
