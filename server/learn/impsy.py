"""IMPSY's data comes in: its dataset files (`perfs`, pickled) and its performance logs.

IMPSY (github.com/cpmpercussion/impsy) models ``dimension`` = 1 + N columns, dt first,
as we do. Two formats, learnt from its source (`impsy/dataset.py`, `impsy/interaction.py`):

- a dataset ``.npz`` holds ``perfs``: an *object* array, one float array ``[n, 1 + N]``
  per performance (dt in seconds since the previous event, not clipped; then N values
  in [0, 1]); empty performances are kept in it. An object array is a pickle, and
  ``numpy.load`` with pickles allowed would run whatever a pickle asks; so `read_perfs`
  reads the pickle with `_ArrayUnpickler`, which knows three names (numpy's array
  reconstructor, ``ndarray`` and ``dtype``), builds the arrays itself from their bytes
  and refuses anything else (any other global, any structured or unusual dtype) before
  it is called.
- a performance log ``<YYYY-mm-ddTHH-MM-SS>-<dimension>d-mdrnn.log`` has lines
  ``<ISO local time>,<source>,v1,...,vN``, source ``interface`` (the performer) or
  ``rnn`` (the model, when IMPSY logs predictions); no header.

Both become our performances ``[n, 1 + N]``: dt clipped to ``dt_max`` like every
dataset of ours, values clipped to [0, 1], a log's first event at dt 0.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from server.learn.data import DT_MAX, DatasetError, iter_files
from server.model.dims import MAX_VALUES, MIN_VALUES

MAX_MEMBER_BYTES = 1 << 30  # an uncompressed `perfs.npy` above 1 GiB is refused (a zip bomb, not playing)
MAX_HEADER_BYTES = 10_000  # numpy's own limit on an .npy header
LOG_PATTERN = re.compile(r"-(\d+)d-mdrnn\.log$")  # IMPSY names a log by its dimension (dt included)
SOURCES = {"interface": "performer", "rnn": "model"}  # IMPSY's log sources -> ours
# dtypes an IMPSY dataset can hold: the outer object array, and numbers in it
_NUMERIC = {f"{k}{n}" for k, sizes in (("f", (2, 4, 8)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8))) for n in sizes}
_OBJECT = {"O4", "O8"}


@dataclass(frozen=True)
class Imported:
    """What came in: the performances (each ``[n, 1 + N]`` float32) and what was done to get them."""

    performances: list[np.ndarray]
    empty: int  # performances with no events (IMPSY keeps them), left out
    dt_clipped: int  # events whose dt was over dt_max (or negative)
    values_clipped: int  # values outside [0, 1], clipped


# --------------------------------------------------------------------------- dataset files


def read_impsy_dataset(path: Path, dt_max: float = DT_MAX) -> Imported:
    """Read IMPSY's dataset ``.npz`` (``perfs``) safely, as our performances; DatasetError names what is wrong."""
    path = Path(path)
    perfs = [np.asarray(p, np.float64) for p in read_perfs(path)]
    widths = sorted({p.shape[1] for p in perfs if p.ndim == 2 and len(p)})
    if not widths:
        raise DatasetError(f"{path}: every performance in 'perfs' is empty")
    if len(widths) > 1 or any(p.ndim != 2 for p in perfs if p.size):
        raise DatasetError(f"{path}: performances in 'perfs' differ in width ({', '.join(map(str, widths))} columns)")
    width = widths[0]
    if not MIN_VALUES + 1 <= width <= MAX_VALUES + 1:
        raise DatasetError(f"{path}: events have {width} columns; supported: dt and {MIN_VALUES} to {MAX_VALUES} values")
    for i, p in enumerate(perfs):
        if p.size and not np.all(np.isfinite(p)):
            raise DatasetError(f"{path}: performance {i} holds NaN or infinite values")
    return _imported([p for p in perfs if len(p)], len(perfs) - sum(1 for p in perfs if len(p)), dt_max)


def read_perfs(path: Path) -> list[np.ndarray]:
    """The arrays in ``perfs`` of an IMPSY ``.npz``, without unpickling anything but numbers."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "perfs.npy" not in names:
                raise DatasetError(f"{path}: not an IMPSY dataset: no array 'perfs' (has {sorted(n[:-4] for n in names)})")
            info = z.getinfo("perfs.npy")
            if info.file_size > MAX_MEMBER_BYTES:
                raise DatasetError(f"{path}: 'perfs' is {info.file_size:,} bytes unpacked; over the limit of "
                                   f"{MAX_MEMBER_BYTES:,}")
            with z.open(info) as member:
                data = member.read(MAX_MEMBER_BYTES + 1)
    except DatasetError:
        raise
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder; give IMPSY's dataset .npz (logs go in with --impsy-logs)") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as e:
        raise DatasetError(f"{path}: damaged or not an .npz ({type(e).__name__}: {e})") from None
    if len(data) > MAX_MEMBER_BYTES:
        raise DatasetError(f"{path}: 'perfs' unpacks to more than {MAX_MEMBER_BYTES:,} bytes")
    try:
        return _perfs_from_npy(io.BytesIO(data))
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    except (ValueError, TypeError, EOFError, KeyError, IndexError, AttributeError, MemoryError, RecursionError,
            pickle.UnpicklingError) as e:
        raise DatasetError(f"{path}: 'perfs' is damaged or not IMPSY's layout ({type(e).__name__}: {e})") from None


def _perfs_from_npy(f: io.BytesIO) -> list[np.ndarray]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=MAX_HEADER_BYTES)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=MAX_HEADER_BYTES)
    else:
        raise DatasetError(f"'perfs' is an .npy of unknown version {version}")
    if not dtype.hasobject:  # equal-length performances can be stored as one numeric array [P, n, 1 + N]
        f.seek(0)
        arr = fmt.read_array(f, allow_pickle=False)
        if arr.ndim != 3:
            raise DatasetError(f"'perfs' has shape {list(arr.shape)}; expected performances of [n, 1 + N]")
        return list(arr)
    top = _ArrayUnpickler(f).load()
    if not isinstance(top, _Array) or top.value is None or top.kind != "object":
        raise DatasetError("'perfs' is not an array of performances")
    if top.shape != tuple(shape):
        raise DatasetError(f"'perfs' has shape {list(top.shape)} but its header says {list(shape)}")
    items = top.value
    if len(top.shape) == 1:  # IMPSY's usual layout: one array per performance
        out = []
        for item in items:
            if not isinstance(item, _Array) or item.value is None or item.kind != "number":
                raise DatasetError("'perfs' holds something other than arrays of numbers")
            out.append(item.value)
        return out
    if len(top.shape) == 3:  # equal-length performances, as numpy makes them from a list with dtype=object
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise DatasetError("'perfs' holds something other than numbers")
        return list(np.asarray(items, np.float64).reshape(top.shape))
    raise DatasetError(f"'perfs' has shape {list(top.shape)}; expected one entry per performance")


class _Token:
    """Stands for ``numpy.ndarray`` in a pickle: recognised by `_reconstruct`, never called."""


_NDARRAY = _Token()


class _DType:
    """A dtype as the pickle describes it: one of a few plain kinds, with its byte order set by BUILD."""

    def __init__(self, spec: str) -> None:
        self.spec, self.order = spec, "="

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[3] is None and state[4] is None):  # names and fields: no structured dtypes
            raise DatasetError("'perfs' holds a dtype other than plain numbers")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        return np.dtype(self.spec).newbyteorder(self.order if self.order != "|" else "=")


class _Array:
    """An array as the pickle describes it: built here from its bytes (numbers) or its list (objects)."""

    def __init__(self) -> None:
        self.value: Any = None  # np.ndarray of numbers, or the list of an object array's items
        self.kind = ""
        self.shape: tuple[int, ...] = ()

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)):
            raise DatasetError("'perfs' holds an array in an unknown pickled form")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape) and len(shape) <= 3):
            raise DatasetError("'perfs' holds an array of an impossible shape")
        count = math.prod(shape)
        order = "F" if fortran is True else "C"
        if dtype.spec in _OBJECT:
            if not isinstance(data, list) or len(data) != count or (order == "F" and len(shape) > 1):
                raise DatasetError("'perfs' holds an object array whose items do not match its shape")
            self.kind, self.value = "object", data
        else:
            kind = dtype.numpy()
            if not isinstance(data, (bytes, bytearray)) or len(data) != count * kind.itemsize:
                raise DatasetError("'perfs' holds an array whose bytes do not match its shape")
            self.kind = "number"
            self.value = np.frombuffer(bytes(data), kind).reshape(shape, order=order).astype(np.float64)
        self.shape = shape


def _reconstruct(cls: Any, shape: Any, code: Any) -> _Array:
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``, the only way a pickled array begins."""
    if cls is not _NDARRAY or shape != (0,) or code not in (b"b", "b"):
        raise DatasetError("'perfs' asks to rebuild something other than a plain array")
    return _Array()


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> _DType:
    if not isinstance(spec, str) or spec not in _NUMERIC | _OBJECT:
        raise DatasetError(f"'perfs' holds values of type {str(spec)[:20]!r}, not numbers")
    return _DType(spec)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that knows numpy's array reconstructor, `ndarray` and `dtype`, and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x pickles
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x pickles
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(f"'perfs' asks to run {module}.{name}: refused (an IMPSY dataset holds only "
                               "arrays of numbers; this file may be malicious)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError("'perfs' refers to outside objects: refused")


# --------------------------------------------------------------------------- performance logs


def read_impsy_logs(paths: Iterable[Path], dt_max: float = DT_MAX, include_model: bool = False) -> Imported:
    """Read IMPSY logs (files, or folders of ``*-<dimension>d-mdrnn.log``): one performance per log and source.

    The performer's lines (``interface``) only, unless ``include_model`` (then each log's
    ``rnn`` lines are a performance of their own too). A folder's logs must all have one
    dimension: a model takes one kind of event.
    """
    paths = [Path(p) for p in paths]
    files = list(_log_files(paths))
    if not files:
        raise DatasetError(f"no IMPSY logs (*-<dimension>d-mdrnn.log) in {', '.join(map(str, paths))}")
    dims: dict[int, list[Path]] = {}
    for f in files:
        dims.setdefault(_log_dimension(f), []).append(f)
    if len(dims) > 1:
        shown = "; ".join(f"{d}d: {len(fs)} log(s), e.g. {fs[0].name}" for d, fs in sorted(dims.items()))
        raise DatasetError(f"the IMPSY logs are of different dimensions ({shown}); give the logs of one, "
                           f"e.g. {paths[0]}/*-{max(dims, key=lambda d: len(dims[d]))}d-mdrnn.log")
    dimension = next(iter(dims))
    if not MIN_VALUES + 1 <= dimension <= MAX_VALUES + 1:
        raise DatasetError(f"{files[0]}: IMPSY dimension {dimension}; supported: 2 to {MAX_VALUES + 1} (dt included)")
    wanted = {"interface", "rnn"} if include_model else {"interface"}
    perfs: list[np.ndarray] = []
    for f in files:
        streams = _read_log(f, dimension - 1)
        perfs.extend(streams[s] for s in ("interface", "rnn") if s in wanted and len(streams.get(s, ())) >= 2)
    if not perfs:
        raise DatasetError(f"the {len(files)} IMPSY log(s) hold no "
                           f"{' or '.join(sorted(wanted))} lines of two events or more")
    return _imported(perfs, 0, dt_max)


def _log_files(paths: list[Path]):
    for p in paths:
        if p.is_dir():
            yield from (f for f in iter_files([p], "*.log") if LOG_PATTERN.search(f.name))
        else:
            yield p


def _log_dimension(path: Path) -> int:
    """The dimension in the log's name (IMPSY writes it); else the widest row of the file's first lines."""
    match = LOG_PATTERN.search(path.name)
    if match:
        return int(match.group(1))
    try:
        with path.open("r", encoding="utf-8", errors="replace", newline="") as f:
            rows = [row for _, row in zip(range(50), csv.reader(f)) if len(row) >= 3 and row[1].strip() in SOURCES]
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    if not rows:
        raise DatasetError(f"{path}: not an IMPSY log (lines of <time>,interface,<values>)")
    return max(len(r) for r in rows) - 1


def _read_log(path: Path, values: int) -> dict[str, np.ndarray]:
    """A log's streams by IMPSY source: ``[n, 1 + values]`` with dt from the timestamps (the first 0)."""
    rows: dict[str, list[list[float]]] = {}
    skipped = 0
    try:
        with path.open("r", encoding="utf-8", errors="replace", newline="") as f:
            for row in csv.reader(f):
                parsed = _log_row(row, values)
                if parsed is None:
                    skipped += bool(row)
                    continue
                source, t, vs = parsed
                rows.setdefault(source, []).append([t, *vs])
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder") from None
    except (OSError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if skipped:
        logging.getLogger(__name__).warning("%s: skipped %d line(s) that are not %d-value IMPSY rows",
                                            path, skipped, values)
    out = {}
    for source, r in rows.items():
        arr = np.asarray(r, np.float64)
        out[source] = np.column_stack([np.diff(arr[:, 0], prepend=arr[0, 0]), arr[:, 1:]])
    return out


def _log_row(row: list[str], values: int) -> tuple[str, float, list[float]] | None:
    """(source, Unix-like seconds, values) of one IMPSY log line, or None."""
    if len(row) != 2 + values or row[1].strip() not in SOURCES:
        return None
    try:
        t = datetime.fromisoformat(row[0].strip()).timestamp()
        vs = [float(v) for v in row[2:]]
    except (ValueError, OverflowError, OSError):
        return None
    if not (math.isfinite(t) and all(math.isfinite(v) for v in vs)):
        return None
    return row[1].strip(), t, vs


# --------------------------------------------------------------------------- both


def _imported(perfs: list[np.ndarray], empty: int, dt_max: float) -> Imported:
    """Clip dt to [0, dt_max] and values to [0, 1], counting what was clipped."""
    out, dt_clipped, values_clipped = [], 0, 0
    for p in perfs:
        p = np.asarray(p, np.float64)
        dt_clipped += int(np.count_nonzero((p[:, 0] > dt_max) | (p[:, 0] < 0)))
        values_clipped += int(np.count_nonzero((p[:, 1:] < 0) | (p[:, 1:] > 1)))
        q = np.column_stack([np.clip(p[:, 0], 0.0, dt_max), np.clip(p[:, 1:], 0.0, 1.0)])
        out.append(q.astype(np.float32))
    return Imported(out, empty, dt_clipped, values_clipped)
