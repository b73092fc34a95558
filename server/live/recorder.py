"""The performance log: every performer and model event, appended to a CSV as it happens.

One file per run, `<log_dir>/<YYYYmmdd-HHMMSS>.csv` (local time), header
`time,source,x,y`. `time` is Unix seconds: events carry monotonic time, so a
wall-minus-monotonic offset taken at start converts them (a wall-clock jump mid-show
does not reorder the log). Each row is one unbuffered `write`, so a crash loses at
most the row being written and another process can read the log live.
"""

from __future__ import annotations

import logging
import time
from io import FileIO
from pathlib import Path
from types import TracebackType

from server.event import Event

HEADER = "time,source,x,y\n"
_MAX_SUFFIX = 1000

logger = logging.getLogger(__name__)


class RecorderError(OSError):
    """The log file could not be created; the message names the path and what to do."""


class Recorder:
    """Appends events to a new CSV log; a write failure later is logged once and counted, never raised."""

    def __init__(
        self,
        log_dir: Path,
        clock_offset: float | None = None,
        *,
        started: float | None = None,
    ) -> None:
        """Open a new log in `log_dir` (created if missing); never overwrites an existing file.

        `clock_offset` is Unix time minus `time.monotonic()` (measured now if None);
        `started` is the Unix time that names the file (now if None).
        """
        self.clock_offset = time.time() - time.monotonic() if clock_offset is None else clock_offset
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if started is None else started))
        self.rows = 0
        self.write_errors = 0
        self._torn = False  # the file does not end with a newline
        self.path, self._file = _create_log(Path(log_dir), stamp)

    def record(self, event: Event) -> None:
        """Append one event and push it to the OS; on failure log once, count, and carry on."""
        file = self._file
        if file is None:
            return
        line = f"{event.time + self.clock_offset:.6f},{event.source},{event.x:.6f},{event.y:.6f}\n"
        if self._torn:  # a failed write left a half row: end it so this row stays parseable
            line = "\n" + line
        data = memoryview(line.encode("ascii"))
        try:
            while data:
                written = file.write(data)
                if not written:
                    raise OSError("the file accepted no bytes")
                self._torn = data[written - 1] != 0x0A
                data = data[written:]
        except (OSError, ValueError) as exc:
            self._failed(exc)
            return
        self.rows += 1

    def _failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        if self.write_errors == 1:
            logger.error("cannot write performance log %s: %s; events are being lost (further errors only counted)",
                         self.path, exc)

    @property
    def closed(self) -> bool:
        return self._file is None

    def close(self) -> None:
        """Close the file; safe to call more than once."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                self._failed(exc)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _create_log(log_dir: Path, stamp: str) -> tuple[Path, FileIO]:
    """Create `<stamp>.csv`, or `<stamp>-1.csv`, ... if taken (exclusive create: race-free), with its header."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        for n in range(_MAX_SUFFIX):
            path = log_dir / (f"{stamp}.csv" if n == 0 else f"{stamp}-{n}.csv")
            try:
                file = FileIO(path, "x")
            except FileExistsError:
                continue
            try:
                file.write(HEADER.encode("ascii"))
            except OSError:
                file.close()
                raise
            return path, file
        raise FileExistsError(f"{_MAX_SUFFIX} logs named {stamp}*.csv already exist")
    except OSError as exc:
        error = RecorderError(
            f"cannot create a performance log in {log_dir}: {exc.strerror or exc}; "
            "choose a writable directory with --log-dir"
        )
        error.errno = exc.errno
        raise error from exc
