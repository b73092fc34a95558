"""MIDI files as training data: note onsets -> (dt, x, y) performances.

dt is measured in seconds through the file's tempo map, so a ritardando written as
tempo changes is learned as slower playing. In a type 0/1 file the tempo events of
every track form one map (they usually live in the first track only), applied to each
track; in a type 2 file each track is an independent sequence with its own tempo.
Only onsets count (note_on with velocity > 0): x = pitch/127, y = velocity/127, the
first event of a performance has dt 0 and every dt is clipped to ``dt_max``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable, Iterator

import mido
import numpy as np

from server.learn.data import DT_MAX, DatasetError

MIDI_SUFFIXES = (".mid", ".midi")
DEFAULT_TEMPO = 500_000  # microseconds per beat (120 bpm) until the first set_tempo, per the standard
SMPTE_RATES = (24, 25, 29, 30)  # frames per second a SMPTE division may name (29: 29.97 drop-frame)


class TempoMap:
    """Absolute ticks -> seconds, piecewise linear between tempo changes."""

    def __init__(self, changes: Iterable[tuple[int, int]], ticks_per_beat: int) -> None:
        """``changes``: (absolute tick, microseconds per beat); ``ticks_per_beat`` < 0 means SMPTE timing."""
        if ticks_per_beat == 0:
            raise ValueError("the header's time division is 0")
        points = sorted(changes, key=lambda c: c[0])  # stable: of changes at one tick, the last wins
        ticks = np.array([0] + [t for t, _ in points], dtype=np.float64)
        tempos = np.array([DEFAULT_TEMPO] + [v for _, v in points], dtype=np.float64)
        if ticks_per_beat < 0:
            # SMPTE: high byte is -frames per second, low byte ticks per frame; tempo plays no part.
            fps, per_frame = -(ticks_per_beat >> 8), ticks_per_beat & 0xFF
            if fps not in SMPTE_RATES or per_frame == 0:
                raise ValueError(
                    f"the header's SMPTE time division ({fps} frames per second, {per_frame} ticks per frame) "
                    f"is invalid: frames per second must be one of {', '.join(map(str, SMPTE_RATES))} "
                    "and ticks per frame at least 1"
                )
            ticks, rates = ticks[:1], np.array([1.0 / ((29.97 if fps == 29 else fps) * per_frame)])
        else:
            rates = tempos * 1e-6 / ticks_per_beat  # seconds per tick in each segment
        self._ticks, self._rates = ticks, rates
        self._starts = np.concatenate([[0.0], np.cumsum(np.diff(ticks) * rates[:-1])])

    def seconds(self, ticks: np.ndarray) -> np.ndarray:
        ticks = np.asarray(ticks, dtype=np.float64)
        i = np.searchsorted(self._ticks, ticks, side="right") - 1
        return self._starts[i] + (ticks - self._ticks[i]) * self._rates[i]


def _absolute(track: mido.MidiTrack) -> Iterator[tuple[int, mido.Message]]:
    tick = 0
    for msg in track:
        tick += msg.time
        yield tick, msg


def _tempo_changes(tracks: Iterable[mido.MidiTrack]) -> list[tuple[int, int]]:
    return [(tick, msg.tempo) for track in tracks for tick, msg in _absolute(track) if msg.type == "set_tempo"]


def _onsets(track: mido.MidiTrack) -> list[tuple[int, int, int]]:
    """(absolute tick, pitch, velocity) of each sounding note_on."""
    return [(tick, msg.note, msg.velocity) for tick, msg in _absolute(track) if msg.type == "note_on" and msg.velocity > 0]


def _performance(onsets: list[tuple[int, int, int]], tempo: TempoMap, dt_max: float) -> np.ndarray:
    arr = np.asarray(onsets, dtype=np.float64).reshape(-1, 3)
    t = tempo.seconds(arr[:, 0])
    dt = np.clip(np.diff(t, prepend=t[:1]), 0.0, dt_max)
    return np.stack([dt, arr[:, 1] / 127.0, arr[:, 2] / 127.0], axis=1).astype(np.float32)


def read_midi(path: Path, dt_max: float = DT_MAX, merge_tracks: bool = False) -> list[np.ndarray]:
    """One performance per track with notes (or one per file, merged, with ``merge_tracks``)."""
    path = Path(path)
    try:
        mid = mido.MidiFile(path, clip=True)
        division = mid.ticks_per_beat
        shared = None if mid.type == 2 else TempoMap(_tempo_changes(mid.tracks), division)
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not a MIDI file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    except (EOFError, ValueError, KeyError, IndexError, TypeError, struct.error, MemoryError) as e:
        raise DatasetError(f"{path}: not a readable MIDI file ({e or type(e).__name__})") from None
    per_track = []
    for track in mid.tracks:
        notes = _onsets(track)
        if notes:
            tempo = shared or TempoMap(_tempo_changes([track]), division)
            per_track.append((notes, tempo))
    if merge_tracks and shared is not None:
        merged = sorted((n for notes, _ in per_track for n in notes), key=lambda n: n[0])  # stable
        per_track = [(merged, shared)] if merged else []
    return [_performance(notes, tempo, dt_max) for notes, tempo in per_track]


def midi_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given, plus every .mid/.midi under each folder (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            try:
                out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in MIDI_SUFFIXES and f.is_file()))
            except OSError as e:
                raise DatasetError(f"{p}: cannot list the folder ({e.strerror or e})") from None
        elif p.exists():
            out.append(p)
        else:
            raise DatasetError(f"{p}: no such file or folder")
    return out
