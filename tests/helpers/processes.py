"""Child processes and loopback ports: stopping a started process group, free and open ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

Escalation = tuple[tuple[signal.Signals, float], ...]  # (signal, seconds to wait for the exit) in order


def stop_process_group(process: subprocess.Popen,
                       escalation: Escalation = ((signal.SIGTERM, 15), (signal.SIGKILL, 15))) -> None:
    """Signal the process's own group (started with ``start_new_session``), escalating while it lives, then
    SIGKILL whatever is left of the group (a child outliving its leader, such as a code server)."""
    for sig, wait in escalation:
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0
