"""Fate-sharing for a local Ray: when the driver that started it dies, its Ray processes go too.

A driver that starts its own Ray (`ray.init(address="local")`) owns a GCS, a raylet and the raylet's
agents. `ray.shutdown()` stops them on a normal exit, but a SIGKILLed driver (the OOM killer, a
`kill -9`) leaves `ray::DashboardAgent` and `ray::RuntimeEnvAgent` running as orphans. The reaper is
a small process started beside the driver (`start(os.getpid())`): it remembers the driver's
descendants while the driver lives, and when the driver is gone it kills those still alive (matched
by PID and start time, so a reused PID is never touched).

Run as `python -m raycompress.distributed.reaper DRIVER_PID`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 1.0


def start(driver_pid: int) -> subprocess.Popen:
    """Start the reaper for `driver_pid` in its own session (a signal to the driver's process
    group does not reach it), with no stdin/stdout."""
    return subprocess.Popen([sys.executable, "-m", "raycompress.distributed.reaper", str(driver_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)


def watch(driver_pid: int, poll_s: float = POLL_S) -> list[int]:
    """Remember the driver's descendants until it exits; then kill the remembered ones still alive.
    Returns the PIDs killed."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    known: dict[int, float] = {}
    me = os.getpid()
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    known.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    killed = []
    for pid, created in known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                proc.kill()
                killed.append(pid)
        except psutil.NoSuchProcess:
            continue
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
