"""A cluster's input runs without tf.data's autotuning, so a fit ends when its budget does.

Freeing an autotuned iterator waited for its tuning thread's sleep (up to 60 s): two workers
given one minute took 93 s (server/learn/untuned.py). The pause itself needs a minute of
training to show, so these tests hold what prevents it: our pipeline's options, the
per-device datasets TensorFlow's distributed iterator builds, and that `fit_within` on a
cluster builds its iterator inside `device_datasets_untuned`.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.learn.untuned import device_datasets_untuned, untuned


def _device_datasets(iterator) -> list:
    """The per-device datasets under a DistributedIterator (TensorFlow's private attributes)."""
    return [d._dataset for worker in iterator._iterators for d in worker._iterator._device_iterators]


def _windows():
    from server.learn.windows import make_windows

    rng = np.random.default_rng(0)
    return make_windows([rng.normal(size=(40, 3)).astype("float32") for _ in range(6)], 8, 2)


def _cluster_input(strategy):
    from server.learn import train as train_module
    from server.learn.distribute import Cluster

    cfg = train_module.TrainConfig(size="xs", batch_size=4, cluster=Cluster(("127.0.0.1:1", "127.0.0.1:2"), 0))
    zeros = np.zeros(2, np.float32)
    return train_module._training_input(_windows(), cfg, zeros, zeros, strategy)


def test_our_pipeline_is_untuned():
    from server.model.network import tf

    ds = tf.data.Dataset.range(5).map(lambda x: x + 1, num_parallel_calls=tf.data.AUTOTUNE)
    assert ds.options().autotune.enabled is not False  # TensorFlow's default: tuned
    assert untuned(tf, ds).options().autotune.enabled is False
    assert list(untuned(tf, ds).as_numpy_iterator()) == [1, 2, 3, 4, 5]


def test_a_cluster_input_and_its_per_device_datasets_are_untuned_inside_the_context_only():
    from tensorflow.python.data.ops import multi_device_iterator_ops

    from server.model.network import tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])  # a distributed iterator, as on a cluster, in-process
    data, steps = _cluster_input(strategy)
    assert steps == -(-len(_windows().data) // 8)  # every window once an epoch: batches of 4 on 2 workers
    original = multi_device_iterator_ops._create_device_dataset
    with device_datasets_untuned(tf) as wrapped:
        assert wrapped and multi_device_iterator_ops._create_device_dataset is not original
        inside = iter(data)
    assert multi_device_iterator_ops._create_device_dataset is original  # restored after
    assert [d.options().autotune.enabled for d in _device_datasets(inside)] == [False]
    assert all(worker._dataset.options().autotune.enabled is False for worker in inside._iterators)
    inputs, targets = next(inside)
    assert inputs.shape == (4, 8, 2) and targets.shape == (4, 8, 4)  # still the batches it was
    outside = iter(data)
    assert [d.options().autotune.enabled for d in _device_datasets(outside)] == [None]  # TensorFlow's default


def test_without_tensorflows_constructor_nothing_is_wrapped(monkeypatch):
    from tensorflow.python.data.ops import multi_device_iterator_ops

    from server.model.network import tf

    monkeypatch.delattr(multi_device_iterator_ops, "_create_device_dataset")
    with device_datasets_untuned(tf) as wrapped:
        assert wrapped is False
    assert not hasattr(multi_device_iterator_ops, "_create_device_dataset")


def test_fit_within_on_a_cluster_builds_its_iterator_untuned(monkeypatch):
    """A stand-in model whose `fit` takes its input as Keras would: the iterator it builds is untuned."""
    from server.learn import train as train_module
    from server.learn.distribute import Cluster
    from server.model.network import tf
    from server.model.normalise import Normaliser

    seen = {}

    class Model:
        stop_training = False
        loss = staticmethod(lambda y, p: tf.reduce_mean(p))

        def fit(self, data, **kwargs):
            seen["datasets"] = _device_datasets(iter(data))

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    rng = np.random.default_rng(1)
    performances = [rng.uniform(0.1, 0.9, (40, 3)).astype("float32") for _ in range(6)]
    norm = Normaliser.fit_performances(lambda: performances, 5.0, detect=False)
    cfg = train_module.TrainConfig(size="xs", batch_size=4, cluster=Cluster(("127.0.0.1:1", "127.0.0.1:2"), 0))
    windows = _windows()
    train_module.fit_within(Model(), windows, windows, norm, 10.0, cfg, [], strategy)
    assert [d.options().autotune.enabled for d in seen["datasets"]] == [False]


def test_the_constructor_is_restored_when_the_fit_fails():
    from tensorflow.python.data.ops import multi_device_iterator_ops

    from server.model.network import tf

    original = multi_device_iterator_ops._create_device_dataset
    with pytest.raises(RuntimeError):
        with device_datasets_untuned(tf):
            raise RuntimeError("the fit failed")
    assert multi_device_iterator_ops._create_device_dataset is original
