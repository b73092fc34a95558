"""The performance log: every performer and model event, appended to a CSV as it happens.

One file per run, `<log_dir>/<YYYYmmdd-HHMMSS>.csv` (local time), header
`time,source,x,y` (a column per value: `v1 .. vN` for a model of N values other than
two, `server.model.dims.value_names`). A swap to a model of another width starts a new
log (`retune`), so each log has one width and `/learn` reads the current one. `time` is Unix seconds: events carry monotonic time, so a
wall-minus-monotonic offset taken at start converts them (a wall-clock jump mid-show
does not reorder the log). Each row is one unbuffered `write`, so a crash loses at
most the row being written and another process can read the log live.

Whole rows or none: a write that fails partway through a row (a disk that fills takes
part of it, then refuses the rest) cuts the file back to where the row began, so the
row is lost whole and the next one follows the last whole row. Only a file that cannot
be cut keeps the half row, ended with a newline so every later row still parses.

Nothing is lost without a sign. A log deleted while running (its folder removed, say)
is noticed after the next write (the file has no links left) and replaced by a new
one, with that row in it; a write that fails (disk full) is retried with the next row.
Each kind of trouble is logged once and every lost row is counted (`counts()`, which
`/status` shows), and the show goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from io import FileIO
from pathlib import Path
from types import TracebackType
from typing import Protocol

from server.event import Event
from server.model.dims import DEFAULT_VALUES, value_names


def log_header(values: int = DEFAULT_VALUES, voices: bool = False) -> str:
    """The header of a log of ``values`` values per event (`time,source,x,y` for two), then `voice` per-sender."""
    return ",".join(("time", "source", *value_names(values), *(("voice",) if voices else ()))) + "\n"


HEADER = log_header()
VOICE_HEADER = log_header(voices=True)  # with voices per-sender: each row names its voice
_MAX_SUFFIX = 1000
RECREATE_PAUSE = 1.0  # seconds between attempts to recreate a log that cannot be created now
# A full disk or quota keeps the file: the next row may fit. Anything else means the
# file (or the disk under it) is gone, so the next row goes to a new file.
_KEEP_FILE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e)

logger = logging.getLogger(__name__)


class RecorderError(OSError):
    """The log file could not be created; the message names the path and what to do."""


class LogFile(Protocol):
    """What the recorder needs of a file (a raw, unbuffered `FileIO`)."""

    def write(self, data: memoryview, /) -> int | None: ...

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int: ...

    def truncate(self, size: int | None = None, /) -> int: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class Recorder:
    """Appends events to a new CSV log; trouble later is logged once per kind and counted, never raised."""

    STATUS_KEYS = {
        "log_rows": "events written to the performance log",
        "log_lost": "events that could not be written (a full disk, a vanished folder): nothing is lost silently",
        "log_errors": "write errors met",
        "log_reopened": "times a new log was started because the old one was deleted or failed",
    }

    def __init__(
        self,
        log_dir: Path,
        clock_offset: float | None = None,
        *,
        started: float | None = None,
        voices: bool = False,
        values: int = DEFAULT_VALUES,
    ) -> None:
        """Open a new log in `log_dir` (created if missing); never overwrites an existing file.

        `clock_offset` is Unix time minus `time.monotonic()` (measured now if None);
        `started` is the Unix time that names the file (now if None). With `voices`
        (per-sender) every row ends with its voice's number, so each voice reads back
        as its own stream. `values`: the playing model's N, a column each.
        """
        self._voices = voices
        self._header = log_header(values, voices)
        self._row = _row_format(values)
        self.clock_offset = time.time() - time.monotonic() if clock_offset is None else clock_offset
        self.log_dir = Path(log_dir)
        self._stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if started is None else started))
        self.rows = 0  # rows written
        self.lost = 0  # rows that reached no file
        self.write_errors = 0  # failed writes and failed attempts to recreate the log
        self.reopened = 0  # logs created to replace one that was deleted or broke
        self._warned: set[str] = set()
        self._closed = False
        self._torn = False  # the file does not end with a newline
        self._retry_at = 0.0  # monotonic time before which no new log is attempted
        self._dropped_because = ""
        self.path, file = _create_log(self.log_dir, self._stamp, self._header)
        self._file: LogFile | None = file
        self._links_tell = _link_count(file) != 0  # some file systems report 0 links for every file

    def counts(self) -> dict[str, int]:
        """Counters for `/status`: rows written and lost, errors met, logs recreated."""
        values = (self.rows, self.lost, self.write_errors, self.reopened)
        return dict(zip(self.STATUS_KEYS, values))

    def emit(self, event: Event) -> None:
        """As an engine output (`server.live.outputs.Sink`): every event is recorded."""
        self.record(event)

    def silence(self, voice: int | None) -> None:
        """A log holds no notes: what was played stays written."""

    def record(self, event: Event) -> None:
        """Append one event and push it to the OS; on trouble warn once, count, and carry on."""
        if self._closed:
            return
        voice = f",{event.voice if event.voice is not None else ''}" if self._voices else ""
        row = (self._row % (event.time + self.clock_offset, event.source, *event.values) + voice + "\n").encode("ascii")
        for _ in range(2):  # a second try only into a log that replaces a deleted one
            file = self._file if self._file is not None else self._replace()
            if file is None or not self._write(file, row):
                break
            if not self._links_tell or _link_count(file) != 0:
                self.rows += 1
                return
            self._drop("was deleted while running")
        self.lost += 1

    def retune(self, values: int) -> None:
        """A model of another width plays: later rows go to a new log with a column per value (`values`)."""
        header = log_header(values, self._voices)
        if header == self._header or self._closed:
            return
        self._header, self._row = header, _row_format(values)
        self._drop(f"ended: the model plays {values} values per event now")
        try:
            self.path, file = _create_log(self.log_dir, self._stamp, header)
        except RecorderError:
            return  # the next row tries again, and says why (`_replace`)
        self._file, self._torn, self._links_tell = file, False, _link_count(file) != 0
        logger.info("the model plays %d values per event now: logging to %s", values, self.path)

    def _write(self, file: LogFile, row: bytes) -> bool:
        """Write one row whole, or none of it; on failure count it and warn once, keeping the file only when
        it may recover."""
        data = memoryview(b"\n" + row if self._torn else row)  # end a half row so this one stays parseable
        done = 0
        try:
            while done < len(data):
                written = file.write(data[done:] if done else data)
                if not written:
                    raise OSError(errno.EIO, "the file accepted no bytes")
                done += written
            self._torn = False
        except (OSError, ValueError) as exc:
            if done and not _cut(file, done):  # part of the row went in and cannot be taken back
                self._torn = data[done - 1] != 0x0A
            self.write_errors += 1
            self._warn_once("write", logging.ERROR,
                            "cannot write performance log %s: %s; rows are lost (counted as log_lost) "
                            "until it can be written again", self.path, exc)
            if getattr(exc, "errno", None) not in _KEEP_FILE_ERRNOS:
                self._drop(f"broke ({exc})")
                self._retry_at = time.monotonic() + RECREATE_PAUSE  # never a new file per row
            return False
        return True

    def _drop(self, reason: str) -> None:
        """Let go of a log that is gone or broken; a later row starts a new one and says why."""
        self._dropped_because = reason
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except (OSError, ValueError):
                pass

    def _replace(self) -> LogFile | None:
        """A new log in place of a lost one (its folder recreated too), or None, retried after a pause."""
        if time.monotonic() < self._retry_at:
            return None
        try:
            path, file = _create_log(self.log_dir, self._stamp, self._header)
        except RecorderError as exc:
            self.write_errors += 1
            self._retry_at = time.monotonic() + RECREATE_PAUSE
            self._warn_once("recreate", logging.ERROR, "%s; rows are lost (counted as log_lost) until it can be "
                            "created, tried every %g s", exc, RECREATE_PAUSE)
            return None
        level = logging.INFO if "replaced" in self._warned else logging.WARNING
        self._warned.add("replaced")
        logger.log(level, "performance log %s %s; continuing in %s (later replacements are logged at INFO)",
                   self.path, self._dropped_because, path)
        self.path, self._file, self._torn = path, file, False
        self._links_tell = _link_count(file) != 0
        self.reopened += 1
        return file

    def _warn_once(self, kind: str, level: int, message: str, *args: object) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.log(level, message + " (further such trouble is only counted)", *args)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the file; safe to call more than once."""
        self._closed = True
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                self.write_errors += 1
                self._warn_once("write", logging.ERROR, "cannot close performance log %s: %s", self.path, exc)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _row_format(values: int) -> str:
    """A row's `%` format up to its values (one format per log: cheaper per row than formatting each value)."""
    return "%.6f,%s," + ",".join(["%.6f"] * values)


def _cut(file: LogFile, written: int) -> bool:
    """Take back the last `written` bytes (a row that went in only in part); False if the file cannot be cut."""
    try:
        start = file.seek(0, os.SEEK_CUR) - written
        file.truncate(start)
        file.seek(start)
    except (OSError, ValueError, AttributeError):  # not seekable (a pipe), closed, or a file object without seek
        return False
    return True


def _link_count(file: LogFile) -> int:
    """How many names the open file has; 0 once it was deleted. -1 if it cannot be told."""
    try:
        return os.fstat(file.fileno()).st_nlink
    except (OSError, ValueError, AttributeError):
        return -1


def _create_log(log_dir: Path, stamp: str, header: str = HEADER) -> tuple[Path, FileIO]:
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
                file.write(header.encode("ascii"))
            except OSError:
                file.close()
                raise
            return path, file
        raise FileExistsError(f"{_MAX_SUFFIX} logs named {stamp}*.csv already exist")
    except (OSError, ValueError) as exc:
        error = RecorderError(
            f"cannot create a performance log in {log_dir}: {getattr(exc, 'strerror', None) or exc}; "
            "choose a writable directory with --log-dir"
        )
        error.errno = getattr(exc, "errno", None)
        raise error from exc
