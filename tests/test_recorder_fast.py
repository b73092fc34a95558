"""The performance log's recovery, in detail: whole rows only, no file left open, the right header, every
failed attempt counted, and the first replacement of a log said louder than the later ones."""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest

from server.event import Event
from server.live import recorder as recorder_module
from server.live.recorder import HEADER, VOICE_HEADER, Recorder, RecorderError
from tests.test_lesser import FillingDisk


def performer(t: float, voice: int | None = None) -> Event:
    return Event(time=t, values=(0.5, 0.5), source="performer", voice=voice)


def test_a_row_cut_short_by_a_full_disk_is_taken_back_even_when_it_is_the_last(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    disk = FillingDisk(["all", 20, "full"])  # row 1 fits; row 2: 20 bytes, then the disk is full
    recorder._file = disk  # type: ignore[assignment]
    recorder.record(performer(1.0))
    recorder.record(performer(2.0))
    assert disk.text() == HEADER + "1.000000,performer,0.500000,0.500000\n"
    assert recorder.counts()["log_lost"] == 1


def test_a_log_replaced_after_it_was_deleted_is_closed_not_left_to_the_garbage_collector(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "logs", clock_offset=0.0)
    recorder.record(performer(1.0))
    gc.collect()  # what earlier tests left unclosed is collected now, not counted below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(2, 6):
            recorder.path.unlink()
            recorder.record(performer(float(t)))
        gc.collect()
    assert recorder.counts()["log_reopened"] == 4 and recorder.counts()["log_lost"] == 0
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning) and str(tmp_path) in str(w.message)]
    assert not unclosed  # "unclosed file <...csv>": one of its logs was left open
    recorder.close()


def test_a_recreated_log_of_voices_keeps_the_voice_column(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    recorder = Recorder(logs, clock_offset=0.0, voices=True)
    recorder.record(performer(1.0, voice=2))
    shutil.rmtree(logs)
    recorder.record(performer(2.0, voice=3))
    assert recorder.path.read_text() == VOICE_HEADER + "2.000000,performer,0.500000,0.500000,3\n"
    recorder.close()


def _blocked(tmp_path: Path) -> tuple[Recorder, Path]:
    """A recorder whose log folder was replaced by a file: no log can be created until it is removed."""
    logs = tmp_path / "logs"
    recorder = Recorder(logs, clock_offset=0.0)
    shutil.rmtree(logs)
    logs.write_text("a file where the log folder was")
    return recorder, logs


@pytest.mark.parametrize("pause, attempts", [(0.0, 3), (3600.0, 1)])  # every row; once in a pause no test outlasts
def test_a_log_that_cannot_be_recreated_is_tried_once_a_pause_and_each_failure_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pause: float, attempts: int) -> None:
    monkeypatch.setattr(recorder_module, "RECREATE_PAUSE", pause)
    recorder, _ = _blocked(tmp_path)
    for t in (1.0, 2.0, 3.0):
        recorder.record(performer(t))
    assert recorder.counts() == {"log_rows": 0, "log_lost": 3, "log_errors": attempts, "log_reopened": 0}


def test_the_first_replacement_of_a_log_is_a_warning_and_later_ones_are_info(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    with caplog.at_level(logging.INFO, logger="server.live.recorder"):
        for t in (1.0, 2.0, 3.0):
            recorder.path.unlink()
            recorder.record(performer(t))
    levels = [r.levelno for r in caplog.records if "continuing in" in r.getMessage()]
    assert levels == [logging.WARNING, logging.INFO, logging.INFO]
    recorder.close()


def test_a_replaced_log_on_a_file_system_that_counts_no_links_keeps_its_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems report 0 links for every file: a deleted log cannot be told there, so rows are kept."""
    real_fstat = os.fstat
    logs = tmp_path / "logs"

    class NoLinks:
        def __init__(self, result: os.stat_result) -> None:
            self._result = result
            self.st_nlink = 0

        def __getattr__(self, name: str) -> object:
            return getattr(self._result, name)

    def fstat(fd: int) -> object:
        result = real_fstat(fd)
        return NoLinks(result) if os.readlink(f"/proc/self/fd/{fd}").startswith(str(logs)) else result

    monkeypatch.setattr(recorder_module, "RECREATE_PAUSE", 0.0)
    monkeypatch.setattr(os, "fstat", fstat)
    recorder = Recorder(logs, clock_offset=0.0)
    recorder.record(performer(1.0))

    class Broken:
        def write(self, data: memoryview) -> int:
            raise OSError(errno.EIO, "Input/output error")  # the disk went away: a new log is started

        def fileno(self) -> int:
            raise OSError(errno.EIO, "Input/output error")

        def close(self) -> None:
            pass

    recorder._file = Broken()  # type: ignore[assignment]
    for t in (2.0, 3.0, 4.0):
        recorder.record(performer(t))
    monkeypatch.undo()
    assert recorder.counts() == {"log_rows": 3, "log_lost": 1, "log_errors": 1, "log_reopened": 1}
    assert recorder.path.read_text().splitlines()[1:] == [f"{t:.6f},performer,0.500000,0.500000" for t in (3.0, 4.0)]
    recorder.close()


class ClosesBadly:
    """The log file on a disk that fails as it is closed (an NFS server gone, say); writes may fail too."""

    def __init__(self, real, writes: bool = True) -> None:
        self.real, self.writes = real, writes

    def write(self, data: memoryview) -> int:
        if not self.writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(data)

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()
        raise OSError(errno.EIO, "Input/output error")


def test_a_log_that_fails_to_close_is_counted_and_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    recorder._file = ClosesBadly(recorder._file)  # type: ignore[assignment]
    recorder.record(performer(1.0))
    with caplog.at_level(logging.WARNING, logger="server.live.recorder"):
        recorder.close()
    assert recorder.closed and recorder.counts() == {"log_rows": 1, "log_lost": 0, "log_errors": 1, "log_reopened": 0}
    (error,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert error.levelno == logging.ERROR
    assert error.getMessage().startswith(f"cannot close performance log {recorder.path}: [Errno 5] Input/output error")


def test_a_failed_close_after_failed_writes_is_counted_but_not_said_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    recorder._file = ClosesBadly(recorder._file, writes=False)  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="server.live.recorder"):
        recorder.record(performer(1.0))  # a full disk: said once
        recorder.close()
    assert recorder.counts() == {"log_rows": 0, "log_lost": 1, "log_errors": 2, "log_reopened": 0}
    (error,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert error.getMessage().startswith("cannot write performance log")


def _stuck(script: list) -> FillingDisk:
    disk = FillingDisk(script)
    disk.truncatable = False  # a half row cannot be taken back: it is ended with a newline instead
    return disk


def row_of(t: float) -> str:
    return f"{t:.6f},performer,0.500000,0.500000\n"


@pytest.mark.parametrize("second, kept", [(1, "\n"), (2, "\n2")], ids=["then-its-end", "then-its-end-and-a-digit"])
def test_a_half_row_that_cannot_be_cut_is_ended_exactly_once(tmp_path: Path, second: int, kept: str) -> None:
    """Row 1 leaves 7 bytes; row 2 (which begins by ending it) leaves ``second`` bytes: row 3 starts a line of
    its own, with no empty line before it."""
    recorder = Recorder(tmp_path, clock_offset=0.0)
    disk = _stuck([7, "full", second, "full"])
    recorder._file = disk  # type: ignore[assignment]
    for t in (1.0, 2.0, 3.0):
        recorder.record(performer(t))
    torn = "" if kept.endswith("\n") else "\n"
    assert disk.text() == HEADER + row_of(1.0)[:7] + kept + torn + row_of(3.0)
    assert recorder.counts()["log_rows"] == 1 and recorder.counts()["log_lost"] == 2


def test_a_log_closed_under_the_recorder_is_let_go_like_a_broken_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing to a closed file raises ValueError, not OSError: the row is lost and counted, the log let go."""
    monkeypatch.setattr(recorder_module, "RECREATE_PAUSE", 3600.0)  # no new log within this test
    recorder = Recorder(tmp_path, clock_offset=0.0)
    recorder.record(performer(1.0))
    recorder._file.close()  # type: ignore[union-attr]
    recorder.record(performer(2.0))
    recorder.record(performer(3.0))
    assert recorder.counts() == {"log_rows": 1, "log_lost": 2, "log_errors": 1, "log_reopened": 0}
    assert recorder.path.read_text() == HEADER + row_of(1.0)


def test_a_voices_log_leaves_the_voice_empty_for_an_event_of_no_voice(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0, voices=True)
    recorder.record(performer(1.0))
    recorder.close()
    assert recorder.path.read_text() == VOICE_HEADER + "1.000000,performer,0.500000,0.500000,\n"


def test_a_row_is_tried_in_at_most_one_new_log_when_logs_vanish_as_fast_as_they_are_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cleanup job that deletes each log right after its first row: a row is tried in the log it met and in one
    new log, then counted lost: a row never starts more than one new file (here 1 for row 1, 2 for row 2)."""
    real_fstat = os.fstat
    logs = tmp_path / "logs"
    seen: dict[tuple[int, int], int] = {}

    class Gone:
        def __init__(self, result: os.stat_result) -> None:
            self._result, self.st_nlink = result, 0

        def __getattr__(self, name: str) -> object:
            return getattr(self._result, name)

    def fstat(fd: int) -> object:
        result = real_fstat(fd)
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(logs)):
            return result
        key = (result.st_dev, result.st_ino)
        seen[key] = seen.get(key, 0) + 1
        return result if seen[key] == 1 else Gone(result)  # linked when made, gone by its first row

    monkeypatch.setattr(os, "fstat", fstat)
    recorder = Recorder(logs, clock_offset=0.0)
    for t in (1.0, 2.0):
        recorder.record(performer(t))
    monkeypatch.undo()
    assert recorder.counts() == {"log_rows": 0, "log_lost": 2, "log_errors": 0, "log_reopened": 3}
    recorder.close()


def test_a_new_log_is_open_until_closed(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    assert recorder.closed is False
    recorder.close()
    assert recorder.closed is True


def test_a_log_folder_is_made_with_every_missing_parent(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "shows" / "2024" / "logs", clock_offset=0.0)
    recorder.record(performer(1.0))
    recorder.close()
    assert recorder.path.parent == tmp_path / "shows" / "2024" / "logs"


def test_a_log_that_cannot_be_made_says_why_in_a_line_and_keeps_the_errno(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(RecorderError) as caught:
        Recorder(blocker / "logs")
    assert str(caught.value) == (f"cannot create a performance log in {blocker / 'logs'}: Not a directory; "
                                 "choose a writable directory with --log-dir")
    assert caught.value.errno == errno.ENOTDIR


def test_a_log_folder_name_the_system_refuses_outright_is_the_same_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecorderError, match="--log-dir") as caught:
        Recorder(tmp_path / "a\0b")  # a NUL byte: ValueError from the system call, not OSError
    assert caught.value.errno is None


def test_when_every_log_name_of_that_second_is_taken_the_error_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "_MAX_SUFFIX", 2)
    first = Recorder(tmp_path, started=1.0e9)
    second = Recorder(tmp_path, started=1.0e9)
    with pytest.raises(RecorderError) as caught:
        Recorder(tmp_path, started=1.0e9)
    assert f"2 logs named {first.path.stem}*.csv already exist" in str(caught.value)
    first.close(), second.close()


def test_a_model_of_another_width_starts_a_new_log_with_its_columns_and_keeps_the_old_one(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, clock_offset=0.0)
    recorder.record(performer(1.0))
    first = recorder.path
    recorder.retune(3)
    recorder.record(Event(time=2.0, values=(0.1, 0.2, 0.3), source="performer"))
    recorder.retune(3)  # the same width again: the same log
    recorder.record(Event(time=3.0, values=(0.4, 0.5, 0.6), source="model"))
    recorder.close()
    assert recorder.path != first
    assert first.read_text() == HEADER + "1.000000,performer,0.500000,0.500000\n"
    assert recorder.path.read_text() == ("time,source,v1,v2,v3\n2.000000,performer,0.100000,0.200000,0.300000\n"
                                         "3.000000,model,0.400000,0.500000,0.600000\n")
