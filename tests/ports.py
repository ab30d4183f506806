"""TCP ports for the tests' servers that nothing else on the machine takes before the test binds them.

The usual trick, ``bind(("127.0.0.1", 0))``, read the port, close, and let a server bind it later, races: the
kernel hands that port out of its *ephemeral* range (``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999
by default), the very range it hands out to every other ``bind(0)`` and to the local end of every outgoing
connection on the machine. Between the close and the server's bind (a subprocess importing for seconds, a
control plane SIGKILLed and restarted on the same port, a module-scoped port bound by a worker much later)
another process, or the other xdist worker, can be given the same port; the test then fails to bind, or
worse, talks to somebody else's server.

:func:`reserved_port` picks a port *below* the ephemeral range instead. The kernel never gives such a port to
``bind(0)`` nor to an outgoing connection, so only a program that names it explicitly can take it. Within
that region each xdist worker (``PYTEST_XDIST_WORKER``: ``gw0``, ``gw1``, ...; ``master`` without xdist) has
a band of its own, so two workers never pick the same port; within its band a worker tries ports in random
order, skips the ones it already handed out (a port picked but not bound yet is free, and must not be handed
out twice), and keeps the first that binds on 127.0.0.1 right now (without ``SO_REUSEADDR``, so a port held
by anything, even a ``TIME_WAIT`` connection, is skipped). A port picked this way stays free until the test
binds it, and stays free while a test restarts its server on it.

What this does not cover: a program outside this test run that binds fixed ports in the band (the bind check
skips those it already holds), and a second pytest session on the same machine (same band names, so only
the bind check and the random order keep them apart).
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading

# The bands lie in FLOOR..CEILING-1: above the usual fixed ports of local services (5432, 6379, 8000, Azurite's
# 10000-10002), below the control plane's reverse-tunnel ports (providers/cloud.py's TUNNEL_PORTS, 20000-32000,
# bound on this machine when a test's stand-in node is this machine), and below the ephemeral range.
FLOOR = 12000
CEILING = 20000
BAND = 500  # ports per xdist worker: master, gw0, ..., gw14 fit
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range

_lock = threading.Lock()
_handed_out: set[int] = set()
_random = random.SystemRandom()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (where ``bind(0)`` and outgoing connections get their ports)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def worker_index() -> int:
    """0 without xdist (``master``), N + 1 for xdist worker ``gwN``."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "master")
    m = re.fullmatch(r"gw(\d+)", name)
    return int(m.group(1)) + 1 if m else 0


def band() -> range | None:
    """This worker's ports, or None when its band does not fit below CEILING and the ephemeral range."""
    start = FLOOR + worker_index() * BAND
    if start + BAND > min(CEILING, ephemeral_range()[0]):
        return None
    return range(start, start + BAND)


def _binds_now(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reserved_port() -> int:
    """A port that binds on 127.0.0.1 now and that nothing but this test run asks for by number (above)."""
    ports = band()
    if ports is None:
        # No band for this worker: the ephemeral range starts too low (a tuned kernel), or more xdist workers
        # than bands. Fall back to the old behaviour, a port the kernel picks from its ephemeral range, which
        # another process can take before the test binds it (the race this module exists to avoid).
        return _ephemeral_port()
    candidates = list(ports)
    _random.shuffle(candidates)  # not the global generator, which a test may have seeded
    with _lock:
        # ports never handed out first; then those handed out before (free again once their tests ended)
        order = [p for p in candidates if p not in _handed_out] + [p for p in candidates if p in _handed_out]
        for port in order:
            if _binds_now(port):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no port of {ports.start}-{ports.stop - 1} binds on 127.0.0.1 (all in use?)")
