"""Training windows: every performance of two or more events trains, whatever its length.

A window is ``length + 1`` normalised events plus a weight column: inputs are rows
``[:-1]``, targets rows ``[1:]``. A performance shorter than a window becomes one
window padded with zeros whose padded targets weigh 0 (the LSTM is causal, so padding
after an event never changes the prediction for it). A long one is cut with a stride,
plus one window aligned to its end so its last events train too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Windows:
    """``data [W, length + 1, D + 1]``: normalised events and, last, the weight of each as a target."""

    data: np.ndarray
    performances: int  # how many performances contributed
    events: int  # how many events are predicted (targets with weight 1)

    @property
    def inputs(self) -> np.ndarray:
        return self.data[:, :-1, :-1]

    @property
    def targets(self) -> np.ndarray:
        return self.data[:, 1:, :]


def as_steps(windows: Windows, targets: np.ndarray, relative: np.ndarray) -> np.ndarray:
    """``targets`` (from ``windows``, maybe with noise) with each relative dimension made the step from the clean value before it."""
    if not np.any(relative):
        return targets
    out = targets.copy()
    dims = len(relative)
    out[..., :dims] -= windows.data[:, :-1, :dims] * np.asarray(relative, np.float32)
    return out


def make_windows(perfs: Iterable[np.ndarray], length: int, stride: int) -> Windows:
    """Cut normalised performances ``[n, D]`` into weighted windows; performances under two events are skipped."""
    if length < 1 or stride < 1:
        raise ValueError("window length and stride must be >= 1")
    out: list[np.ndarray] = []
    used = predicted = 0
    for p in perfs:
        n = len(p)
        if n < 2:
            continue
        used += 1
        predicted += n - 1
        weighted = np.concatenate([p, np.ones((n, 1), p.dtype)], axis=1)
        if n <= length + 1:
            window = np.zeros((length + 1, weighted.shape[1]), np.float32)
            window[:n] = weighted
            window[0, -1] = 0.0  # the first event is never a target
            out.append(window)
            continue
        starts = list(range(0, n - length, stride))
        if starts[-1] != n - length - 1:
            starts.append(n - length - 1)  # the tail
        for s in starts:
            out.append(weighted[s : s + length + 1])
    if not out:
        raise ValueError("no performance has two or more events")
    return Windows(np.stack(out).astype(np.float32), used, predicted)


def training_dataset(windows: Windows, batch_size: int, half_cell: np.ndarray, seed: int, shuffle: bool = True,
                     relative: np.ndarray | None = None, workers: int = 1, index: int = 0):
    """A tf.data pipeline of (inputs, targets) batches of ``windows``, in memory (see `batches`).

    For worker ``index`` of ``workers``: every ``workers``-th window from the ``index``-th,
    endless (a cluster's workers take a fixed number of steps an epoch, all alike).
    """
    from server.model.network import tf

    ds = tf.data.Dataset.from_tensor_slices(windows.data)
    if workers > 1:
        ds = ds.shard(workers, index)
    if shuffle:
        ds = ds.shuffle(len(windows.data), seed=seed, reshuffle_each_iteration=True)
    if workers > 1:
        ds = ds.repeat()
    return batches(ds, batch_size, half_cell, seed + index, relative)


def batches(ds, batch_size: int, half_cell: np.ndarray, seed: int, relative: np.ndarray | None = None):
    """Windows (a tf.data dataset of ``[length + 1, D + 1]``) as (inputs, targets) batches, with fresh
    dequantisation noise every epoch.

    ``half_cell`` is half a grid cell per dimension in normalised units (0 where the
    dimension is continuous): each window gets uniform noise within the cell, the same
    on a row whether it serves as input or as target. ``relative`` (1 per dimension
    predicted as a step, else 0): such a target is its noisy value minus the clean value
    before it, the step from the grid point the network heard, as on stage.
    """
    from server.model.network import tf

    dims = len(half_cell)
    half = tf.constant(np.asarray(half_cell, np.float32).reshape(1, 1, dims))
    generator = tf.random.Generator.from_seed(seed)
    steps = relative is not None and bool(np.any(relative))
    mask = tf.constant(np.asarray(relative if steps else np.zeros(dims), np.float32).reshape(1, 1, dims))

    def as_steps(clean, targets):
        if not steps:
            return targets
        moved = targets[..., :dims] - clean[:, :-1, :dims] * mask
        return tf.concat([moved, targets[..., dims:]], axis=-1)

    def add_noise(batch):
        noise = generator.uniform(tf.shape(batch[..., :dims]), -1.0, 1.0) * half
        noisy = tf.concat([batch[..., :dims] + noise, batch[..., dims:]], axis=-1)
        return noisy[:, :-1, :dims], as_steps(batch, noisy[:, 1:, :])

    ds = ds.batch(batch_size)
    if np.any(half_cell):
        return ds.map(add_noise).prefetch(2)
    return ds.map(lambda b: (b[:, :-1, :dims], as_steps(b, b[:, 1:, :]))).prefetch(2)


def window_count(length_of_performance: int, length: int, stride: int) -> int:
    """How many windows `make_windows` cuts from a performance of this many events."""
    n = length_of_performance
    if n < 2:
        return 0
    if n <= length + 1:
        return 1
    count = -(-(n - length) // stride)
    return count + (1 if (count - 1) * stride != n - length - 1 else 0)
