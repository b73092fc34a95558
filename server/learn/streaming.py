"""Training on a shard folder: windows streamed with tf.data, so memory follows the shards, not the corpus.

The held-out performances are chosen from the corpus's count alone (as in memory), read
once and kept: validation and the final score need them every epoch, and they are a
fraction of the corpus. The training windows are cut once, a shard at a time, into a
temporary folder (`write`: raw float32, about five times the events' bytes at the default
stride) and read from there every epoch by tf.data's own reader, with no Python in the
pipeline: the files' order is shuffled, `READERS` are read at once and their windows
mixed in a buffer of `SHUFFLE_WINDOWS`. On a cluster each worker reads its own shards
(shard i goes to worker i mod W) and every worker takes the same number of steps an
epoch, so none waits at an all-reduce for a worker that ran out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.learn.data import Dataset, DatasetError, held_out_indices, split_performances
from server.learn.shards import ShardedDataset
from server.learn.windows import batches, make_windows, window_count
from server.model.normalise import Normaliser

SHUFFLE_WINDOWS = 20_000  # windows mixed at once (as raw bytes): ~16 MB at two values, ~73 MB at sixteen
READERS = 2  # shards read at once


@dataclass(frozen=True)
class ShardedPart:
    """The training performances of a sharded corpus: all but those held out."""

    source: ShardedDataset
    left_out: frozenset[int]

    @property
    def values(self) -> int:
        return self.source.values

    @property
    def performances(self) -> Iterator[np.ndarray]:
        """Each training performance in corpus order, a shard in memory at a time (a fresh pass each time)."""
        return self.source.performances(self.kept)

    def kept(self, index: int) -> bool:
        return index not in self.left_out


def split_sharded(ds: ShardedDataset, val_fraction: float, seed: int) -> tuple[ShardedPart | Dataset, Dataset, list[int]]:
    """(training part, held-out performances in memory, their indices): the split `split_performances` makes."""
    n = ds.performance_count
    if n == 1:  # one long session: it is one shard, so in memory anyway
        return split_performances(ds.read(0), val_fraction, seed)
    held_out = held_out_indices(n, val_fraction, seed)
    wanted = set(held_out)
    val = Dataset.from_performances(ds.performances(lambda i: i in wanted))
    return ShardedPart(ds, frozenset(held_out)), val, held_out


@dataclass(frozen=True)
class StreamedWindows:
    """What `make_windows` would give on a sharded part, counted but not made: windows come in `dataset`."""

    part: ShardedPart
    norm: Normaliser
    length: int
    stride: int
    performances: int  # of two events or more
    events: int  # predicted
    per_shard: tuple[int, ...]  # windows in each shard

    @property
    def windows(self) -> int:
        return sum(self.per_shard)

    @classmethod
    def of(cls, part: ShardedPart, norm: Normaliser, length: int, stride: int) -> "StreamedWindows":
        per_shard, performances, events = [], 0, 0
        lengths = part.source.lengths()
        first = 0
        for shard in part.source.shards:
            mine = [int(n) for i, n in enumerate(lengths[first:first + shard.performances], start=first)
                    if part.kept(i) and n >= 2]
            first += shard.performances
            per_shard.append(sum(window_count(n, length, stride) for n in mine))
            performances += len(mine)
            events += sum(n - 1 for n in mine)
        if not performances:
            raise ValueError("no performance has two or more events")
        return cls(part, norm, length, stride, performances, events, tuple(per_shard))

    def check_workers(self, workers: int) -> None:
        """Refuse a cluster in which some worker's shards hold no training window: it would have nothing to give."""
        for index in range(workers):
            if not sum(self.per_shard[index::workers]):
                raise DatasetError(f"{self.part.source.folder}: {len(self.per_shard)} shard(s) for {workers} workers "
                                   f"leave worker {index} no training window; rebuild it with a smaller --shard-events "
                                   f"(each worker reads its own shards)")

    def shard_windows(self, number: int) -> np.ndarray:
        """Shard `number`'s training windows ``[W, length + 1, D + 1]`` (none: an empty array)."""
        perfs = [self.norm.forward(p) for p in self.part.source.shard_performances(number, self.part.kept)]
        perfs = [p for p in perfs if len(p) >= 2]
        if not perfs:
            return np.zeros((0, self.length + 1, self.part.values + 2), np.float32)
        return make_windows(perfs, self.length, self.stride).data

    def _mine(self, workers: int, index: int) -> list[int]:
        """The shards worker `index` of `workers` reads (shard i goes to worker i mod W) that hold a window."""
        return [n for n in range(len(self.part.source.shards))[index::workers] if self.per_shard[n]]

    def write(self, folder: Path, workers: int = 1, index: int = 0) -> None:
        """Worker `index`'s training windows into `folder`, a raw float32 file a shard, one shard in memory at a time.

        `dataset` reads them back with tf.data's own file reader, so no epoch runs Python to
        cut windows again (`from_generator` did, a shard at a time, every epoch).
        """
        for number in self._mine(workers, index):
            self.shard_windows(number).astype("<f4", copy=False).tofile(Path(folder) / f"shard-{number:05d}.f32")

    def dataset(self, batch_size: int, half_cell: np.ndarray, seed: int, relative: np.ndarray | None = None,
                workers: int = 1, index: int = 0, *, folder: Path):
        """(inputs, targets) batches for one worker of `workers`, from the files `write` put in `folder`;
        with several workers, endless (see `steps_per_epoch`)."""
        from server.model.network import tf

        width = self.part.values + 2  # dt, the values, the weight
        files = [str(Path(folder) / f"shard-{n:05d}.f32") for n in self._mine(workers, index)]
        for file in files:
            if not Path(file).is_file():
                raise FileNotFoundError(f"{file}: StreamedWindows.write was not called for this worker")
        shape = [self.length + 1, width]

        def read(file):
            return tf.data.FixedLengthRecordDataset(file, 4 * shape[0] * shape[1])  # a window's bytes a record

        def decode(record):
            return tf.reshape(tf.io.decode_raw(record, tf.float32, little_endian=True), shape)

        ds = tf.data.Dataset.from_tensor_slices(files)
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(read, cycle_length=READERS, num_parallel_calls=READERS)
        if workers == 1:  # a known length: Keras counts the epoch's steps instead of guessing from the first
            ds = ds.apply(tf.data.experimental.assert_cardinality(self.windows))
        ds = ds.shuffle(SHUFFLE_WINDOWS, seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        if workers > 1:
            ds = ds.repeat()
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
            ds = ds.with_options(options)  # each worker reads its own shards already
        return batches(ds, batch_size, half_cell, seed + index, relative)

    def steps_per_epoch(self, batch_size: int, workers: int) -> int:
        """Steps that see about every window once, taken by every worker alike."""
        return max(1, math.ceil(self.windows / (batch_size * workers)))
