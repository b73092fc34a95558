"""`train --workers`: two worker processes on loopback train one model; a lost worker stops the other cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.learn.data import save_dataset
from server.learn.distribute import SharedStop, _first_line, local_workers, parse_cluster, share_cores
from server.learn.shards import write_shards
from server.learn.synth import synthetic_dataset
from server.model.mdn import RandomBlocks
from server.model.predictor import Predictor

REPO = Path(__file__).resolve().parent.parent
NOISE = ("I0000", "W0000", "E0000", "WARNING: All log")


def test_the_cluster_comes_from_the_flags_or_tf_config():
    assert parse_cluster(None, None, {}) is None
    c = parse_cluster("a:1, b:2", 1, {})
    assert c.workers == ("a:1", "b:2") and c.index == 1 and not c.chief
    tf_config = {"cluster": {"chief": ["c:1"], "worker": ["w:2", "w:3"]}, "task": {"type": "worker", "index": 1}}
    assert parse_cluster(None, None, {"TF_CONFIG": json.dumps(tf_config)}) == parse_cluster("c:1,w:2,w:3", 2, {})
    for workers, index, message in (("a:1,b:2", None, "go together"), ("a:1,b:2", 2, "0 to 1"),
                                    ("a:1", 0, "two or more"), ("a:1,a:1", 0, "two or more"), ("a,b:2", 0, "host:port")):
        with pytest.raises(ValueError, match=message):
            parse_cluster(workers, index, {})
    with pytest.raises(ValueError, match="TF_CONFIG"):
        parse_cluster(None, None, {"TF_CONFIG": "{not json"})


def test_a_lost_worker_is_named_in_a_few_words():
    text = ("{{function_node __wrapped__CollectiveReduceV2}} Collective ops is aborted by: Error reported from "
            "/job:worker/task:0: The following tasks are unhealthy (stopped sending heartbeats):\n"
            "/job:worker/replica:0/task:1\nThe tasks have crashed.")
    assert _first_line(RuntimeError(text)) == "worker 1 stopped answering"
    assert _first_line(RuntimeError("{{node x}} Deadline exceeded\n/job:worker")) == "Deadline exceeded"


class _Threading:
    def __init__(self) -> None:
        self.intra = self.inter = None

    def set_intra_op_parallelism_threads(self, n: int) -> None:
        self.intra = n

    def set_inter_op_parallelism_threads(self, n: int) -> None:
        self.inter = n


class _TF:
    def __init__(self) -> None:
        self.config = type("config", (), {})()
        self.config.threading = _Threading()


def test_workers_on_one_machine_share_its_cores_and_a_remote_worker_keeps_them_all():
    two_here = parse_cluster("127.0.0.1:1,localhost:2", 1, {})
    assert local_workers(two_here) == 2
    tf = _TF()
    assert share_cores(tf, two_here, cores=2) == 1
    assert (tf.config.threading.intra, tf.config.threading.inter) == (1, 1)
    assert share_cores(_TF(), parse_cluster("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", 0, {}), cores=8) == 2
    assert share_cores(_TF(), parse_cluster("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", 0, {}), cores=2) == 1
    mixed, tf = parse_cluster("127.0.0.1:1,studio.local:2", 1, {}), _TF()
    assert local_workers(mixed) == 1
    assert share_cores(tf, mixed, cores=2) == 0 and tf.config.threading.intra is None  # TensorFlow's default
    assert share_cores(_TF(), parse_cluster("127.0.0.1:1,studio.local:2", 0, {}), cores=2) == 0  # alone here


def test_the_default_learning_rate_is_one_process_rate_on_any_cluster():
    from server.learn.train import TrainConfig, learning_rate

    assert learning_rate(TrainConfig()) == pytest.approx(3e-3)
    assert learning_rate(TrainConfig(cluster=parse_cluster("a:1,b:2,c:3,d:4", 0, {}))) == pytest.approx(3e-3)
    assert learning_rate(TrainConfig(cluster=parse_cluster("a:1,b:2", 1, {}), learning_rate=1e-3)) == 1e-3  # as given


def test_a_worker_scores_the_held_out_windows_as_keras_would():
    from server.learn.distribute import HeldOutHere
    from server.model.network import build_model, keras, mdn_loss, tf
    from server.model.spec import ModelSpec

    spec = ModelSpec.of_size("xs", 3, dims=3)
    model = build_model(spec)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=mdn_loss(spec.mixtures, spec.dims))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 8, 3)).astype("float32"), rng.normal(size=(300, 8, 3)).astype("float32")
    logs = {"loss": 1.0}
    HeldOutHere(tf, model.loss, x, y, batch=64).on_epoch_end(0, logs, model)
    assert logs["val_loss"] == pytest.approx(model.evaluate(x, y, batch_size=64, verbose=0), rel=1e-5)
    assert logs["loss"] == 1.0


class _Model:
    stop_training = False


def test_a_stop_waits_for_the_next_sync_so_every_worker_leaves_at_the_same_batch():
    from server.model.network import tf

    stop, model = SharedStop(tf.distribute.get_strategy(), every=4), _Model()
    for batch in range(3):
        model.stop_training = batch == 1  # the chief's budget ran out at batch 1
        stop.on_train_batch_end(batch, {}, model)
        assert not model.stop_training  # held back: the others have not heard yet
    stop.on_train_batch_end(3, {}, model)
    assert model.stop_training and not stop.interrupted

    ctrl_c, model = SharedStop(tf.distribute.get_strategy(), every=4), _Model()
    ctrl_c.ctrl_c = True
    ctrl_c.on_epoch_end(0, {"loss": 1.0}, model)
    assert model.stop_training and ctrl_c.interrupted


def test_the_chiefs_clock_reaches_every_worker_at_a_sync():
    """The rate's schedule reads `fraction`: the sum of the clocks, only the chief's not 0."""
    from server.model.network import tf

    clock = [0.25]
    stop, model = SharedStop(tf.distribute.get_strategy(), every=4, clock=lambda: clock[0]), _Model()
    for batch in range(3):
        stop.on_train_batch_end(batch, {}, model)
    assert stop.fraction == 0.0  # not yet shared
    stop.on_train_batch_end(3, {}, model)
    assert stop.fraction == pytest.approx(0.25)
    clock[0] = 0.75
    stop.on_epoch_end(0, {"loss": 1.0}, model)
    assert stop.fraction == pytest.approx(0.75) and not model.stop_training


THREADS_PROBE = """
import os, sys
from server.learn.distribute import all_sum, make_strategy, parse_cluster
strategy = make_strategy(parse_cluster(sys.argv[1], int(sys.argv[2]), {}))
all_sum(strategy, [1.0])
before = len(os.listdir("/proc/self/task"))
for _ in range(300):
    all_sum(strategy, [1.0])
print("grew", len(os.listdir("/proc/self/task")) - before, flush=True)
all_sum(strategy, [1.0])  # neither leaves while the other counts
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_collectives_leave_no_threads_behind():
    """A collective timeout made TensorFlow sleep one thread per all-reduce through it: thousands within minutes."""
    workers = ",".join(f"127.0.0.1:{p}" for p in _free_ports(2))
    env = {**{k: v for k, v in os.environ.items() if k != "TF_CONFIG"}, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([sys.executable, "-c", THREADS_PROBE, workers, str(i)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    grew = [int(line.split()[1]) for out, _ in outs for line in out.splitlines() if line.startswith("grew ")]
    assert len(grew) == 2 and max(grew) < 30, (grew, [err[-1500:] for _, err in outs])


# --------------------------------------------------------------------------- two processes on loopback


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _workers(tmp_path: Path, epochs: int, minutes: float, shards: bool = False,
             patience: int = 15) -> list[subprocess.Popen]:
    """Two `train --workers` processes on loopback, on a dataset `.npz` or (``shards``) a folder of shards."""
    ds = synthetic_dataset(12, seed=3, phrases=3)
    data = write_shards(ds.performances, tmp_path / "d", 300).folder if shards else save_dataset(ds, tmp_path / "d.npz")
    workers = ",".join(f"127.0.0.1:{p}" for p in _free_ports(2))
    return [subprocess.Popen(
        [sys.executable, "-m", "server", "train", "--data", str(data), "--size", "xs", "--name", "duo",
         "--models-dir", str(tmp_path / f"models{i}"), "--epochs", str(epochs), "--minutes", str(minutes),
         "--patience", str(patience),
         "--sequence-length", "20", "--no-report", "--workers", workers, "--worker-index", str(i)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith(NOISE)]


def test_two_workers_on_shards_write_one_model_that_loads_and_plays(tmp_path):
    # the chief's budget ends it (18 s, a few of them kept for the export: server.learn.finishing), not epochs nor a plateau
    procs = _workers(tmp_path, epochs=1000, minutes=0.3, shards=True, patience=1000)  # each reads its own shards
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (tmp_path / "models0" / "duo" / "model.json").exists()
    assert not (tmp_path / "models1").exists()  # the worker writes nothing
    # each epoch's figures and rate (after the clock, which is each worker's own)
    epochs = [[line.split("NLL", 1)[1] for line in _lines(out) if line.startswith("epoch")] for out in outs]
    assert epochs[0] == epochs[1] and epochs[0]  # the same all-reduced losses, the same rate, the same stop
    # the progress line's held-out figure is the final one's scale (Keras logs W times the mean on a cluster)
    best = float(re.search(r"best (-?[\d.]+)\)", epochs[0][-1]).group(1))
    final = float(re.search(r"held-out NLL (-?[\d.]+) nats/event", outs[0]).group(1))
    assert abs(best - final) < 0.5, (best, final)
    assert "the chief (worker 0) wrote duo" in outs[1]
    info = json.loads((tmp_path / "models0" / "duo" / "model.json").read_text())
    assert info["training"]["learning_rate"] == pytest.approx(3e-3)  # the default, as on one process
    rates = [float(re.search(r"rate (\S+)", line).group(1)) for line in epochs[0]]
    assert info["training"]["rate"] == pytest.approx(rates, rel=0.01)
    assert rates[-1] < 0.99 * info["training"]["learning_rate"]  # past half the chief's budget: settling
    p = Predictor.load(tmp_path / "models0" / "duo", prove=True)
    draws = RandomBlocks(np.random.default_rng(1), 3)
    for _ in range(5):
        event = p.sample(draws, 1.0, 1.0)
        assert len(event) == 3 and all(np.isfinite(event))
        p.observe(*event)


def test_a_killed_worker_stops_the_chief_with_one_line_and_no_model(tmp_path):
    chief, worker = _workers(tmp_path, epochs=200, minutes=5)
    for line in worker.stdout:
        if line.startswith("epoch"):  # mid-run: the first epoch is done
            worker.send_signal(signal.SIGKILL)
            break
    out = chief.communicate(timeout=120)[0]
    worker.communicate(timeout=30)
    assert chief.returncode == 1, out
    assert _lines(out)[-1] == ("error: training stopped: a worker was lost or cannot be reached "
                               "(worker 1 stopped answering); no model was written")
    assert not (tmp_path / "models0").exists()


def test_workers_need_an_index_and_a_list(tmp_path):
    res = subprocess.run([sys.executable, "-m", "server", "train", "--data", "x.npz", "--name", "n",
                          "--workers", "127.0.0.1:1,127.0.0.1:2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "--workers and --worker-index go together" in res.stderr
