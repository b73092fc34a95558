"""The performance log: format, live visibility, never overwriting, and surviving write errors."""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import shutil
import signal
import time
from io import FileIO
from pathlib import Path

import pytest

from server.event import Event
from server.live import recorder as recorder_module
from server.live.recorder import HEADER, Recorder, RecorderError
from tests.live import OscPeer, start_server

STARTED = time.mktime((2024, 5, 17, 20, 30, 5, 0, 0, -1))  # local time, as in the file name


def test_header_and_rows_in_unix_time(tmp_path: Path) -> None:
    with Recorder(tmp_path / "logs", clock_offset=1_700_000_000.0, started=STARTED) as recorder:
        recorder.record(Event(time=12.5, values=(0.25, 1.0), source="performer"))
        recorder.record(Event(time=13.0000004, values=(0.123456789, 0.0), source="model"))
    assert recorder.path == tmp_path / "logs" / "20240517-203005.csv"
    assert recorder.path.read_text() == (
        "time,source,x,y\n"
        "1700000012.500000,performer,0.250000,1.000000\n"
        "1700000013.000000,model,0.123457,0.000000\n"
    )
    assert recorder.rows == 2


def test_default_offset_maps_monotonic_to_wall_clock(tmp_path: Path) -> None:
    with Recorder(tmp_path) as recorder:
        recorder.record(Event(time=time.monotonic(), values=(0.5, 0.5), source="performer"))
    assert re.fullmatch(r"\d{8}-\d{6}\.csv", recorder.path.name)
    rows = list(csv.DictReader(recorder.path.open()))
    assert abs(float(rows[0]["time"]) - time.time()) < 5.0


def test_each_row_is_visible_to_another_reader_before_close(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    assert recorder.path.read_text() == HEADER
    recorder.record(Event(time=1.0, values=(0.5, 0.5), source="performer"))
    assert recorder.path.read_text().splitlines()[-1] == "1.000000,performer,0.500000,0.500000"
    recorder.close()


def test_never_overwrites_an_existing_log(tmp_path: Path) -> None:
    first = Recorder(tmp_path, started=STARTED)
    first.record(Event(time=1.0, values=(0.0, 0.0), source="model"))
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
    recorder.record(Event(time=1.0, values=(0.5, 0.5), source="model"))
    assert recorder.closed and recorder.path.read_text() == HEADER


class _FlakyFile:
    """A disk that fills up: fails, then writes only part of a row, then recovers (into the real log)."""

    def __init__(self, real: FileIO) -> None:
        self.real = real
        self.script = ["full", "full", 5, "full"]

    def write(self, data: memoryview) -> int:
        step = self.script.pop(0) if self.script else None
        if step == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(data if step is None else data[:step])

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


def test_write_errors_are_logged_once_counted_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    recorder._file = _FlakyFile(recorder._file)  # type: ignore[arg-type]  # simulate the disk filling up
    with caplog.at_level(logging.WARNING, logger="server.live.recorder"):
        for t in range(1, 5):
            recorder.record(Event(time=float(t), values=(0.5, 0.5), source="model"))
    assert recorder.counts() == {"log_rows": 1, "log_lost": 3, "log_errors": 3, "log_reopened": 0}
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    # the half-written row is ended before the next, so every later row parses
    assert recorder.path.read_text() == HEADER + "3.000\n4.000000,model,0.500000,0.500000\n"
    recorder.close()


def _row(t: float) -> Event:
    return Event(time=t, values=(0.5, 0.5), source="performer")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_retried_with_every_row_and_what_it_cost_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    recorder.record(_row(1.0))
    real = recorder._file
    recorder._file = FileIO("/dev/full", "w")  # every write: ENOSPC, as on a full disk
    with caplog.at_level(logging.WARNING, logger="server.live.recorder"):
        for t in (2.0, 3.0, 4.0):
            recorder.record(_row(t))
    assert recorder.counts() == {"log_rows": 1, "log_lost": 3, "log_errors": 3, "log_reopened": 0}
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(recorder.path) in warning.getMessage() and "No space left" in warning.getMessage()
    recorder._file.close()
    recorder._file = real  # space again: the next row goes in
    recorder.record(_row(5.0))
    assert recorder.counts()["log_rows"] == 2 and recorder.counts()["log_lost"] == 3
    assert recorder.path.read_text().splitlines()[1:] == [
        "1.000000,performer,0.500000,0.500000", "5.000000,performer,0.500000,0.500000"]
    recorder.close()


def test_a_deleted_log_folder_is_recreated_with_the_next_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logs = tmp_path / "logs"
    recorder = Recorder(logs, clock_offset=0.0, started=STARTED)
    recorder.record(_row(1.0))
    with caplog.at_level(logging.INFO, logger="server.live.recorder"):
        shutil.rmtree(logs)  # rm -rf while playing
        for t in (2.0, 3.0):
            recorder.record(_row(t))
        assert recorder.path == logs / "20240517-203005.csv"
        assert recorder.path.read_text().splitlines()[1:] == [
            "2.000000,performer,0.500000,0.500000", "3.000000,performer,0.500000,0.500000"]
        recorder.path.unlink()  # and again, the file alone this time
        recorder.record(_row(4.0))
    assert recorder.path.read_text().splitlines()[1:] == ["4.000000,performer,0.500000,0.500000"]
    assert recorder.counts() == {"log_rows": 4, "log_lost": 0, "log_errors": 0, "log_reopened": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "deleted" in warnings[0] and str(recorder.path) in warnings[0]
    recorder.close()


def test_a_log_folder_that_cannot_be_recreated_is_tried_again_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "RECREATE_PAUSE", 0.05)
    logs = tmp_path / "logs"
    recorder = Recorder(logs, clock_offset=0.0)
    shutil.rmtree(logs)
    logs.write_text("a file where the log folder was")
    with caplog.at_level(logging.WARNING, logger="server.live.recorder"):
        for t in (1.0, 2.0, 3.0):
            recorder.record(_row(t))
    assert recorder.counts()["log_lost"] == 3 and recorder.counts()["log_rows"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(logs) in errors[0]
    logs.unlink()
    time.sleep(0.1)
    recorder.record(_row(4.0))
    assert recorder.path.parent == logs and recorder.path.read_text().endswith("4.000000,performer,0.500000,0.500000\n")
    assert recorder.counts()["log_rows"] == 1 and recorder.counts()["log_reopened"] == 1
    recorder.close()


def test_rows_played_after_the_log_folder_is_deleted_are_in_a_recreated_log(tmp_path: Path) -> None:
    """The real server: someone removes the log folder mid-show; what is played afterwards is still logged."""
    logs = tmp_path / "logs"
    peer = OscPeer()
    srv = start_server(logs, "--mode", "listen")
    peer.target = ("127.0.0.1", srv.port)
    try:
        for i in range(5):
            peer.send("/gesture", 0.1, 0.1 + i / 100)
            time.sleep(0.02)
        assert peer.status()["inputs"] == 5
        shutil.rmtree(logs)
        after = [round(0.5 + i / 100, 2) for i in range(20)]
        for x in after:
            peer.send("/gesture", x, 0.5)
            time.sleep(0.02)  # paced like a performer, so none is coalesced
        status = peer.status()
        assert status["inputs"] == 25 and srv.proc.poll() is None
        assert (status["log_rows"], status["log_lost"], status["log_reopened"]) == (25, 0, 1)
    finally:
        assert srv.stop(signal.SIGTERM) == 0
        peer.close()
    assert logs.is_dir(), "the log folder was not recreated"
    rows = [row for log in srv.logs() for row in csv.reader(log.read_text().splitlines()[1:])]
    assert [round(float(r[2]), 2) for r in rows if r[1] == "performer"] == after
    assert "deleted" in "".join(srv.output)
