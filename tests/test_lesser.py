"""Issue 21's lesser findings, each at its edge, on a virtual clock (`tests.rig`) or a fake file.

1. Raising `/lookahead` sends the extra events at the rate limit, not at once: a voice
   never hands over more than `max_rate` model events a second (a chord of answers
   aside, which the bucket allows), and answers already waiting are paced, not dropped.
2. An event that cannot leave before its own time is sent plain (no timetag) and
   counted (`untagged` in `/status`), never with a timetag in the past.
3. A full disk loses whole rows of the performance log, never leaves half of one in
   the middle of the file.

As in `test_promises_engine`, the README's numbers are written here, not imported.
"""

from __future__ import annotations

import errno
import io
import os
import random
from io import FileIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.event import Event
from server.live.engine import Settings
from server.live.modes import Mode
from server.live.recorder import HEADER, Recorder
from server.model.predictor import Predictor
from tests.rig import VirtualLoop, build_engine

REPO = Path(__file__).resolve().parents[1]
MAX_RATE = 200  # model events per second per voice, by default
BURST = 8  # "a chord of up to 8 still sounds"
MAX_LOOKAHEAD = 2.0
EPS = 1e-9  # rounding of times near 1,000 s on the virtual clock


@pytest.fixture(scope="module")
def model() -> Predictor:
    return Predictor.load(REPO / "models" / "default")


def engine_for(model: Predictor, mode: Mode, **settings: Any) -> tuple[VirtualLoop, Any, Any]:
    loop = VirtualLoop()
    engine, played = build_engine(loop, model.fork(), Settings(mode=mode, **settings))
    engine.start()
    return loop, engine, played


def sent(played: Any) -> list[tuple[float, Event]]:
    """(loop time handed over, event) for each model event."""
    return [(t, e) for t, e in played.timed() if e.source == "model"]


def most_in_a_second(times: list[float]) -> int:
    """The most of ``times`` in any half-open second [t, t + 1)."""
    t = np.sort(np.asarray(times))
    return int(max(np.searchsorted(t, t + 1.0 - EPS, side="left") - np.arange(len(t)))) if len(t) else 0


# --------------------------------------------------------------------------- 1. raising the lookahead


@pytest.mark.parametrize("before", [0.0, 0.1])
def test_raising_the_lookahead_at_timescale_1e_4_never_sends_more_than_max_rate_a_second(model, before):
    """The finding: `/lookahead 2` at `/timescale 1e-4` sent 1.9 s of look-ahead at once (227 bundles/s)."""
    loop, engine, played = engine_for(model, Mode.GENERATE, timescale=1e-4, lookahead=before)
    loop.advance(1.0)
    engine.set_lookahead(MAX_LOOKAHEAD)
    loop.advance(4.0)
    times = [t for t, _ in sent(played)]
    assert len(times) > 3 * MAX_RATE
    assert min(np.diff(times)) >= 1 / MAX_RATE - EPS  # never two closer than the rate allows
    assert most_in_a_second(times) <= MAX_RATE
    assert engine.status()["late_dropped"] == 0
    # At the rate limit the chain cannot get further ahead: it keeps the lead it had, tagged if it had one.
    after = [(t, e) for t, e in sent(played) if t > 1000.0 + 1.0]
    assert all(e.time > t for t, e in after if e.timetagged)
    assert all(e.timetagged for _, e in after) == (before > 0)
    assert engine.status()["untagged"] == sum(not e.timetagged for _, e in after)


def test_raising_the_lookahead_builds_the_lead_at_the_rate_limit(model):
    """Events further apart than 1/max_rate: the chain catches up with the new lookahead at `max_rate`, then runs
    that far ahead."""
    loop, engine, played = engine_for(model, Mode.GENERATE, timescale=0.2)
    loop.advance(2.0)
    raised = loop.now
    engine.set_lookahead(MAX_LOOKAHEAD)
    loop.advance(10.0)
    out = sent(played)
    times = [t for t, _ in out]
    assert min(np.diff(times)) >= 1 / MAX_RATE - EPS and most_in_a_second(times) <= MAX_RATE
    catching_up = [t for t, _ in out if raised <= t < raised + 0.5]
    assert len(catching_up) > 10  # the extra events did go, at the rate limit...
    assert np.diff(catching_up) == pytest.approx(1 / MAX_RATE, abs=EPS)
    lead = [e.time - t for t, e in out if t > raised + 5.0]
    assert lead and lead == pytest.approx([MAX_LOOKAHEAD] * len(lead), abs=EPS)  # ...until it runs 2 s ahead


def test_raising_the_lookahead_paces_the_waiting_answers_instead_of_dropping_them(model):
    """Answers already waiting leave 1/max_rate apart, each before its time, none dropped to the bucket."""
    loop, engine, played = engine_for(model, Mode.ACCOMPANY, timescale=10.0)
    rng = random.Random(3)
    for _ in range(40):
        engine.perform(rng.random(), rng.random())
        loop.advance(0.0005)
    assert len(played.model()) == 0 and engine.status()["pending"] == 40
    raised = loop.now
    engine.set_lookahead(MAX_LOOKAHEAD)
    loop.advance(60.0)
    status = engine.status()
    assert status["rate_dropped"] == 0 and status["late_dropped"] == 0
    out = sent(played)
    assert len(out) == 40
    assert all(e.timetagged and t < e.time for t, e in out)
    assert min(np.diff([t for t, _ in out])) >= 1 / MAX_RATE - EPS
    assert out[0][0] == raised


@pytest.mark.parametrize("timescale, lookahead", [(1e-4, 0.5), (1e-2, 0.05), (1.0, 2.0)])
def test_generate_sends_at_most_max_rate_a_second_however_the_lookahead_moves(model, timescale, lookahead):
    loop, engine, played = engine_for(model, Mode.GENERATE, timescale=timescale)
    rng = random.Random(7)
    for _ in range(20):
        loop.advance(rng.uniform(0.0, 0.5))
        engine.set_lookahead(rng.choice([0.0, lookahead / 2, lookahead]))
    loop.advance(3.0)
    times = [t for t, _ in sent(played)]
    assert len(times) > 10
    assert min(np.diff(times)) >= 1 / MAX_RATE - EPS and most_in_a_second(times) <= MAX_RATE


# --------------------------------------------------------------------------- 2. never a timetag in the past


def test_an_answer_that_cannot_leave_before_its_time_is_sent_plain_and_counted(model):
    """The finding: in accompany with lookahead 0.5, a bundle arrived 11 ms after its own timetag."""
    loop, engine, played = engine_for(model, Mode.ACCOMPANY, timescale=1e-3, lookahead=0.5)
    engine.perform(0.3, 0.6, at=loop.now - 0.011)  # heard 11 ms after it arrived; its answer is due within 5 ms of it
    ((left, event),) = sent(played)
    assert event.time < left and not event.timetagged
    assert engine.status()["untagged"] == 1
    loop.advance(1.0)
    engine.perform(0.4, 0.6)  # heard as it arrives: its answer leaves before its time, tagged
    (left, event) = sent(played)[-1]
    assert event.time > left and event.timetagged
    assert engine.status()["untagged"] == 1


def test_a_chain_event_that_fires_after_its_time_is_sent_plain_and_counted(model):
    loop, engine, played = engine_for(model, Mode.GENERATE, timescale=1.0, lookahead=0.01)
    pending = engine.voices[0].chain  # its first event, due a wait after the start
    assert pending is not None
    loop.stall(pending.send_at - loop.now + 0.04)  # 40 ms late: played (not dropped), but 30 ms after its time
    loop.advance(0.0)
    late = [(t, e) for t, e in sent(played) if e.time == pending.when]
    assert len(late) == 1
    left, event = late[0]
    assert event.time < left and not event.timetagged
    assert engine.status()["late_dropped"] == 0
    loop.advance(5.0)  # the chain catches up with the clock; whatever else the stall made late went plain too
    assert all(e.time > t for t, e in sent(played) if e.timetagged)
    assert 1 <= engine.status()["untagged"] == sum(not e.timetagged for _, e in sent(played))
    assert sent(played)[-1][1].timetagged


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), lookahead=st.sampled_from([0.001, 0.01, 0.5, 2.0]),
       timescale=st.sampled_from([1e-4, 1e-2, 1.0]), mode=st.sampled_from([Mode.ACCOMPANY, Mode.GENERATE,
                                                                             Mode.RESPOND]))
def test_no_event_is_ever_timetagged_in_the_past(model, seed, lookahead, timescale, mode):
    """Performer events heard up to 40 ms after they arrived, stalls of up to 45 ms, the lookahead and timescale
    moving: every tag is ahead of its send, and every plain event is counted."""
    rng = random.Random(seed)
    loop, engine, played = engine_for(model, mode, timescale=timescale, lookahead=lookahead, threshold=0.05)
    for _ in range(60):
        engine.perform(rng.random(), rng.random(), at=loop.now - rng.choice([0.0, 0.0, rng.uniform(0.0, 0.04)]))
        if rng.random() < 0.2:
            loop.stall(rng.uniform(0.0, 0.045))
        if rng.random() < 0.1:
            engine.set_lookahead(rng.choice([lookahead, lookahead / 2]))  # never 0: every plain event is counted
        if rng.random() < 0.05:
            engine.set_timescale(timescale * rng.choice([0.5, 1.0, 2.0]))
        loop.advance(rng.uniform(0.0, 0.05))
    loop.advance(2.0)
    out = sent(played)
    assert out
    assert all(e.time > t for t, e in out if e.timetagged)
    assert engine.status()["untagged"] == sum(not e.timetagged for _, e in out)


def test_without_lookahead_nothing_is_counted_untagged(model):
    loop, engine, played = engine_for(model, Mode.ACCOMPANY, timescale=1e-3)
    engine.perform(0.3, 0.6, at=loop.now - 0.011)
    loop.advance(1.0)
    assert sent(played) and not any(e.timetagged for _, e in sent(played))
    assert engine.status()["untagged"] == 0


# --------------------------------------------------------------------------- 3. whole rows or none


class FillingDisk:
    """A log file in memory on a disk that fills: each write takes what the script says (all, `n` bytes, or
    ENOSPC), as `write(2)` does: a short write, then ENOSPC on the rest. Seek and truncate work as on a file."""

    def __init__(self, script: list[Any], start: bytes = HEADER.encode()) -> None:
        self.data = bytearray(start)
        self.pos = len(start)
        self.script = list(script)
        self.truncatable = True

    def write(self, data: memoryview) -> int:
        step = self.script.pop(0) if self.script else "all"
        if step == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        n = len(data) if step == "all" else min(step, len(data))
        self.data[self.pos:self.pos + n] = bytes(data[:n])
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: len(self.data)}[whence]
        self.pos = base + offset
        return self.pos

    def truncate(self, size: int | None = None) -> int:
        if not self.truncatable:
            raise OSError(errno.EROFS, "Read-only file system")
        size = self.pos if size is None else size
        del self.data[size:]
        return size

    def fileno(self) -> int:
        raise io.UnsupportedOperation("in memory")

    def close(self) -> None:
        pass

    def text(self) -> str:
        return self.data.decode()


def row(t: float) -> str:
    return f"{t:.6f},model,0.500000,0.500000\n"


def record(recorder: Recorder, t: float) -> bool:
    before = recorder.rows
    recorder.record(Event(time=t, values=(0.5, 0.5), source="model"))
    return recorder.rows == before + 1


def test_a_disk_that_fills_mid_row_loses_that_row_whole(tmp_path):
    """The finding: a full disk left one torn row; the rows after it must not follow half of one."""
    recorder = Recorder(tmp_path, clock_offset=0.0)
    disk = FillingDisk(["all", 7, "full", "all"])  # row 1 fits; row 2: 7 bytes, then the disk is full; row 3 fits
    recorder._file = disk  # type: ignore[assignment]
    assert [record(recorder, t) for t in (1.0, 2.0, 3.0)] == [True, False, True]
    assert disk.text() == HEADER + row(1.0) + row(3.0)
    assert recorder.counts() == {"log_rows": 2, "log_lost": 1, "log_errors": 1, "log_reopened": 0}


class FillingFile(FileIO):
    """The real log file, on a disk that takes 7 bytes of the second row and then is full."""

    script: list[Any] = []

    def write(self, data: Any) -> int:
        step = self.script.pop(0) if self.script else "all"
        if step == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data if step == "all" else data[:step])


def test_the_real_file_is_cut_back_to_the_last_whole_row(tmp_path):
    recorder = Recorder(tmp_path, clock_offset=0.0)
    recorder._file.close()
    recorder._file = FillingFile(recorder.path, "r+")
    recorder._file.script = ["all", 7, "full"]
    recorder._file.seek(0, os.SEEK_END)
    assert [record(recorder, t) for t in (1.0, 2.0, 3.0)] == [True, False, True]
    recorder.close()
    assert recorder.path.read_text() == HEADER + row(1.0) + row(3.0)


def test_short_writes_that_complete_are_one_whole_row(tmp_path):
    recorder = Recorder(tmp_path, clock_offset=0.0)
    disk = FillingDisk([3, 4, 5, "all"])  # a row in four pieces, all accepted: it is written
    recorder._file = disk  # type: ignore[assignment]
    assert record(recorder, 1.0)
    assert disk.text() == HEADER + row(1.0)


def test_a_torn_row_that_cannot_be_cut_is_ended_so_the_next_rows_parse(tmp_path):
    """A file that cannot be truncated keeps the half row, ended by a newline: every later row stays whole."""
    recorder = Recorder(tmp_path, clock_offset=0.0)
    disk = FillingDisk([7, "full"])
    disk.truncatable = False
    recorder._file = disk  # type: ignore[assignment]
    assert [record(recorder, t) for t in (1.0, 2.0, 3.0)] == [False, True, True]
    assert disk.text() == HEADER + row(1.0)[:7] + "\n" + row(2.0) + row(3.0)


@settings(max_examples=200, deadline=None)
@given(script=st.lists(st.one_of(st.just("all"), st.just("full"), st.integers(1, 40)), max_size=60))
def test_whatever_the_disk_does_the_log_is_the_rows_written_each_whole(tmp_path_factory, script):
    recorder = Recorder(tmp_path_factory.mktemp("log"), clock_offset=0.0)
    disk = FillingDisk(script)
    recorder._file = disk  # type: ignore[assignment]
    kept = [t for t in range(1, 21) if record(recorder, float(t))]
    assert disk.text() == HEADER + "".join(row(float(t)) for t in kept)
    assert recorder.rows == len(kept) and recorder.lost == 20 - len(kept)
    recorder.close()
