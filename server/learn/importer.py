"""MIDI import in parallel processes: a corpus of thousands of files parses on every core.

Workers are started with ``forkserver`` (``spawn`` where there is none), never ``fork``:
a forked copy of a process that has imported TensorFlow can deadlock, and the workers
import only mido and numpy. Results are put back in file order, so ``--jobs 2`` writes
the same dataset as ``--jobs 1``. A file that cannot train is skipped and named, never
fatal: unreadable, empty (no notes at all) or too short (no track of two notes).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

from server.learn.data import DT_MAX, DatasetError
from server.learn.midifile import midi_files, read_midi

SKIP_REASONS = ("unreadable", "empty", "too short")  # why a file may be left out, in the order reported


@dataclass(frozen=True)
class Imported:
    """The performances of the files that could train, in file order, and each skipped file with its reason."""

    performances: list[np.ndarray]
    files: int
    skipped: list[tuple[Path, str, str]]  # (file, reason from SKIP_REASONS, detail)

    def summary(self) -> str:
        """One line: what was read and, by reason, how many files were left out."""
        counts = [f"{sum(1 for _, r, _ in self.skipped if r == reason)} {reason}" for reason in SKIP_REASONS]
        left = f"; skipped {len(self.skipped)} file(s): {', '.join(c for c in counts if not c.startswith('0 '))}"
        return (f"{self.files} MIDI file(s), {len(self.performances)} performance(s) of two notes or more"
                + (left if self.skipped else ""))


def read_one(path: Path, dt_max: float, merge_tracks: bool) -> tuple[list[np.ndarray], str, str]:
    """One file's performances of two notes or more, or ([], reason, detail) saying why it gives none."""
    try:
        perfs = read_midi(path, dt_max, merge_tracks)
    except DatasetError as e:
        return [], "unreadable", str(e)
    if not perfs:
        return [], "empty", f"{path}: no notes"
    kept = [p for p in perfs if len(p) >= 2]
    if not kept:
        return [], "too short", f"{path}: no track of two notes or more"
    return kept, "", ""


def _read_chunk(paths: list[Path], dt_max: float, merge_tracks: bool) -> list[tuple[list[np.ndarray], str, str]]:
    return [read_one(p, dt_max, merge_tracks) for p in paths]


def import_midi(paths: Iterable[Path], dt_max: float = DT_MAX, merge_tracks: bool = False, jobs: int = 1,
                progress: Callable[[int, int, int], None] | None = None) -> Imported:
    """Parse the MIDI files under ``paths`` with ``jobs`` processes; ``progress(done, total, skipped)`` as they finish."""
    paths = [Path(p) for p in paths]
    files = midi_files(paths)
    if not files:
        raise DatasetError(f"no MIDI files (.mid, .midi) in {', '.join(map(str, paths))}")
    perfs: list[np.ndarray] = []
    skipped: list[tuple[Path, str, str]] = []
    for done, (f, (got, reason, detail)) in enumerate(zip(files, _results(files, dt_max, merge_tracks, jobs)), 1):
        perfs.extend(got)
        if reason:
            skipped.append((f, reason, detail))
        if progress is not None:
            progress(done, len(files), len(skipped))
    if not perfs:
        first = skipped[0][2]
        raise DatasetError(f"none of the {len(files)} MIDI file(s) has a track of two notes or more (first: {first})")
    return Imported(perfs, len(files), skipped)


def _results(files: list[Path], dt_max: float, merge_tracks: bool, jobs: int) -> Iterator[tuple]:
    """Each file's result in file order: here with one job, else from a pool in chunks (a few per worker)."""
    if jobs <= 1 or len(files) == 1:
        for f in files:
            yield read_one(f, dt_max, merge_tracks)
        return
    size = max(1, min(32, len(files) // (jobs * 8)))
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    with ProcessPoolExecutor(max_workers=min(jobs, len(chunks)), mp_context=_context()) as pool:
        for chunk in pool.map(_read_chunk, chunks, [dt_max] * len(chunks), [merge_tracks] * len(chunks)):
            yield from chunk


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


class ImportProgress:
    """Files parsed and skipped: a live bar on a terminal, a line every tenth of the files otherwise."""

    def __init__(self, stream: TextIO | None = None, echo: Callable[[str], None] = print) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.echo = echo
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.shown = -1

    def __call__(self, done: int, total: int, skipped: int) -> None:
        text = f"{done}/{total} files, {skipped} skipped, {time.monotonic() - self.start:.1f} s"
        if self.live:
            bar = "#" * (24 * done // total)
            self.stream.write(f"\r[{bar:<24}] {text}" + ("\n" if done == total else ""))
            self.stream.flush()
            return
        tenth = 10 * done // total
        if tenth != self.shown:
            self.shown = tenth
            self.echo(f"parsing MIDI: {text}")
