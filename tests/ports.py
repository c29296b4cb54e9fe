"""TCP ports for test services that bind their own sockets (slurmctld, slurmd).

An OS-picked port (bind to 0, close, hand the number on) can be taken before the service binds
it: by the other pytest worker's next pick, or as the ephemeral source port of any outgoing
connection (gloo opens many). These ports come from 10000..19999, below Linux's ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range, 32768.. by default) and below the SLURM job ports
(20000..), and each pytest-xdist worker picks from its own slice, so no other test process picks
them.
"""

from __future__ import annotations

import os
import socket

FIRST_PORT = 10000
PORT_COUNT = 10000


def _worker_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker.removeprefix("gw"))
    width = PORT_COUNT // workers
    return range(FIRST_PORT + index * width, FIRST_PORT + (index + 1) * width)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct ports of this worker's slice that are free now; successive calls (and
    successive processes) start at different places of the slice, so a daemon of an earlier test
    still shutting down does not hold up a later one."""
    ports = _worker_slice()
    start = (os.getpid() * 7919 + int.from_bytes(os.urandom(2), "little")) % len(ports)
    chosen: list[int] = []
    for step in range(len(ports)):
        port = ports[(start + step) % len(ports)]
        if _bindable(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"fewer than {count} free ports in {ports.start}..{ports.stop - 1}")
