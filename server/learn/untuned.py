"""A cluster's training input without tf.data's autotuning, so that a fit ends when its budget does.

Freeing an autotuned tf.data iterator waits for its tuning thread, and that thread sleeps
between optimisations for up to 60 s (the period doubles from 10 ms) without being woken
(TensorFlow 2.21; gdb on an idle worker: `~RootDataset::Iterator` waiting on the thread in
`Model::OptimizeLoop`). After a minute of training, two workers sat idle for 35-60 s as
`fit` freed its input, and again at exit: `--minutes 1` took 93 s. One process is not
affected (its iterator is freed after a short run, or the pause falls after the export).

Two kinds of iterator do it on a cluster: the one over our own pipeline, untuned by its
options (`untuned`), and those `MultiDeviceIterator` builds for each device, which take
no options from ours: `device_datasets_untuned` gives them the same options for the
length of the fit, by wrapping TensorFlow's private constructor of them. Without that
constructor (another TensorFlow) nothing is wrapped: training is the same, the pause
comes back. The pipelines' parallel maps run at the core count instead of a tuned one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def untuned(tf: Any, dataset: Any) -> Any:
    """``dataset`` with autotuning off."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


@contextmanager
def device_datasets_untuned(tf: Any) -> Iterator[bool]:
    """Within it, the per-device datasets of a distributed iterator are untuned; yields whether they could be."""
    try:
        from tensorflow.python.data.ops import multi_device_iterator_ops as module
    except ImportError:
        module = None
    original = getattr(module, "_create_device_dataset", None)
    if original is None:
        yield False
        return

    def create(*args: Any, **kwargs: Any) -> Any:
        return untuned(tf, original(*args, **kwargs))

    module._create_device_dataset = create
    try:
        yield True
    finally:
        module._create_device_dataset = original
