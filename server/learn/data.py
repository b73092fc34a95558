"""Datasets: the `.npz` format, performance logs and training windows.

A dataset is ``events`` float32 ``[n, 1 + N]`` (dt, then N values: x and y by default,
N from 1 to 16) plus ``starts`` int64, the index of each performance's first event.
Stored with ``numpy.savez`` and read with ``allow_pickle=False``: nothing pickled is
ever written or loaded here (IMPSY's pickled datasets are read by `server.learn.impsy`).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import secrets
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from server.model.dims import MAX_VALUES, MIN_VALUES, value_names

log = logging.getLogger(__name__)

DT_MAX = 5.0  # seconds; the default clip on dt (DESIGN.md)
LOG_FIELDS = ("time", "source")  # then a column per value (`value_names`), and `voice` with per-sender voices
LOG_HEADER = (*LOG_FIELDS, *value_names(2))  # today's logs: time,source,x,y
MAX_LOG_LINE = 65_536  # characters; a row of ours is under 60 with two values, 400 with 16 (csv's field limit: 131,072)
_NPZ_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy arrays
_NPY_MAGIC = b"\x93NUMPY"


class DatasetError(ValueError):
    """A dataset or log cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Dataset:
    events: np.ndarray  # float32 [n, 1 + N]: dt, then N values
    starts: np.ndarray  # int64 [P]

    def __post_init__(self) -> None:
        validate(self.events, self.starts)

    @property
    def values(self) -> int:
        """N: the values after dt in each event (the model trained on it takes as many)."""
        return int(self.events.shape[1]) - 1

    @property
    def performances(self) -> list[np.ndarray]:
        """Each performance's events, in order."""
        bounds = list(self.starts) + [len(self.events)]
        return [self.events[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @classmethod
    def from_performances(cls, perfs: Iterable[np.ndarray]) -> "Dataset":
        """Performances ``[n, 1 + N]`` of one width (empty ones left out) as one dataset."""
        perfs = [np.asarray(p, dtype=np.float32) for p in perfs if len(p) > 0]
        if not perfs:
            raise DatasetError("no events: every performance is empty")
        widths = sorted({p.shape[1] if p.ndim == 2 else -1 for p in perfs})
        if len(widths) > 1 or widths[0] < 0:
            shown = ", ".join("not a table" if w < 0 else f"dt + {w - 1}" for w in widths)
            raise DatasetError(f"performances differ in their values per event ({shown}); "
                               "a dataset holds one kind of event")
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
    if events.ndim != 2 or not MIN_VALUES + 1 <= events.shape[1] <= MAX_VALUES + 1:
        raise DatasetError(f"events must have shape [n, 1 + N] (dt, then N = {MIN_VALUES} to {MAX_VALUES} values), "
                           f"got {list(events.shape)}")
    if not isinstance(starts, np.ndarray) or starts.dtype != np.int64 or starts.ndim != 1:
        raise DatasetError("starts must be a 1-D int64 array")
    if len(events) == 0 or len(starts) == 0:
        raise DatasetError("dataset is empty")
    if not np.all(np.isfinite(events)):
        raise DatasetError("events contain NaN or infinite values")
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= len(events):
        raise DatasetError("starts must begin at 0 and strictly increase within the events")
    if np.any(events[:, 0] < 0) or np.any(events[:, 1:] < 0) or np.any(events[:, 1:] > 1):
        raise DatasetError("dt must be >= 0 and every value in [0, 1]")


def save_dataset(ds: Dataset, path: Path) -> Path:
    """Write `ds` to `path` whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # umask permissions, unlike mkstemp
        try:
            with open(tmp, "xb") as f:
                write_npz(f, {"events": ds.events, "starts": ds.starts})
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot write the dataset ({getattr(e, 'strerror', None) or e})") from None
    return path


def write_npz(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """``numpy.savez`` with a fixed date in the zip: the same arrays give the same bytes (reproducible datasets)."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(array), allow_pickle=False)


def load_dataset(path: Path) -> Dataset:
    """Read a dataset `.npz`, refusing pickled objects, other files and malformed arrays."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(len(_NPY_MAGIC))
            if not magic.startswith(_NPZ_MAGIC):
                raise DatasetError(f"{path}: not a dataset .npz: {_what_file(magic)}; "
                                   "make one with antiphon dataset or antiphon synth")
            f.seek(0)
            with np.load(f, allow_pickle=False) as z:
                if "events" not in z or "starts" not in z:
                    raise DatasetError(f"{path}: needs arrays 'events' and 'starts', has {sorted(z.files)}")
                events, starts = z["events"], z["starts"]
    except DatasetError:
        raise
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder; give a dataset .npz file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError, MemoryError) as e:
        raise DatasetError(f"{path}: damaged or not a dataset .npz ({type(e).__name__}: {e})") from None
    try:
        return Dataset(events, starts)
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from e


def _what_file(magic: bytes) -> str:
    if not magic:
        return "the file is empty"
    if magic.startswith(_NPY_MAGIC):
        return "it is a single .npy array (numpy.save), not an .npz with arrays 'events' and 'starts'"
    return "it is not a zip archive of arrays"


# --------------------------------------------------------------------------- performance logs


def read_log(path: Path, dt_max: float = DT_MAX) -> list[np.ndarray]:
    """Read one `logs/*.csv`; returns the performer and model streams (those of two events or more)."""
    return list(read_log_streams(path, dt_max).values())


def read_log_streams(path: Path, dt_max: float = DT_MAX, until: float | None = None) -> dict[str, np.ndarray]:
    """Read one `logs/*.csv` into event arrays ``[n, 1 + N]`` by source (`performer`, `model`; two events or more).

    The header names the values: ``time,source,x,y`` (today's), or a column per value
    (`value_names`: ``x`` for one, ``v1 .. vN`` for three or more), then ``voice`` if any.

    ``until`` (Unix seconds) keeps only the rows logged up to then: what a session had
    played when `/learn` was asked, not what came while the fine-tune was starting.

    Each source is its own stream (dt is since the previous event of the same source);
    in a log with a `voice` column (voices per-sender) each voice's too, keyed
    `performer.<n>` / `model.<n>`.
    Lines are read one by one, so a damaged line (a torn row, a stray quote) costs only
    itself: it is skipped with a warning naming the line. A torn last line, what a crash
    leaves, is skipped silently. A line too long to be a row means the file is not a
    log, and is an error.
    """
    path = Path(path)
    streams: dict[str, list[tuple[float, ...]]] = {}
    skipped: list[int] = []
    try:
        with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
            lines = _log_lines(f, path)
            first = next(lines, None)
            if first is None:
                raise DatasetError(f"{path}: the file is empty; a performance log starts with {','.join(LOG_HEADER)}")
            header = _fields(first[1])
            values = log_values(header)
            if values is None:
                raise DatasetError(f"{path}: expected header {','.join(LOG_HEADER)} (or a column per value: "
                                   f"{','.join((*LOG_FIELDS, *value_names(3)))}, ...), found {first[1][:60].strip()!r}")
            width = len(header)
            for number, line in lines:
                row = _log_row(line, width, values)
                if row is not None:
                    t, source, *vs = row
                    if until is not None and t > until:
                        continue
                    streams.setdefault(source, []).append((t, *(min(max(v, 0.0), 1.0) for v in vs)))
                elif line.strip() and line.endswith(("\n", "\r")):  # blank lines and a torn last row are no loss
                    skipped.append(number)
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not a log") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        log.warning("%s: skipped %d malformed line(s) (line %s)", path, len(skipped), shown)
    out: dict[str, np.ndarray] = {}
    for source, pts in sorted(streams.items(), key=_stream_order):
        if len(pts) < 2:
            continue
        arr = np.asarray(pts, dtype=np.float64)
        dt = np.clip(np.diff(arr[:, 0], prepend=arr[0, 0]), 0.0, dt_max)
        out[source] = np.column_stack([dt, arr[:, 1:]]).astype(np.float32)
    return out


def log_values(header: list[str]) -> int | None:
    """N, the values per row, of a log header (``time,source,<value names>[,voice]``); None if it is not one."""
    names = header[len(LOG_FIELDS):]
    if names and names[-1] == "voice":
        names = names[:-1]
    if header[: len(LOG_FIELDS)] != list(LOG_FIELDS) or not MIN_VALUES <= len(names) <= MAX_VALUES:
        return None
    return len(names) if names == list(value_names(len(names))) else None


def _stream_order(item: tuple[str, object]) -> tuple[int, int]:
    """performer before model (as logs always read), then voices in number order (no voice first)."""
    base, _, voice = item[0].partition(".")
    return (base != "performer", int(voice) if voice else -1)


def _log_lines(f: IO[str], path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) with its ending; a run of NULs (what a power cut can leave) counts as one line."""
    number = 0
    while line := f.readline(MAX_LOG_LINE + 1):
        number += 1
        while len(line) > MAX_LOG_LINE and not line.endswith(("\n", "\r")):
            if line.strip("\x00"):
                raise DatasetError(
                    f"{path}: line {number} is longer than {MAX_LOG_LINE} characters; "
                    f"not a performance log (rows are {','.join(LOG_HEADER)})"
                )
            line = f.readline(MAX_LOG_LINE + 1) or "\n"
        yield number, line


def _fields(line: str) -> list[str]:
    """The comma-separated fields of one line (quotes as in CSV); [] if it is not one CSV record."""
    text = line.rstrip("\r\n")
    if '"' not in text:
        return [field.strip() for field in text.split(",")]
    try:
        return [field.strip() for field in next(csv.reader([text], strict=True), [])]
    except csv.Error:
        return []


def _log_row(line: str, width: int = 4, values: int = 2) -> tuple | None:
    """(time, source, v1 .. vN) of a well-formed row, else None; a voice column makes the source `performer.<n>`."""
    fields = _fields(line)
    if len(fields) != width or fields[1] not in ("performer", "model"):
        return None
    source = fields[1]
    end = len(LOG_FIELDS) + values
    if width > end and fields[end]:
        if not fields[end].isdigit() or len(fields[end]) > 3:
            return None
        source = f"{source}.{int(fields[end])}"
    try:
        t, vs = float(fields[0]), [float(v) for v in fields[2:end]]
    except ValueError:
        return None
    return (t, source, *vs) if math.isfinite(t) and all(math.isfinite(v) for v in vs) else None


def dataset_from_logs(paths: Iterable[Path], dt_max: float = DT_MAX, include_model: bool = False) -> Dataset:
    """Build a dataset from log files and/or folders of them: the performer's stream of each log.

    The model's own events stay out unless asked for (`include_model`, each log's model
    stream a performance of its own): retraining on your playing must not teach the
    model to imitate itself.
    """
    sources = ("performer", "model") if include_model else ("performer",)
    return Dataset.from_performances(log_streams(paths, sources, dt_max))



def log_streams(paths: Iterable[Path], sources: tuple[str, ...], dt_max: float = DT_MAX,
                until: float | None = None) -> list[np.ndarray]:
    """The streams of `sources` in each log (files and/or folders of them), in order.

    A log named on its own must be readable; one found in a folder that is not (an empty
    file left by a failed start, say) is skipped with a warning, so one bad file does not
    cost the whole folder.
    """
    paths = [Path(p) for p in paths]
    perfs: list[np.ndarray] = []
    found = 0
    for given in paths:
        in_folder = given.is_dir()
        for f in iter_files([given], "*.csv"):
            found += 1
            try:
                streams = read_log_streams(f, dt_max, until)
            except DatasetError as e:
                if not in_folder:
                    raise
                log.warning("skipped %s", e)
                continue
            perfs.extend(stream for key, stream in streams.items() if key.partition(".")[0] in sources)
    if not found:
        raise DatasetError(f"no performance logs (*.csv) in {', '.join(map(str, paths)) or 'no paths'}")
    if not perfs:
        raise DatasetError(f"the {found} log(s) hold no {' or '.join(sources)} stream of at least two events")
    return perfs


# --------------------------------------------------------------------------- validation split


def split_performances(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset, list[int]]:
    """Split by whole performances (never windows), saying which (0-based, in dataset order) were held out.

    A dataset of one performance (a single session) holds out its last part instead.
    """
    n = len(ds.starts)
    if n == 1:  # one long session: its last part is held out, as a performance of its own
        events = ds.events
        if len(events) < 8:
            raise DatasetError(f"one performance of {len(events)} events is too short to train and validate on")
        cut = int(len(events) * (1 - max(val_fraction, 0.1)))
        tail = events[cut:].copy()
        tail[0, 0] = 0.0
        return Dataset.from_performances([events[:cut]]), Dataset.from_performances([tail]), [0]
    held_out = held_out_indices(n, val_fraction, seed)
    kept = set(held_out)
    return ds.subset(i for i in range(n) if i not in kept), ds.subset(held_out), held_out


def held_out_indices(n: int, val_fraction: float, seed: int) -> list[int]:
    """Which of `n` performances (two or more) validation holds out: the same whether the corpus is in memory or in shards."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    return sorted(int(i) for i in order[:n_val])


def iter_files(paths: Iterable[Path], pattern: str) -> Iterator[Path]:
    """Each path given, and the files matching `pattern` directly in each folder given (sorted)."""
    for p in map(Path, paths):
        if p.is_dir():
            try:
                yield from sorted(f for f in p.glob(pattern) if f.is_file())
            except OSError as e:
                raise DatasetError(f"{p}: cannot list the folder ({e.strerror or e})") from None
        else:
            yield p
