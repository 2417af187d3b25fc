"""A process's listening TCP ports, from /proc."""

from __future__ import annotations

import os
import socket

from meshgate.procnet import listening_ports


def test_listening_ports_names_ipv4_and_ipv6_listeners_only() -> None:
    v4 = socket.socket()
    v4.bind(("127.0.0.1", 0))
    v4.listen()
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", 0))
    v6.listen()
    bound_only = socket.socket()
    bound_only.bind(("127.0.0.1", 0))  # not listening
    try:
        found = listening_ports(os.getpid())
        assert ("127.0.0.1", v4.getsockname()[1]) in found
        assert ("::1", v6.getsockname()[1]) in found
        assert all(port != bound_only.getsockname()[1] for _, port in found)
        port = v4.getsockname()[1]
    finally:
        for sock in (v4, v6, bound_only):
            sock.close()
    assert ("127.0.0.1", port) not in listening_ports(os.getpid())  # closed: gone from the table


def test_listening_ports_of_a_process_that_is_gone_is_empty() -> None:
    assert listening_ports(2**22 + 12345) == []  # above pid_max's default: no such process
