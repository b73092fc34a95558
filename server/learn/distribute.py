"""Training on several processes or machines with TensorFlow's own tf.distribute.

`--workers host:port,... --worker-index N` (or TF_CONFIG) runs the same command on every
worker under MultiWorkerMirroredStrategy; several local GPUs use MirroredStrategy; one
process keeps TensorFlow's default strategy, so nothing changes there. What must agree
across workers is agreed by a collective sum (`SharedStop`): the chief's clock decides
`--minutes`, a Ctrl-C on any worker stops all, at the same step. Early stopping and the
learning-rate schedule agree by themselves, since every worker sees the same all-reduced
losses. A lost worker is found by the coordination service's heartbeat; every worker
then ends with one `ClusterError` line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Mapping

HEARTBEAT_S = 5  # a worker silent this long is lost (the coordination service's heartbeat)
REGISTER_S = 60  # every worker must have started within this long of the first
SHUTDOWN_S = 600  # the workers wait this long for each other at the end (the chief exports meanwhile)
SYNC_BATCHES = 16  # the stop decision is shared every this many batches, and at every epoch's end
RPC_LAYER = "grpc"


class ClusterError(RuntimeError):
    """The workers could not be reached or one was lost; the message says which and what to do."""


@dataclass(frozen=True)
class Cluster:
    """The workers' host:port addresses (the same list, in the same order, on every worker) and this one's index."""

    workers: tuple[str, ...]
    index: int

    @property
    def chief(self) -> bool:
        """Worker 0 decides the time budget and writes the model folder."""
        return self.index == 0

    def tf_config(self) -> str:
        return json.dumps({"cluster": {"worker": list(self.workers)}, "task": {"type": "worker", "index": self.index}})


def parse_cluster(workers: str | None, index: int | None, env: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster from `--workers`/`--worker-index`, else from TF_CONFIG, else None (one process)."""
    if workers is None and index is None:
        return _from_tf_config(env.get("TF_CONFIG", ""))
    if workers is None or index is None:
        raise ValueError("--workers and --worker-index go together: the same list on every worker, each its own index")
    hosts = tuple(w.strip() for w in workers.split(",") if w.strip())
    for h in hosts:
        host, _, port = h.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--workers: {h!r} is not host:port")
    if len(set(hosts)) != len(hosts) or len(hosts) < 2:
        raise ValueError("--workers: give two or more different host:port addresses")
    if not 0 <= index < len(hosts):
        raise ValueError(f"--worker-index {index}: must be 0 to {len(hosts) - 1} (0 is the chief)")
    return Cluster(hosts, index)


def _from_tf_config(text: str) -> Cluster | None:
    if not text.strip():
        return None
    try:
        config = json.loads(text)
        spec, task = config["cluster"], config["task"]
        jobs = [*spec.get("chief", []), *spec.get("worker", [])]
        index = int(task["index"]) + (len(spec.get("chief", [])) if task["type"] == "worker" else 0)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not a cluster and task ({type(e).__name__}: {e})") from None
    return Cluster(tuple(jobs), index) if len(jobs) > 1 else None


def make_strategy(cluster: Cluster | None) -> Any:
    """MultiWorkerMirroredStrategy for a cluster, MirroredStrategy over several local GPUs, else the default."""
    from server.model.network import tf

    if cluster is None:
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    os.environ["TF_CONFIG"] = cluster.tf_config()
    share_cores(tf, cluster)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # it narrates every all-reduce, and eager ones warn
    _configure_coordination(tf, cluster)
    try:
        return multi_worker_strategy(tf)
    except tf.errors.OpError as e:
        raise ClusterError(f"cannot reach the workers {', '.join(cluster.workers)} within {REGISTER_S} s "
                           f"({_first_line(e)}); start the same command on each, --worker-index 0 to "
                           f"{len(cluster.workers) - 1}") from None


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _local(worker: str) -> bool:
    return worker.rpartition(":")[0] in LOCAL_HOSTS


def local_workers(cluster: Cluster) -> int:
    """How many of the cluster's workers run on this machine (by loopback address)."""
    return sum(map(_local, cluster.workers))


def share_cores(tf: Any, cluster: Cluster, cores: int | None = None) -> int:
    """Give each of this machine's workers its share of the cores; returns the threads per pool.

    TensorFlow sizes its thread pools to every core, so W local workers would run W times as
    many threads as cores and take turns on them; a share each keeps every core busy on
    work. A worker alone on its machine keeps TensorFlow's default (0: all cores).
    """
    here = local_workers(cluster)
    if not _local(cluster.workers[cluster.index]) or here < 2:
        return 0
    share = max(1, (cores or os.cpu_count() or 1) // here)
    tf.config.threading.set_intra_op_parallelism_threads(share)
    tf.config.threading.set_inter_op_parallelism_threads(share)
    return share


def _configure_coordination(tf: Any, cluster: Cluster) -> None:
    """The coordination service with our timeouts (TensorFlow's own: an hour to register, no quick heartbeat)."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader="/job:worker/replica:0/task:0",
        cluster_register_timeout_in_ms=REGISTER_S * 1000,
        heartbeat_timeout_in_ms=HEARTBEAT_S * 1000,
        shutdown_barrier_timeout_in_ms=SHUTDOWN_S * 1000,
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=len(cluster.workers))],
    )


def multi_worker_strategy(tf: Any) -> Any:
    """MultiWorkerMirroredStrategy for TF_CONFIG's cluster (a cluster of one without it).

    Its collectives have no timeout: TensorFlow starts threads that sleep through each
    one's timeout, so with one (we had 600 s) two workers on a small model piled up
    thousands of sleeping threads until the machine refused more. A lost worker is found by
    the coordination service's heartbeat instead.
    """
    return _multi_worker_class(tf)()


def _multi_worker_class(tf: Any) -> type:
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3's fit hands it (keras-team/keras#20585).

    Keras reduces a whole (inputs, targets) batch, only to learn its shapes for building the
    model: this worker's own batch serves (workers' batches may differ in length, and a
    collective over them would fail). It reduces the per-step losses with axis=0, which
    TensorFlow refuses for scalars: they are summed over workers as they are.
    """

    class MultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def one(v):
                local = self.experimental_local_results(v)[0]
                if axis is None and local.shape.rank:
                    return local
                return super(MultiWorker, self).reduce(reduce_op, v, axis if local.shape.rank else None)

            return tf.nest.map_structure(one, value)

    return MultiWorker


def all_sum(strategy: Any, values: list[float]) -> list[float]:
    """Each value summed over the workers (a collective: every worker must call it at the same point)."""
    from server.model.network import tf

    local = tf.constant(values, tf.float32)
    base = tf.distribute.MultiWorkerMirroredStrategy  # its own reduce: ours keeps a batch local (see above)
    reduce = base.reduce if isinstance(strategy, base) else type(strategy).reduce
    total = reduce(strategy, tf.distribute.ReduceOp.SUM, strategy.run(lambda: local), axis=None)
    return [float(v) for v in total.numpy()]


def lost_worker(error: BaseException) -> ClusterError:
    """The one line every worker ends with when the cluster broke during training."""
    return ClusterError(f"training stopped: a worker was lost or cannot be reached ({_first_line(error)}); "
                        "no model was written")


def _first_line(error: BaseException) -> str:
    """What TensorFlow's error says, in a few words: which worker stopped answering, else its first line."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    lost = re.search(r"unhealthy[^/]*/job:worker/replica:\d+/task:(\d+)", text)
    if lost:
        return f"worker {lost.group(1)} stopped answering"
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("/job:")]
    return (lines[0] if lines else type(error).__name__)[:200]


class MeanOverWorkers:
    """Callback hooks that put the training loss Keras logs on a cluster back in nats per event.

    Under MultiWorkerMirroredStrategy Keras 3 logs `loss` as W times the mean (each
    replica's loss is unscaled by the replica count and then averaged), so the progress
    line read W times too good. The gradients are right; only what is logged is divided
    here, before any other callback (early stopping, the best epoch) reads it.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        if "loss" in logs:
            logs["loss"] = float(logs["loss"]) / self.workers


class HeldOutHere:
    """Callback hooks that score the held-out windows on this worker alone, as `val_loss`.

    Keras's own validation under MultiWorkerMirroredStrategy builds a distributed iterator
    every epoch and all-reduces its sums; in 3 of 7 three-minute runs on the chorales a
    worker died of a segmentation fault as that iterator was reset. Every worker holds the
    same held-out windows and, after each step's all-reduce, the same weights, so each
    computes the same figure without a collective: the early stopping, learning-rate
    schedule and best epoch still agree. Batches are weighted by their size, as Keras does.
    """

    def __init__(self, tf: Any, loss: Callable[[Any, Any], Any], inputs: Any, targets: Any, batch: int = 256) -> None:
        self.inputs, self.targets, self.batch = inputs, targets, batch
        self.model: Any = None
        self._score = tf.function(lambda x, y: loss(y, self.model(x, training=False)), reduce_retracing=True)

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        self.model, total, count = model, 0.0, len(self.inputs)
        for start in range(0, count, self.batch):
            x, y = self.inputs[start:start + self.batch], self.targets[start:start + self.batch]
            total += float(self._score(x, y)) * len(x)
        logs["val_loss"] = total / max(count, 1)


class SharedStop:
    """Callback hooks that make every worker stop at the same batch: the chief's budget, anyone's Ctrl-C.

    Between syncs a local stop request (the chief's TimeBudget, a Ctrl-C) is held back as a
    vote, so no worker leaves an epoch alone; at a sync the votes are summed over workers.
    Must come after the callbacks that may stop training. ``clock``: the fraction of the
    budget spent, given by the chief alone (0 elsewhere), so its sum is the chief's.
    """

    def __init__(self, strategy: Any, every: int = SYNC_BATCHES, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.strategy, self.every, self.clock = strategy, every, clock
        self.vote = self.interrupted = False
        self.ctrl_c = False
        self.fraction = 0.0  # of the chief's budget spent, as of the last sync (the same on every worker)

    def on_train_batch_end(self, batch: int, logs: dict, model: Any) -> None:
        self.vote |= bool(model.stop_training)
        if (batch + 1) % self.every == 0:
            self._sync(model)
        else:
            model.stop_training = False

    def on_epoch_end(self, epoch: int, logs: dict, model: Any) -> None:
        if not math.isfinite(float(logs.get("loss", 0.0))):
            model.stop_training = True  # TerminateOnNaN: the loss is all-reduced, so every worker agrees
        self.vote |= bool(model.stop_training)
        self._sync(model)

    def _sync(self, model: Any) -> None:
        stop, interrupt, self.fraction = all_sum(self.strategy, [float(self.vote), float(self.ctrl_c), self.clock()])
        self.interrupted = interrupt > 0
        model.stop_training = stop > 0 or self.interrupted

    @contextmanager
    def catching_ctrl_c(self) -> Iterator[None]:
        """A first Ctrl-C asks every worker to stop at the next sync; a second one interrupts at once."""
        def ask(signum: int, frame: Any) -> None:
            if self.ctrl_c:
                raise KeyboardInterrupt
            self.ctrl_c = True

        try:
            previous = signal.signal(signal.SIGINT, ask)
        except ValueError:  # not the main thread: Ctrl-C is not ours to take
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
