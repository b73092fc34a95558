"""Silence the native libraries' start-up chatter (TensorFlow, LiteRT), which Python's logging cannot reach.

TensorFlow prints a CUDA "error" and oneDNN notes on a CPU-only machine, and LiteRT an
XNNPACK line, from C++ straight to file descriptor 2 before any log level applies.
They alarm users and say nothing useful, so the few calls that trigger them run with
fd 2 pointed at the null device. Python exceptions are unaffected: they are raised,
not printed, inside the block.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()  # fd 2 is one per process: one silencer at a time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point fd 2 at the null device for the block (a no-op where fd 2 cannot be duplicated)."""
    with _lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError, AttributeError):
            yield
            return
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
