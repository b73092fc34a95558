"""Datasets larger than memory: a folder of `.npz` shards of whole performances, and an index.

`dataset --shard-events N` writes one; `train` and `evaluate` read it a shard at a time, so
their memory follows the shard size and the shuffle buffer, not the corpus. Each shard is an
ordinary dataset `.npz` (`events`, `starts`; read by `load_dataset`, nothing pickled); the
index (`index.json`) lists them in order with their counts and hashes, so the corpus is
counted and split without reading a shard, and a damaged or swapped shard is refused.
A performance is never cut: one longer than N events is a shard of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.learn.data import Dataset, DatasetError, load_dataset, save_dataset

INDEX = "index.json"
FORMAT = "antiphon-shards"
VERSION = 1
MIN_SHARD_EVENTS = 100  # fewer would make more files than sense; a performance still fits whatever N is


@dataclass(frozen=True)
class Shard:
    file: str
    events: int
    performances: int
    sha256: str


@dataclass(frozen=True)
class ShardedDataset:
    """A dataset kept on disk: its shards are read one at a time, in order."""

    folder: Path
    values: int  # N, the values after dt in each event
    shards: tuple[Shard, ...]

    @property
    def event_count(self) -> int:
        return sum(s.events for s in self.shards)

    @property
    def performance_count(self) -> int:
        return sum(s.performances for s in self.shards)

    def sha256(self) -> str:
        """The corpus's identity for model.json: a hash of its shards' hashes, in order."""
        return hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()

    def read(self, number: int) -> Dataset:
        """Shard `number`, checked against the index (a damaged or swapped file is an error naming it)."""
        shard = self.shards[number]
        path = self.folder / shard.file
        ds = load_dataset(path)
        if ds.values != self.values or len(ds.events) != shard.events or len(ds.starts) != shard.performances \
                or ds.sha256() != shard.sha256:
            raise DatasetError(f"{path}: differs from {self.folder / INDEX} (changed or damaged); "
                               "rebuild the dataset with antiphon dataset --shard-events")
        return ds

    def first_index(self, number: int) -> int:
        """The corpus-wide index of shard `number`'s first performance."""
        return sum(s.performances for s in self.shards[:number])

    def performances(self, keep: Callable[[int], bool] = lambda i: True) -> Iterator[np.ndarray]:
        """Every performance whose corpus-wide index `keep` accepts, in order, a shard in memory at a time."""
        for number in range(len(self.shards)):
            yield from self.shard_performances(number, keep)

    def shard_performances(self, number: int, keep: Callable[[int], bool] = lambda i: True) -> list[np.ndarray]:
        first = self.first_index(number)
        return [p for i, p in enumerate(self.read(number).performances, start=first) if keep(i)]

    def lengths(self) -> np.ndarray:
        """Every performance's event count, in order (from each shard's `starts` only)."""
        out = []
        for number, shard in enumerate(self.shards):
            with np.load(self.folder / shard.file, allow_pickle=False) as z:
                starts = z["starts"]
            out.append(np.diff(np.append(starts, shard.events)))
        return np.concatenate(out).astype(np.int64)


def is_sharded(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def open_dataset(path: Path) -> Dataset | ShardedDataset:
    """A dataset `.npz` in memory, or a folder of shards (`dataset --shard-events`) kept on disk."""
    path = Path(path)
    return open_shards(path) if is_sharded(path) else load_dataset(path)


def open_shards(folder: Path) -> ShardedDataset:
    """Read and check a shard folder's index (not the shards: each is checked when read)."""
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"{folder / INDEX}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise DatasetError(f"{folder / INDEX}: not JSON ({e})") from None
    try:
        if index["format"] != FORMAT or index["version"] != VERSION:
            raise DatasetError(f"{folder / INDEX}: not an {FORMAT} index of version {VERSION}")
        shards = tuple(Shard(str(s["file"]), int(s["events"]), int(s["performances"]), str(s["sha256"]))
                       for s in index["shards"])
        values = int(index["values"])
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{folder / INDEX}: malformed ({type(e).__name__}: {e})") from None
    for s in shards:
        if Path(s.file).name != s.file or not s.file.endswith(".npz"):
            raise DatasetError(f"{folder / INDEX}: shard {s.file!r} is not a file name in the folder")
    if not shards:
        raise DatasetError(f"{folder / INDEX}: lists no shards")
    return ShardedDataset(folder, values, shards)


class ShardWriter:
    """Performances in, shards of at most `shard_events` events out; the folder appears whole or not at all."""

    def __init__(self, folder: Path, shard_events: int) -> None:
        if shard_events < MIN_SHARD_EVENTS:
            raise DatasetError(f"--shard-events must be at least {MIN_SHARD_EVENTS}, got {shard_events}")
        self.folder = Path(folder)
        if self.folder.exists() and not is_sharded(self.folder):
            raise DatasetError(f"{self.folder}: exists and is not a shard folder; name a new folder")
        self.shard_events = shard_events
        self.tmp = self.folder.with_name(f".{self.folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self.pending: list[np.ndarray] = []
        self.pending_events = 0
        self.shards: list[Shard] = []
        self.values: int | None = None

    def __enter__(self) -> "ShardWriter":
        try:
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise DatasetError(f"{self.folder}: cannot write the dataset ({e.strerror or e})") from None
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, performances: Iterable[np.ndarray]) -> None:
        for p in performances:
            if len(p) == 0:
                continue
            if self.pending and self.pending_events + len(p) > self.shard_events:
                self._flush()
            self.pending.append(p)
            self.pending_events += len(p)

    def _flush(self) -> None:
        ds = Dataset.from_performances(self.pending)
        if self.values is not None and ds.values != self.values:
            raise DatasetError(f"performances differ in their values per event (dt + {self.values}, "
                               f"dt + {ds.values}); a dataset holds one kind of event")
        self.values = ds.values
        name = f"shard-{len(self.shards):05d}.npz"
        save_dataset(ds, self.tmp / name)
        self.shards.append(Shard(name, len(ds.events), len(ds.starts), ds.sha256()))
        self.pending, self.pending_events = [], 0

    def close(self) -> ShardedDataset:
        """Write the last shard and the index, and put the folder in place (replacing an older shard folder)."""
        if self.pending:
            self._flush()
        if not self.shards:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise DatasetError("no events: every performance is empty")
        index = {"format": FORMAT, "version": VERSION, "values": self.values,
                 "events": sum(s.events for s in self.shards),
                 "performances": sum(s.performances for s in self.shards),
                 "shards": [s.__dict__ for s in self.shards]}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        if self.folder.exists():
            old = self.folder.with_name(self.tmp.name + ".old")
            os.replace(self.folder, old)
            os.replace(self.tmp, self.folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.folder)
        return open_shards(self.folder)


def write_shards(performances: Iterable[np.ndarray], folder: Path, shard_events: int) -> ShardedDataset:
    """Write `performances` (in order) as a shard folder."""
    with ShardWriter(folder, shard_events) as writer:
        writer.add(performances)
        return writer.close()
