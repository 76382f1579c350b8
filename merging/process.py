"""Whether a process on this host still runs: how leftovers of killed runs are told from live
work."""

from __future__ import annotations

import os


def pid_alive(pid: object) -> bool:
    """True when a process with this pid exists on this host (one we may not signal counts too)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
