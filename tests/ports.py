"""Ports for the listeners of hubs the tests start as processes.

A port taken from the kernel's ephemeral range (``bind(0)``) is free when asked for but not
reserved: a hub's database child, started later with a port of its own from the same range,
can be given the very number the hub is about to listen on (seen once in CI: a hub relaunched
after a crash waited 10 s for the old database, its new database took the hub's HTTP port, and
the hub failed with "address already in use"). A real hub listens on configured ports outside
that range; so do these, picked below it and never handed out twice in one run.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 20_000
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def listener_port() -> int:
    """A free loopback port below the ephemeral range, not given before in this run."""
    high = max(_ephemeral_low(), _LOWEST + 1_000)
    for _ in range(1_000):
        port = random.randrange(_LOWEST, high)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {_LOWEST}-{high}")
