"""What reaches the terminal during a run: basin's own lines and bars; Ray's go to the study folder.

Ray's processes, its C++ core and its driver threads print their own messages (a worker's death
comes with dozens of raylet lines) to the standard output and error they find. During a run file
descriptors 1 and 2 lead to the study folder's ray.log, and Python's sys.stdout and sys.stderr,
which write to them, with them; basin writes its progress bar and its own lines (one where
something Ray reported matters, such as a worker that died) to the terminal stream this module
hands out.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

RAY_LOG = "ray.log"


@contextlib.contextmanager
def others_to(path: Path) -> Iterator[TextIO]:
    """Send what others print (standard output and error) to `path`; yields the stream for basin's
    own output, which still reaches where standard error went before."""
    try:
        on_terminal = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # already captured (a test's capture, say)
        on_terminal = False
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in saved:
        os.dup2(log, fd)
    os.close(log)
    own = os.fdopen(os.dup(saved[2]), "w", buffering=1, errors="backslashreplace")
    try:
        yield own if on_terminal else sys.stderr
    finally:
        own.close()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
