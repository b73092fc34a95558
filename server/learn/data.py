"""Datasets: the `.npz` format, performance logs and training windows.

A dataset is ``events`` float32 ``[N, 3]`` (dt, x, y) plus ``starts`` int64, the index of
each performance's first event. Stored with ``numpy.savez`` and read with
``allow_pickle=False``: nothing pickled is ever written or loaded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


DT_MAX = 5.0  # seconds; the default clip on dt (DESIGN.md)
LOG_HEADER = ("time", "source", "x", "y")


class DatasetError(ValueError):
    """A dataset or log cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Dataset:
    events: np.ndarray  # float32 [N, 3]
    starts: np.ndarray  # int64 [P]

    def __post_init__(self) -> None:
        validate(self.events, self.starts)

    @property
    def performances(self) -> list[np.ndarray]:
        """Each performance's events, in order."""
        bounds = list(self.starts) + [len(self.events)]
        return [self.events[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @classmethod
    def from_performances(cls, perfs: Iterable[np.ndarray]) -> "Dataset":
        perfs = [np.asarray(p, dtype=np.float32).reshape(-1, 3) for p in perfs if len(p) > 0]
        if not perfs:
            raise DatasetError("no events: every performance is empty")
        starts = np.cumsum([0] + [len(p) for p in perfs[:-1]]).astype(np.int64)
        return cls(np.concatenate(perfs).astype(np.float32), starts)

    def subset(self, indices: Iterable[int]) -> "Dataset":
        perfs = self.performances
        return Dataset.from_performances([perfs[i] for i in indices])

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.events, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.starts, dtype="<i8").tobytes())
        return h.hexdigest()


def validate(events: np.ndarray, starts: np.ndarray) -> None:
    """Check shape, dtype, finiteness and ranges; raise DatasetError saying what is wrong."""
    if not isinstance(events, np.ndarray) or events.dtype != np.float32:
        raise DatasetError(f"events must be float32, got {getattr(events, 'dtype', type(events))}")
    if events.ndim != 2 or events.shape[1] != 3:
        raise DatasetError(f"events must have shape [N, 3], got {list(events.shape)}")
    if not isinstance(starts, np.ndarray) or starts.dtype != np.int64 or starts.ndim != 1:
        raise DatasetError("starts must be a 1-D int64 array")
    if len(events) == 0 or len(starts) == 0:
        raise DatasetError("dataset is empty")
    if not np.all(np.isfinite(events)):
        raise DatasetError("events contain NaN or infinite values")
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= len(events):
        raise DatasetError("starts must begin at 0 and strictly increase within the events")
    if np.any(events[:, 0] < 0) or np.any(events[:, 1:] < 0) or np.any(events[:, 1:] > 1):
        raise DatasetError("dt must be >= 0 and x, y in [0, 1]")


def save_dataset(ds: Dataset, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, events=ds.events, starts=ds.starts)
    return path


def load_dataset(path: Path) -> Dataset:
    """Read a dataset `.npz`, refusing pickled objects and malformed arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "events" not in z or "starts" not in z:
                raise DatasetError(f"{path}: needs arrays 'events' and 'starts', has {sorted(z.files)}")
            events, starts = z["events"], z["starts"]
    except DatasetError:
        raise
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable dataset ({e})") from e
    try:
        return Dataset(events, starts)
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from e


# --------------------------------------------------------------------------- performance logs


def read_log(path: Path, dt_max: float = DT_MAX) -> list[np.ndarray]:
    """Read one `logs/*.csv`; returns the performer and model streams as event arrays.

    Each source is its own stream (dt is since the previous event of the same source).
    A truncated or malformed line (e.g. the last line of a log cut by a crash) is skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or tuple(h.strip() for h in header) != LOG_HEADER:
        raise DatasetError(f"{path}: expected header {','.join(LOG_HEADER)}")
    streams: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        if len(row) != 4:
            continue
        try:
            t, x, y = float(row[0]), float(row[2]), float(row[3])
        except ValueError:
            continue
        if not all(math.isfinite(v) for v in (t, x, y)) or row[1] not in ("performer", "model"):
            continue
        streams.setdefault(row[1], []).append((t, min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)))
    out = []
    for source in ("performer", "model"):
        pts = streams.get(source, [])
        if len(pts) < 2:
            continue
        arr = np.asarray(pts, dtype=np.float64)
        dt = np.clip(np.diff(arr[:, 0], prepend=arr[0, 0]), 0.0, dt_max)
        out.append(np.stack([dt, arr[:, 1], arr[:, 2]], axis=1).astype(np.float32))
    return out


def dataset_from_logs(paths: Iterable[Path], dt_max: float = DT_MAX) -> Dataset:
    """Build a dataset from log files and/or folders of them (one performance per stream)."""
    files = list(iter_files(paths, "*.csv"))
    if not files:
        raise DatasetError("no log files found")
    perfs: list[np.ndarray] = []
    for f in files:
        perfs.extend(read_log(f, dt_max))
    if not perfs:
        raise DatasetError("the logs hold no stream with at least two events")
    return Dataset.from_performances(perfs)


# --------------------------------------------------------------------------- training windows


def split_performances(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split by whole performances (never by windows) so validation measures generalisation."""
    n = len(ds.starts)
    if n < 2:
        raise DatasetError("need at least two performances to hold one out for validation")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    return ds.subset(sorted(order[n_val:])), ds.subset(sorted(order[:n_val]))


def windows(perfs: Iterable[np.ndarray], length: int, stride: int) -> np.ndarray:
    """Overlapping windows of ``length + 1`` events (inputs ``[:-1]``, targets ``[1:]``)."""
    out: list[np.ndarray] = []
    for p in perfs:
        for start in range(0, len(p) - length, stride):
            out.append(p[start : start + length + 1])
    if not out:
        raise DatasetError(f"no performance is longer than the window of {length} events")
    return np.stack(out).astype(np.float32)


def iter_files(paths: Iterable[Path], pattern: str) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(p.glob(pattern))
        else:
            yield p
