"""The performance log: format, live visibility, never overwriting, and surviving write errors."""

from __future__ import annotations

import csv
import errno
import logging
import re
import time
from pathlib import Path

import pytest

from server.event import Event
from server.live.recorder import HEADER, Recorder, RecorderError

STARTED = time.mktime((2024, 5, 17, 20, 30, 5, 0, 0, -1))  # local time, as in the file name


def test_header_and_rows_in_unix_time(tmp_path: Path) -> None:
    with Recorder(tmp_path / "logs", clock_offset=1_700_000_000.0, started=STARTED) as recorder:
        recorder.record(Event(time=12.5, x=0.25, y=1.0, source="performer"))
        recorder.record(Event(time=13.0000004, x=0.123456789, y=0.0, source="model"))
    assert recorder.path == tmp_path / "logs" / "20240517-203005.csv"
    assert recorder.path.read_text() == (
        "time,source,x,y\n"
        "1700000012.500000,performer,0.250000,1.000000\n"
        "1700000013.000000,model,0.123457,0.000000\n"
    )
    assert recorder.rows == 2


def test_default_offset_maps_monotonic_to_wall_clock(tmp_path: Path) -> None:
    with Recorder(tmp_path) as recorder:
        recorder.record(Event(time=time.monotonic(), x=0.5, y=0.5, source="performer"))
    assert re.fullmatch(r"\d{8}-\d{6}\.csv", recorder.path.name)
    rows = list(csv.DictReader(recorder.path.open()))
    assert abs(float(rows[0]["time"]) - time.time()) < 5.0


def test_each_row_is_visible_to_another_reader_before_close(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    assert recorder.path.read_text() == HEADER
    recorder.record(Event(time=1.0, x=0.5, y=0.5, source="performer"))
    assert recorder.path.read_text().splitlines()[-1] == "1.000000,performer,0.500000,0.500000"
    recorder.close()


def test_never_overwrites_an_existing_log(tmp_path: Path) -> None:
    first = Recorder(tmp_path, started=STARTED)
    first.record(Event(time=1.0, x=0.0, y=0.0, source="model"))
    second = Recorder(tmp_path, started=STARTED)
    third = Recorder(tmp_path, started=STARTED)
    assert [r.path.name for r in (first, second, third)] == [
        "20240517-203005.csv", "20240517-203005-1.csv", "20240517-203005-2.csv"
    ]
    assert len(first.path.read_text().splitlines()) == 2
    for recorder in (first, second, third):
        recorder.close()


def test_unwritable_log_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(RecorderError, match="--log-dir") as caught:
        Recorder(blocker / "logs")
    assert isinstance(caught.value, OSError)
    assert str(blocker / "logs") in str(caught.value)


def test_close_is_idempotent_and_later_records_are_dropped(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    recorder.close()
    recorder.close()
    recorder.record(Event(time=1.0, x=0.5, y=0.5, source="model"))
    assert recorder.closed and recorder.path.read_text() == HEADER


class _FlakyFile:
    """A disk that fills up: fails, then writes only part of a row, then recovers."""

    def __init__(self) -> None:
        self.data = b""
        self.script = ["full", "full", 5, "full"]

    def write(self, data: memoryview) -> int:
        step = self.script.pop(0) if self.script else None
        if step == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        n = len(data) if step is None else step
        self.data += bytes(data[:n])
        return n

    def close(self) -> None:
        pass


def test_write_errors_are_logged_once_counted_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    flaky = _FlakyFile()
    recorder._file = flaky  # type: ignore[assignment]  # simulate the disk filling up
    with caplog.at_level(logging.ERROR, logger="server.live.recorder"):
        for t in range(1, 5):
            recorder.record(Event(time=float(t), x=0.5, y=0.5, source="model"))
    assert recorder.write_errors == 3 and recorder.rows == 1
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    # the half-written row is ended before the next, so every later row parses
    assert flaky.data == b"3.000\n4.000000,model,0.500000,0.500000\n"
    recorder.close()
